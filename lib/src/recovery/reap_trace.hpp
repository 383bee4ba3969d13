// A test-only trace of what reaps do (tests/crash/hot_paths_test.cpp): when a test points
// g_reap_trace at a ring in memory shared by its processes (MAP_SHARED, before it forks), each
// reap records there what it froze, summed and stored, and which slots it judged dead; holders
// record the frozen-word breaks of Hold::step_aside. Null (the default): one load and a branch on
// the rare paths only, nothing on the hot paths.
#pragma once

#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>

namespace lim::detail {

enum class ReapTraceKind : std::uint32_t {
    recount = 1,   // a = in_use before (frozen value), b = live sum stored, c = given back
    abandoned,     // recount found the word thawed
    deferred,      // quiescence not reached
    free_slot,     // a = slot index, b = owner word freed
    break_timed,   // step_aside thawed by the 200 ms CAS: a = word before
    break_locked,  // step_aside thawed holding the recovery lock: a = word before
    reap_begin,    // a = number of dead slots
    reap_end,
    test,          // written by the test: a, b, c its own
};

struct ReapTraceEvent {
    std::atomic<std::uint64_t> seq;  // 1 + the event's index; stored last
    std::uint32_t kind;
    std::int32_t pid;
    std::int32_t tid;
    std::uint32_t record;
    std::uint64_t index;
    std::int64_t a, b, c;
    std::int64_t ns;
    std::uint64_t dead_mask;    // slots 0..63 judged dead by this reap
    std::uint64_t owner[64];    // recount: every slot's owner word when the live sum was read
    std::int64_t held[64];      // recount: every slot's held[0] for the record then
};

inline constexpr std::uint32_t kReapTraceSize = 8192;

struct ReapTrace {
    std::atomic<std::uint64_t> next{0};
    std::atomic<std::uint32_t> stopped{0};
    ReapTraceEvent ev[kReapTraceSize];

    ReapTraceEvent* begin(ReapTraceKind kind, std::uint32_t record) noexcept {
        if (stopped.load(std::memory_order_relaxed) != 0) return nullptr;
        const std::uint64_t i = next.fetch_add(1, std::memory_order_relaxed);
        ReapTraceEvent& e = ev[i % kReapTraceSize];
        e.seq.store(0, std::memory_order_relaxed);
        e.kind = static_cast<std::uint32_t>(kind);
        e.pid = static_cast<std::int32_t>(::getpid());
        e.tid = static_cast<std::int32_t>(::gettid());
        e.record = record;
        e.a = e.b = e.c = 0;
        e.dead_mask = 0;
        timespec ts{};
        ::clock_gettime(CLOCK_MONOTONIC, &ts);
        e.ns = ts.tv_sec * 1'000'000'000LL + ts.tv_nsec;
        e.index = i;
        return &e;
    }
    static void end(ReapTraceEvent* e) noexcept {
        e->seq.store(e->index + 1, std::memory_order_release);
    }
};

inline ReapTrace* g_reap_trace = nullptr;

}  // namespace lim::detail
