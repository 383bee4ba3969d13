// The façades' hot paths against the atomic floor (issue 11): TokenBucket::try_take against one
// bare CAS, Throttle try_start_job + finish_job against a bare CAS pair, each also against the
// same semantics under a robust process-shared mutex, alone and with a second process
// contending (pinned to another CPU).
//
//   bare_cas            one CAS loop taking a unit from a shared counter (a token bucket's floor)
//   bare_cas_pair       a CAS loop taking and one giving back (a throttle's floor)
//   mutex_bucket        a token bucket (refill from elapsed time) under a robust mutex
//   mutex_slots         a counting semaphore under a robust mutex: lock/take/unlock,
//   lock/give/unlock token_bucket        lim::TokenBucket::try_take(now, 1) throttle
//   lim::Throttle::try_start_job(now) + finish_job(now)
//
// "explicit_now" passes a time advanced by 1 us per call, starting well in the past (a limiter
// clamps a `now` ahead of the clock); "clock" reads lim::Clock in each call. Rates are high
// enough that the refill never limits the loop. The same file builds against older trees, for
// before/after numbers in one run:
//
//   build/rel/bench/limiter_fast_bench --benchmark_min_time=0.3 --benchmark_repetitions=3
//       --benchmark_report_aggregates_only=true
//
// Measured while writing issue 11's Limiter part (2 vCPUs shared with ~7 builds, load ~13: CPU
// time per iteration, medians of 3, base = ee58dff built the same way, runs interleaved):
//
//   benchmark (contended:0)          base (2 runs)   after (2 runs)
//   bare_cas                         15.4  14.5      13.7  15.5
//   bare_cas_pair                    28.1  28.7      26.7  30.0
//   token_bucket_explicit_now        49.4  49.8      33.0  38.4     ratio to CAS 3.3 -> 2.4
//   throttle_explicit_now            64.4  49.9      58.7  65.0     ratio to pair ~2.0 -> ~2.2
//   mutex_bucket_clock / token_bucket_clock: both dominated by Clock::now() (~40 ns here)
#include <benchmark/benchmark.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

#include "lim/segment.hpp"
#include "lim/throttle.hpp"
#include "lim/token_bucket.hpp"

namespace {

__extension__ using u128 = unsigned __int128;

void* shared_memory(std::size_t n) {
    void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    return p;
}

struct alignas(64) BareCounter {
    std::atomic<std::int64_t> in_use{0};
    std::int64_t capacity = 1'000'000'000'000;
    bool try_take() {
        std::int64_t v = in_use.load(std::memory_order_relaxed);
        do {
            if (v >= capacity) return false;
        } while (!in_use.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel,
                                               std::memory_order_relaxed));
        return true;
    }
    void give_back() {
        std::int64_t v = in_use.load(std::memory_order_relaxed);
        while (!in_use.compare_exchange_weak(v, v - 1, std::memory_order_acq_rel,
                                             std::memory_order_relaxed)) {
        }
    }
};

// A robust process-shared mutex around plain state.
struct alignas(64) RobustMutex {
    pthread_mutex_t m;
    void init() {
        pthread_mutexattr_t a;
        pthread_mutexattr_init(&a);
        pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
        pthread_mutex_init(&m, &a);
        pthread_mutexattr_destroy(&a);
    }
    void lock() {
        if (pthread_mutex_lock(&m) == EOWNERDEAD) pthread_mutex_consistent(&m);
    }
    void unlock() { pthread_mutex_unlock(&m); }
};

