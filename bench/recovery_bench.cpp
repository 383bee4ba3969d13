// What crash recovery costs.
//
// 1. The ledger on the hot path: a semaphore acquire+release pair with the ledger protocol
//    (announce, CAS, record, withdraw) against the same CAS loop on the same kind of word without
//    it, and against the public Semaphore API (which adds argument checks). Same process, one
//    thread, uncontended: the case where the overhead is most visible.
// 2. Reap time with 1,024 process slots: all held by dead processes (each holding a unit of a
//    semaphore), and all live with nothing to reap (the scan an attach pays).
//
//   build/release/bench/recovery_bench --benchmark_min_time=0.5
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <string>

#include "lim/lim.hpp"
#include "primitives/semaphore_state.hpp"
#include "shm/ledger.hpp"
#include "shm/process_table.hpp"
#include "shm/records.hpp"

namespace {

std::string bench_name(const char* stem) {
    return std::string("bench-") + stem + "-" + std::to_string(::getpid());
}

struct Fixture {
    std::string name;
    lim::Segment seg;
    lim::Semaphore sem;
    std::uint32_t record;
    std::atomic<std::uint64_t>* word;

    explicit Fixture(const char* stem, std::uint32_t max_processes = 64)
        : name(bench_name(stem)),
          seg(lim::Segment::open_or_create(name,
                                           {.max_limiters = 4, .max_processes = max_processes})),
          sem(lim::Semaphore::open(seg, "sem", {.capacity = 1'000'000})),
          record(
              *lim::detail::find_record(*seg.state(), lim::detail::RecordKind::semaphore, "sem")),
          word(&reinterpret_cast<lim::detail::SemaphoreBody*>(seg.state()->record(record).body)
                    ->word) {}
    ~Fixture() { lim::Segment::remove(name); }
};

// The semaphore's CAS loops exactly as SemaphoreCore runs them (frozen check, capacity check,
// seq_cst CAS), minus the ledger.
bool bare_try_acquire(std::atomic<std::uint64_t>& word, std::uint64_t capacity, std::uint64_t n) {
    std::uint64_t w = word.load(std::memory_order_relaxed);
    for (;;) {
        if (lim::detail::is_frozen(w)) return false;
        if (lim::detail::SemaphoreWord::in_use(w) + n > capacity) return false;
        if (word.compare_exchange_weak(w, w + n, std::memory_order_seq_cst,
                                       std::memory_order_relaxed)) {
            return true;
        }
    }
}

void bare_release(std::atomic<std::uint64_t>& word, std::uint64_t n) {
    std::uint64_t w = word.load(std::memory_order_relaxed);
    for (;;) {
        if (lim::detail::is_frozen(w) || lim::detail::SemaphoreWord::in_use(w) < n) return;
        if (word.compare_exchange_weak(w, w - n, std::memory_order_seq_cst,
                                       std::memory_order_relaxed)) {
            if (lim::detail::SemaphoreWord::single(w) | lim::detail::SemaphoreWord::multi(w)) {
                benchmark::DoNotOptimize(w);  // a real release would wake here
            }
            return;
        }
    }
}

void BM_AcquireRelease_NoLedger(benchmark::State& st) {
    Fixture f("noledger");
    for (auto _ : st) {
        benchmark::DoNotOptimize(bare_try_acquire(*f.word, 1'000'000, 1));
        bare_release(*f.word, 1);
    }
}
BENCHMARK(BM_AcquireRelease_NoLedger);

void BM_AcquireRelease_WithLedger(benchmark::State& st) {
    Fixture f("ledger");
    auto& state = *f.seg.state();
    lim::detail::SemaphoreCore core{*f.word, 1'000'000, 0};
    for (auto _ : st) {
        {
            lim::detail::Hold hold(state, f.record);
            benchmark::DoNotOptimize(core.try_acquire(hold, state, 1));
        }
        lim::detail::Hold hold(state, f.record);
        benchmark::DoNotOptimize(core.release(hold, state, 1));
    }
}
BENCHMARK(BM_AcquireRelease_WithLedger);

void BM_AcquireRelease_PublicSemaphore(benchmark::State& st) {
    Fixture f("public");
    for (auto _ : st) {
        benchmark::DoNotOptimize(f.sem.try_acquire());
        f.sem.release();
    }
}
BENCHMARK(BM_AcquireRelease_PublicSemaphore);

// 1,024 slots owned by a pid that no longer exists, each holding one unit: one reap clears them.
void BM_Reap1024DeadSlots(benchmark::State& st) {
    Fixture f("reapdead", 1024);
    auto& s = *f.seg.state();
    const pid_t gone = fork();
    if (gone == 0) _exit(0);
    waitpid(gone, nullptr, 0);
    const auto own = lim::detail::holder(s).slot_index;
    std::size_t reaped = 0;
    for (auto _ : st) {
        st.PauseTiming();
        std::uint64_t units = 0;
        for (std::uint32_t i = 0; i < 1024; ++i) {
            if (i == own) continue;
            auto& slot = s.slot(i);
            slot.owner.store(lim::detail::SlotOwner::make(static_cast<std::uint32_t>(gone), 1,
                                                          lim::detail::SlotState::live));
            s.ledger(i, f.record).held[0].store(1);
            ++units;
        }
        f.word->fetch_add(units);
        st.ResumeTiming();
        reaped += f.seg.reap().reaped.size();
    }
    st.counters["slots"] = 1023;
    benchmark::DoNotOptimize(reaped);
    if (f.sem.in_use() != 0) st.SkipWithError("reap left units in use");
}
BENCHMARK(BM_Reap1024DeadSlots)->Unit(benchmark::kMillisecond);

// 1,023 slots held by live holders, nobody dead: the scan every attach pays. A slot is live while
// its lock byte (kSlotLockBase + slot) is locked, so this process locks them through a description
// of its own, as each owner does through its own.
void BM_Reap1024LiveSlotsNothingToDo(benchmark::State& st) {
    Fixture f("reaplive", 1024);
    auto& s = *f.seg.state();
    const auto self = lim::detail::holder(s);
    const int fd = ::open(("/dev/shm/lim." + f.name).c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        st.SkipWithError("cannot open the segment file");
        return;
    }
    for (std::uint32_t i = 0; i < 1024; ++i) {
        if (i == self.slot_index) continue;
        struct flock lk {};
        lk.l_type = F_WRLCK;
        lk.l_whence = SEEK_SET;
        lk.l_start = static_cast<off_t>(lim::detail::kSlotLockBase + i);
        lk.l_len = 1;
        if (::fcntl(fd, F_OFD_SETLK, &lk) != 0) st.SkipWithError("cannot lock a slot byte");
        s.slot(i).owner.store(lim::detail::SlotOwner::make(static_cast<std::uint32_t>(getpid()), 1,
                                                           lim::detail::SlotState::retired));
    }
    for (auto _ : st)
        benchmark::DoNotOptimize(f.seg.reap());
    for (std::uint32_t i = 0; i < 1024; ++i) {
        if (i != self.slot_index) s.slot(i).owner.store(0);
    }
    ::close(fd);
}
BENCHMARK(BM_Reap1024LiveSlotsNothingToDo)->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
