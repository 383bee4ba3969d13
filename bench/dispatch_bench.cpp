// Dispatch acquire+release against the baselines a user would reach for, in one run:
//
//   BM_BareFetchAddPair      fetch_add + fetch_sub on one shared word: the floor for any
//                            counter shared through memory
//   BM_Dispatch              lim::Dispatch acquire(bytes) + Permit release: three layers
//                            (concurrency, throttled under backoff, bytes), ledger included
//   BM_MutexDispatch         the same three-layer semantics (backoff check, concurrency, bytes)
//                            as plain counters under a robust process-shared pthread mutex
//
// And the steps of the Dispatch path, for the breakdown in docs/design.md ("Where the time
// goes"):
//   BM_BareCasPair           two compare-and-swaps on one word: the floor for a permit that is
//                            one CAS each way (what a packed Dispatch does)
//   BM_HoldPair              two Hold announcements (acquire's and release's) and nothing else:
//                            the thread's slot lookup and the `pending` stores
//   BM_SemaphorePair         lim::Semaphore try_acquire + release: Hold, one CAS, one ledger store
//                            each way, through the shared library
//   BM_DispatchTry           Dispatch::try_acquire + Permit release (no blocking path)
//
// Blocking hand-off (issue 11): P processes each loop acquire, ~200 ns of work, release, on a
// lim::Semaphore and on a process-shared sem_t of capacity C. `ops` is the total rate over all
// processes; the time per iteration is the parent's.
//   BM_HandoffLim / BM_HandoffSemT   args: capacity, processes
//
// Each runs uncontended (1 process) and with a second process hammering the same object
// (2 processes; the figure is the parent's time per acquire+release). Results and the command:
// docs/benchmarks.md.
#include <pthread.h>
#include <semaphore.h>
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
#include <vector>

#include "lim/backoff_window.hpp"
#include "lim/dispatch.hpp"
#include "lim/segment.hpp"
#include "lim/semaphore.hpp"
#include "shm/ledger.hpp"
#include "shm/records.hpp"

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

void BM_BareCasPair(benchmark::State& state) {
    auto* word = new (shared_memory(64)) std::atomic<std::uint64_t>{0};
    const auto cas_pair = [word] {
        std::uint64_t w = word->load(std::memory_order_relaxed);
        while (!word->compare_exchange_weak(w, w + 1, std::memory_order_seq_cst,
                                            std::memory_order_relaxed)) {
        }
        w = word->load(std::memory_order_relaxed);
        while (!word->compare_exchange_weak(w, w - 1, std::memory_order_seq_cst,
                                            std::memory_order_relaxed)) {
        }
    };
    Hammer h;
    h.start(static_cast<int>(state.range(0)), cas_pair);
    for (auto _ : state)
        cas_pair();
    h.stop();
    benchmark::DoNotOptimize(word->load());
}
BENCHMARK(BM_BareCasPair)->ArgName("processes")->Arg(1)->Arg(2);

// --- steps of the Dispatch path ---------------------------------------------------------------

void BM_HoldPair(benchmark::State& state) {
    const std::string name = "bench-hold-" + std::to_string(::getpid());
    lim::Segment::remove(name);
    {
        auto seg = lim::Segment::open_or_create(name, {.max_limiters = 8, .max_processes = 16});
        auto d = lim::Dispatch::open(
            seg, {.limiter = lim::BackoffWindow::for_key(seg, "api"), .key = "api"});
        lim::detail::SegmentState& st = *seg.state();
        const std::uint32_t record =
            *lim::detail::find_record(st, lim::detail::RecordKind::dispatch, "api");
        for (auto _ : state) {
            { lim::detail::Hold a(st, record); }
            { lim::detail::Hold b(st, record); }
        }
    }
    lim::Segment::remove(name);
}
BENCHMARK(BM_HoldPair);