// A token bucket in units (1/10,000 token) under the mutex: refill from the elapsed time.
struct MutexBucket {
    RobustMutex mu;
    std::int64_t tokens = 0, burst = 0, rate_units_per_sec = 0, last_ns = 0;
    bool try_take(std::int64_t now_ns, std::int64_t n) {
        mu.lock();
        if (now_ns > last_ns) {
            const auto add = static_cast<std::int64_t>(static_cast<u128>(now_ns - last_ns) *
                                                       rate_units_per_sec / 1'000'000'000);
            tokens = std::min(burst, tokens + add);
            last_ns = now_ns;
        }
        const bool ok = tokens >= n;
        if (ok) tokens -= n;
        mu.unlock();
        return ok;
    }
};

struct MutexSlots {
    RobustMutex mu;
    std::int64_t in_use = 0, capacity = 0;
    bool take() {
        mu.lock();
        const bool ok = in_use < capacity;
        if (ok) ++in_use;
        mu.unlock();
        return ok;
    }
    void give_back() {
        mu.lock();
        --in_use;
        mu.unlock();
    }
};

constexpr double kBurst = 1000;
constexpr double kRate = 1e7;  // 10 tokens per explicit-now step of 1 us

struct World {
    std::string name = "lim-fast-bench-" + std::to_string(::getpid());
    lim::Segment segment =
        lim::Segment::open_or_create(name, {.max_limiters = 16, .max_processes = 64});
    lim::TimePoint past = lim::Clock::now() - std::chrono::seconds{100'000};
    lim::TokenBucket tb = lim::TokenBucket::open(
        segment, "tb",
        {.burst_size = kBurst, .sustained_rate_per_sec = kRate, .initial_bucket_level = kBurst},
        past);
    lim::TokenBucket tb_clock = lim::TokenBucket::open(
        segment, "tb-clock",
        {.burst_size = kBurst, .sustained_rate_per_sec = 1e9, .initial_bucket_level = kBurst});
    lim::Throttle throttle =
        lim::Throttle::open(segment, "throttle", {.max_concurrent_jobs = 1000});
    BareCounter* bare = new (shared_memory(sizeof(BareCounter))) BareCounter{};
    MutexBucket* mutex_bucket = new (shared_memory(sizeof(MutexBucket))) MutexBucket{};
    MutexSlots* mutex_slots = new (shared_memory(sizeof(MutexSlots))) MutexSlots{};

    World() {
        mutex_bucket->mu.init();
        mutex_bucket->burst = mutex_bucket->tokens = static_cast<std::int64_t>(kBurst) * 10'000;
        mutex_bucket->rate_units_per_sec = static_cast<std::int64_t>(1e9) * 10'000;
        mutex_slots->mu.init();
        mutex_slots->capacity = 1000;
    }
    ~World() { lim::Segment::remove(name); }
};

World& world() {
    static World w;
    return w;
}

void pin_to(int cpu) {
    const long n = ::sysconf(_SC_NPROCESSORS_ONLN);
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(static_cast<int>(cpu % (n > 0 ? n : 1)), &set);
    ::sched_setaffinity(0, sizeof set, &set);
}

template <class Op>
void run(benchmark::State& state, Op op) {
    const bool contended = state.range(0) != 0;
    pin_to(0);
    struct Flags {
        std::atomic<int> ready, stop;
    };
    auto* flags = new (shared_memory(sizeof(Flags))) Flags{{0}, {0}};
    pid_t child = -1;
    if (contended) {
        child = ::fork();
        if (child == 0) {
            pin_to(1);
            flags->ready.store(1);
            while (flags->stop.load(std::memory_order_relaxed) == 0)
                op();
            ::_exit(0);
        }
        while (flags->ready.load() == 0) {
        }
    }
    std::int64_t ok = 0;
    for (auto _ : state)
        ok += op() ? 1 : 0;
    state.SetItemsProcessed(state.iterations());
    state.counters["ok"] = static_cast<double>(ok) /
                           static_cast<double>(std::max<std::int64_t>(1, state.iterations()));
    if (contended) {
        flags->stop.store(1);
        int status = 0;
        ::waitpid(child, &status, 0);
    }
    ::munmap(flags, sizeof(Flags));
}

lim::TimePoint next_explicit_now() {
    static lim::TimePoint t = world().past;
    return t += std::chrono::microseconds{1};
}

void bare_cas(benchmark::State& state) {
    auto& w = world();
    run(state, [&] { return w.bare->try_take(); });  // 10^12 units: never runs out
}
void bare_cas_pair(benchmark::State& state) {
    auto& w = world();
    run(state, [&] {
        if (!w.bare->try_take()) return false;
        w.bare->give_back();
        return true;
    });
}
void mutex_bucket_clock(benchmark::State& state) {
    auto& w = world();
    run(state, [&] { return w.mutex_bucket->try_take(lim::to_nanos(lim::Clock::now()), 10'000); });
}
void mutex_slots(benchmark::State& state) {
    auto& w = world();
    run(state, [&] {
        if (!w.mutex_slots->take()) return false;
        w.mutex_slots->give_back();
        return true;
    });
}
void token_bucket_explicit_now(benchmark::State& state) {
    auto& w = world();
    run(state, [&] { return w.tb.try_take(next_explicit_now(), 1) == lim::TryTake::taken; });
}
void token_bucket_clock(benchmark::State& state) {
    auto& w = world();
    run(state, [&] { return w.tb_clock.try_take(1) == lim::TryTake::taken; });
}
void throttle_explicit_now(benchmark::State& state) {
    auto& w = world();
    run(state, [&] {
        const lim::TimePoint now = next_explicit_now();
        if (w.throttle.try_start_job(now) != lim::StartJob::start()) return false;
        w.throttle.finish_job(now);
        return true;
    });
}
void throttle_clock(benchmark::State& state) {
    auto& w = world();
    run(state, [&] {
        if (w.throttle.try_start_job() != lim::StartJob::start()) return false;
        w.throttle.finish_job();
        return true;
    });
}

void both(benchmark::internal::Benchmark* b) {
    b->ArgName("contended")->Arg(0)->Arg(1)->UseRealTime();
}
void alone(benchmark::internal::Benchmark* b) {
    b->ArgName("contended")->Arg(0)->UseRealTime();
}

}  // namespace

BENCHMARK(bare_cas)->Apply(both);
BENCHMARK(bare_cas_pair)->Apply(both);
BENCHMARK(mutex_bucket_clock)->Apply(both);
BENCHMARK(mutex_slots)->Apply(both);
BENCHMARK(token_bucket_explicit_now)->Apply(alone);
BENCHMARK(token_bucket_clock)->Apply(both);
BENCHMARK(throttle_explicit_now)->Apply(alone);
BENCHMARK(throttle_clock)->Apply(both);

BENCHMARK_MAIN();
