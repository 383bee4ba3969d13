// Dispatch acquire+release against the baselines a user would reach for, in one run:
//
//   BM_BareFetchAddPair      fetch_add + fetch_sub on one shared word: the floor for any
//                            counter shared through memory
//   BM_Dispatch              lim::Dispatch acquire(bytes) + Permit release: three layers
//                            (concurrency, throttled under backoff, bytes), ledger included
//   BM_MutexDispatch         the same three-layer semantics (backoff check, concurrency, bytes)
//                            as plain counters under a robust process-shared pthread mutex
//
// Each runs uncontended (1 process) and with a second process hammering the same object
// (2 processes; the figure is the parent's time per acquire+release). Results and the command:
// docs/benchmarks.md.
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <benchmark/benchmark.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <new>
#include <string>

#include "lim/backoff_window.hpp"
#include "lim/dispatch.hpp"
#include "lim/segment.hpp"

namespace {

void* shared_memory(std::size_t n) {
    void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    return p;
}

// Runs `body` in a forked child until `stop` is set; returns its pid.
pid_t spawn_hammer(std::atomic<int>* stop, std::atomic<int>* started,
                   const std::function<void()>& body) {
    const pid_t pid = ::fork();
    if (pid == 0) {
        started->store(1);
        while (stop->load(std::memory_order_relaxed) == 0)
            body();
        ::_exit(0);
    }
    while (started->load() == 0) {
    }
    return pid;
}

struct Hammer {
    std::atomic<int>* flags = static_cast<std::atomic<int>*>(shared_memory(64));
    pid_t pid = 0;

    void start(int processes, const std::function<void()>& body) {
        if (processes < 2) return;
        new (flags) std::atomic<int>[2] {};
        pid = spawn_hammer(&flags[0], &flags[1], body);
    }
    void stop() {
        if (pid == 0) return;
        flags[0].store(1);
        ::waitpid(pid, nullptr, 0);
        pid = 0;
    }
};

// --- bare pair --------------------------------------------------------------------------------

void BM_BareFetchAddPair(benchmark::State& state) {
    auto* word = new (shared_memory(64)) std::atomic<std::uint64_t>{0};
    Hammer h;
    h.start(static_cast<int>(state.range(0)), [word] {
        word->fetch_add(1, std::memory_order_acq_rel);
        word->fetch_sub(1, std::memory_order_acq_rel);
    });
    for (auto _ : state) {
        word->fetch_add(1, std::memory_order_acq_rel);
        word->fetch_sub(1, std::memory_order_acq_rel);
    }
    h.stop();
    benchmark::DoNotOptimize(word->load());
}
BENCHMARK(BM_BareFetchAddPair)->ArgName("processes")->Arg(1)->Arg(2);

// --- lim::Dispatch ----------------------------------------------------------------------------

void BM_Dispatch(benchmark::State& state) {
    const std::string name = "bench-dispatch-" + std::to_string(::getpid());
    lim::Segment::remove(name);
    {
        auto seg = lim::Segment::open_or_create(name, {.max_limiters = 8, .max_processes = 16});
        auto d = lim::Dispatch::open(
            seg, {.limiter = lim::BackoffWindow::for_key(seg, "api"), .key = "api"});
        Hammer h;
        h.start(static_cast<int>(state.range(0)), [&d] { auto p = d.acquire(1000); });
        for (auto _ : state) {
            lim::Permit p = d.acquire(1000);
            benchmark::DoNotOptimize(p);
        }
        h.stop();
    }
    lim::Segment::remove(name);
}
BENCHMARK(BM_Dispatch)->ArgName("processes")->Arg(1)->Arg(2);

// The same under an active backoff: the throttled layer too, and a clock read per acquire.
void BM_DispatchUnderBackoff(benchmark::State& state) {
    const std::string name = "bench-dispatch-b-" + std::to_string(::getpid());
    lim::Segment::remove(name);
    {
        auto seg = lim::Segment::open_or_create(name, {.max_limiters = 8, .max_processes = 16});
        auto d = lim::Dispatch::open(
            seg, {.limiter = lim::BackoffWindow::for_key(seg, "api"), .key = "api"});
        d.set_backoff(std::chrono::hours{1});
        Hammer h;
        h.start(static_cast<int>(state.range(0)), [&d] { auto p = d.acquire(1000); });
        for (auto _ : state) {
            lim::Permit p = d.acquire(1000);
            benchmark::DoNotOptimize(p);
        }
        h.stop();
    }
    lim::Segment::remove(name);
}
BENCHMARK(BM_DispatchUnderBackoff)->ArgName("processes")->Arg(1)->Arg(2);

// --- the same semantics under a robust process-shared mutex -----------------------------------

struct MutexDispatch {
    pthread_mutex_t mutex;
    std::uint64_t concurrency = 400, throttled_concurrency = 10, byte_budget = 5'000'000;
    std::int64_t backoff_window_ns = 10'000'000'000;
    std::uint64_t penalty = 20;
    std::uint64_t in_flight = 0, throttled = 0, bytes = 0;
    std::int64_t until_ns = 0;

    MutexDispatch() {
        pthread_mutexattr_t a;
        pthread_mutexattr_init(&a);
        pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
        pthread_mutex_init(&mutex, &a);
        pthread_mutexattr_destroy(&a);
    }
    void lock() {
        if (pthread_mutex_lock(&mutex) == EOWNERDEAD) pthread_mutex_consistent(&mutex);
    }
    void unlock() { pthread_mutex_unlock(&mutex); }

    // One attempt at the three layers; the uncontended benchmark never finds them full.
    bool try_acquire(std::uint64_t n, bool& was_throttled, std::uint64_t& charged) {
        lock();
        bool backoff = false;
        if (until_ns != 0) {
            const std::int64_t now = lim::to_nanos(lim::Clock::now());
            backoff = now < until_ns || now - until_ns < backoff_window_ns;
        }
        charged = backoff ? n * penalty : n;
        if (charged > byte_budget) charged = byte_budget;
        const bool ok = in_flight < concurrency &&
                        (!backoff || throttled < throttled_concurrency) &&
                        bytes + charged <= byte_budget;
        if (ok) {
            ++in_flight;
            if (backoff) ++throttled;
            bytes += charged;
        }
        unlock();
        was_throttled = backoff;
        return ok;
    }
    void release(bool was_throttled, std::uint64_t charged) {
        lock();
        bytes -= charged;
        if (was_throttled) --throttled;
        --in_flight;
        unlock();
    }
    void cycle() {
        bool t = false;
        std::uint64_t c = 0;
        if (try_acquire(1000, t, c)) release(t, c);
    }
};

void BM_MutexDispatch(benchmark::State& state) {
    auto* m = new (shared_memory(sizeof(MutexDispatch))) MutexDispatch{};
    Hammer h;
    h.start(static_cast<int>(state.range(0)), [m] { m->cycle(); });
    for (auto _ : state)
        m->cycle();
    h.stop();
    benchmark::DoNotOptimize(m->in_flight);
}
BENCHMARK(BM_MutexDispatch)->ArgName("processes")->Arg(1)->Arg(2);

}  // namespace

BENCHMARK_MAIN();