void BM_SemaphorePair(benchmark::State& state) {
    const std::string name = "bench-sem-" + std::to_string(::getpid());
    lim::Segment::remove(name);
    {
        auto seg = lim::Segment::open_or_create(name, {.max_limiters = 8, .max_processes = 16});
        auto sem = lim::Semaphore::open(seg, "db", {.capacity = 400});
        Hammer h;
        h.start(static_cast<int>(state.range(0)), [&sem] {
            if (sem.try_acquire()) sem.release();
        });
        for (auto _ : state) {
            if (sem.try_acquire()) sem.release();
        }
        h.stop();
    }
    lim::Segment::remove(name);
}
BENCHMARK(BM_SemaphorePair)->ArgName("processes")->Arg(1)->Arg(2);

void BM_DispatchTry(benchmark::State& state) {
    const std::string name = "bench-dispatch-t-" + std::to_string(::getpid());
    lim::Segment::remove(name);
    {
        auto seg = lim::Segment::open_or_create(name, {.max_limiters = 8, .max_processes = 16});
        auto d = lim::Dispatch::open(
            seg, {.limiter = lim::BackoffWindow::for_key(seg, "api"), .key = "api"});
        Hammer h;
        h.start(static_cast<int>(state.range(0)), [&d] { auto p = d.try_acquire(1000); });
        for (auto _ : state) {
            auto p = d.try_acquire(1000);
            benchmark::DoNotOptimize(p);
        }
        h.stop();
    }
    lim::Segment::remove(name);
}
BENCHMARK(BM_DispatchTry)->ArgName("processes")->Arg(1)->Arg(2);

// --- blocking hand-off ------------------------------------------------------------------------

void spin_work() {
    for (int i = 0; i < 100; ++i)
        asm volatile("" ::: "memory");
}

// Runs `cycle` in processes - 1 children and the parent; counts every process's cycles.
template <class Cycle>
void handoff(benchmark::State& state, Cycle cycle) {
    const int processes = static_cast<int>(state.range(1));
    auto* flags = new (shared_memory(4096)) std::atomic<std::uint64_t>[3] {};
    std::atomic<std::uint64_t>& stop = flags[0];
    std::atomic<std::uint64_t>& total = flags[1];
    std::atomic<std::uint64_t>& started = flags[2];
    std::vector<pid_t> pids;
    for (int i = 1; i < processes; ++i) {
        const pid_t pid = ::fork();
        if (pid == 0) {
            started.fetch_add(1);
            std::uint64_t n = 0;
            while (stop.load(std::memory_order_relaxed) == 0) {
                cycle();
                ++n;
            }
            total.fetch_add(n);
            ::_exit(0);
        }
        pids.push_back(pid);
    }
    while (started.load() < static_cast<std::uint64_t>(processes - 1)) {
    }
    std::uint64_t mine = 0;
    for (auto _ : state) {
        cycle();
        ++mine;
    }
    stop.store(1);
    for (const pid_t pid : pids)
        ::waitpid(pid, nullptr, 0);
    state.counters["ops"] =
        benchmark::Counter(static_cast<double>(total.load() + mine), benchmark::Counter::kIsRate);
}

void BM_HandoffLim(benchmark::State& state) {
    const std::string name = "bench-handoff-" + std::to_string(::getpid());
    lim::Segment::remove(name);
    {
        auto seg = lim::Segment::open_or_create(name, {.max_limiters = 8, .max_processes = 64});
        auto sem = lim::Semaphore::open(seg, "h",
                                        {.capacity = static_cast<std::uint64_t>(state.range(0))});
        handoff(state, [&sem] {
            sem.acquire();
            spin_work();
            sem.release();
        });
    }
    lim::Segment::remove(name);
}
BENCHMARK(BM_HandoffLim)
    ->ArgNames({"capacity", "processes"})
    ->ArgsProduct({{1, 4}, {2, 8, 32}})
    ->UseRealTime();

void BM_HandoffSemT(benchmark::State& state) {
    auto* sem = static_cast<sem_t*>(shared_memory(sizeof(sem_t)));
    ::sem_init(sem, 1, static_cast<unsigned>(state.range(0)));
    handoff(state, [sem] {
        while (::sem_wait(sem) != 0) {
        }
        spin_work();
        ::sem_post(sem);
    });
    ::sem_destroy(sem);
}
BENCHMARK(BM_HandoffSemT)
    ->ArgNames({"capacity", "processes"})
    ->ArgsProduct({{1, 4}, {2, 8, 32}})
    ->UseRealTime();

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
