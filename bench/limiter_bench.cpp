// try_take + return_to_hopper on lim::Limiter, beside the alternatives, in one run:
//
//   bare_cas        a counter in shared memory taken and returned with a CAS loop each: the
//                   least any shared limiter can cost (no rate, no hopper, no ledger)
//   mutex/...       the seed's sequential algorithm (advance time, then take or return) on the
//                   same shared state under a robust process-shared pthread mutex
//   limiter/...     lim::Limiter: throttled rate limiter (finite rate and target), token bucket
//                   with returns (finite rate, infinite hopper), throttle (infinite rate)
//
// "explicit_now" passes a time advanced by 1 us per iteration (the algorithm alone, one
// process); "clock" reads lim::Clock in each call, as try_take(n) does. "contended:1" runs the
// same loop in a second, forked process meanwhile: two processes on one record. Times are wall
// time per take + return in the measuring process.
//
//   build/release/bench/limiter_bench --benchmark_min_time=0.5 --benchmark_repetitions=5
//       --benchmark_report_aggregates_only=true       (one command line)
#include <benchmark/benchmark.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "lim/limiter.hpp"
#include "lim/segment.hpp"
#include "limiter/limiter_state.hpp"

namespace {

void* shared_memory(std::size_t n) {
    void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    return p;
}

// ---- the baselines --------------------------------------------------------------------------

struct alignas(64) BareCounter {
    std::atomic<std::int64_t> in_use;
    std::int64_t capacity;

    bool try_take() noexcept {
        std::int64_t v = in_use.load(std::memory_order_relaxed);
        do {
            if (v + 1 > capacity) return false;
        } while (!in_use.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel,
                                               std::memory_order_relaxed));
        return true;
    }
    void give_back() noexcept {
        std::int64_t v = in_use.load(std::memory_order_relaxed);
        while (!in_use.compare_exchange_weak(v, v - 1, std::memory_order_acq_rel,
                                             std::memory_order_relaxed)) {
        }
    }
};

// Jane Street's Limiter as the seed describes it, sequential, in shared memory behind a robust
// process-shared mutex. Finite rate and target; units of 1/10,000 token.
struct alignas(64) MutexLimiter {
    pthread_mutex_t mutex;
    lim::detail::DripRate drip;
    std::int64_t start_ns, time_ns, dripped, in_bucket, in_hopper, in_flight, bucket_size, target;

    void init(double rate, std::int64_t size, std::int64_t level, std::int64_t now) {
        pthread_mutexattr_t a;
        pthread_mutexattr_init(&a);
        pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
        pthread_mutex_init(&mutex, &a);
        pthread_mutexattr_destroy(&a);
        drip = lim::detail::DripRate::from_rate(rate);
        start_ns = time_ns = now;
        dripped = 0;
        in_bucket = level;
        in_hopper = 0;
        in_flight = 0;
        bucket_size = size;
        target = level;
    }
    void lock() noexcept {
        if (pthread_mutex_lock(&mutex) == EOWNERDEAD) pthread_mutex_consistent(&mutex);
    }
    void unlock() noexcept { pthread_mutex_unlock(&mutex); }
    void advance(std::int64_t now) noexcept {
        if (now > time_ns) time_ns = now;
        const std::int64_t total = drip.units_after(time_ns - start_ns);
        const std::int64_t fall = total - dripped;
        dripped = total;
        const std::int64_t move = std::min({fall, in_hopper, bucket_size - in_bucket});
        if (move > 0) {
            in_bucket += move;
            in_hopper -= move;
        }
    }
    bool try_take(std::int64_t now, std::int64_t n) noexcept {
        lock();
        advance(now);
        const bool ok = n <= in_bucket;
        if (ok) {
            in_bucket -= n;
            in_flight += n;
        }
        unlock();
        return ok;
    }
    void return_to_hopper(std::int64_t now, std::int64_t n) noexcept {
        lock();
        advance(now);
        const std::int64_t excess = in_flight + in_hopper + in_bucket - target;
        const std::int64_t dropped = excess > 0 ? std::min(n, excess) : 0;
        in_flight -= n;
        in_hopper += n - dropped;
        unlock();
    }
};

// ---- fixtures -------------------------------------------------------------------------------

lim::Limiter open_limiter(const lim::Segment& segment, const char* key,
                          lim::InfiniteOrFinite<double> rate, double bucket,
                          lim::InfiniteOrFinite<double> hopper) {
    return lim::Limiter::open(segment, key,
                              {.hopper_to_bucket_rate_per_sec = rate,
                               .bucket_size = bucket,
                               .initial_bucket_level = bucket,
                               .initial_hopper_level = hopper});
}

// Each configuration twice: the explicit-now runs move a limiter's time ahead of the clock, so
// the clock runs need their own. Rates are high enough that the refill never limits the loop
// (10 tokens per explicit-now step of 1 us; 10^8/s with the clock).
struct World {
    std::string name = "lim-bench-" + std::to_string(::getpid());
    lim::Segment segment =
        lim::Segment::open_or_create(name, {.max_limiters = 16, .max_processes = 64});
    // Throttled rate limiter, 1000 tokens all in the bucket: the hopper is empty, so every
    // return must fold the drip it missed (4 read-modify-writes per take + return).
    lim::Limiter trl = open_limiter(segment, "trl", 1e7, 1000, 0.0);
    lim::Limiter trl_clock = open_limiter(segment, "trl-clock", 1e8, 1000, 0.0);
    // Throttled rate limiter whose hopper holds tokens (burst 100 of 1000 jobs): returns need no
    // fold (3 read-modify-writes).
    lim::Limiter trl_hopper = open_limiter(segment, "trl-hopper", 1e7, 100, 900.0);
    // Token bucket whose tokens are returned: infinite hopper (3 read-modify-writes).
    lim::Limiter tb = open_limiter(segment, "tb", 1e7, 1000, lim::infinite);
    lim::Limiter tb_clock = open_limiter(segment, "tb-clock", 1e8, 1000, lim::infinite);
    // Throttle: infinite rate (2 read-modify-writes).
    lim::Limiter throttle = open_limiter(segment, "throttle", lim::infinite, 1000, 0.0);
    lim::Limiter throttle_clock = open_limiter(segment, "throttle-clock", lim::infinite, 1000, 0.0);
    BareCounter* bare = new (shared_memory(sizeof(BareCounter))) BareCounter{{0}, 1000};
    MutexLimiter* mutex = static_cast<MutexLimiter*>(shared_memory(sizeof(MutexLimiter)));
    MutexLimiter* mutex_clock = static_cast<MutexLimiter*>(shared_memory(sizeof(MutexLimiter)));

    World() {
        const std::int64_t now = lim::to_nanos(lim::Clock::now());
        mutex->init(1e7, 1000 * 10'000, 1000 * 10'000, now);
        mutex_clock->init(1e8, 1000 * 10'000, 1000 * 10'000, now);
    }
    ~World() { lim::Segment::remove(name); }
};

World& world() {
    static World w;
    return w;
}

// Pins the calling process to `cpu` (modulo the CPUs there are), so that "contended" means two
// cores fighting over one cache line, not two processes taking turns on one core.
void pin_to(int cpu) {
    const long n = ::sysconf(_SC_NPROCESSORS_ONLN);
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(static_cast<int>(cpu % (n > 0 ? n : 1)), &set);
    ::sched_setaffinity(0, sizeof set, &set);
}

// Runs `op` in the benchmark loop; with `contended`, also in a forked process meanwhile.
template <class Op>
void run(benchmark::State& state, bool contended, Op op) {
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
    std::int64_t taken = 0;
    for (auto _ : state)
        taken += op() ? 1 : 0;
    state.SetItemsProcessed(state.iterations());
    // The share of iterations whose take succeeded: the loop measures takes and returns, not
    // refusals.
    state.counters["taken"] = static_cast<double>(taken) /
                              static_cast<double>(std::max<std::int64_t>(1, state.iterations()));
    if (contended) {
        flags->stop.store(1);
        int status = 0;
        ::waitpid(child, &status, 0);
    }
    ::munmap(flags, sizeof(Flags));
}

// One try_take of a token and, if taken, its return.
bool take_return(lim::Limiter& l, lim::TimePoint now) {
    if (l.try_take(now, 1.0) != lim::TryTake::taken) return false;
    l.return_to_hopper(now, 1.0);
    return true;
}

bool mutex_take_return(MutexLimiter& m, std::int64_t now) {
    if (!m.try_take(now, 10'000)) return false;
    m.return_to_hopper(now, 10'000);
    return true;
}

// A time that advances 1 us per call. (Single process only: two processes each advancing their
// own would take turns running the limiter's time ahead of the other.)
lim::TimePoint next_explicit_now() {
    static std::int64_t t = lim::to_nanos(lim::Clock::now());
    return lim::from_nanos(t += 1000);
}

bool contended(const benchmark::State& state) {
    return state.range(0) != 0;
}

void bare_cas(benchmark::State& state) {
    auto& w = world();
    run(state, contended(state), [&] {
        if (!w.bare->try_take()) return false;
        w.bare->give_back();
        return true;
    });
}

void mutex_explicit_now(benchmark::State& state) {
    auto& w = world();
    run(state, false,
        [&] { return mutex_take_return(*w.mutex, lim::to_nanos(next_explicit_now())); });
}
void limiter_trl_explicit_now(benchmark::State& state) {
    auto& w = world();
    run(state, false, [&] { return take_return(w.trl, next_explicit_now()); });
}
void limiter_trl_hopper_explicit_now(benchmark::State& state) {
    auto& w = world();
    run(state, false, [&] { return take_return(w.trl_hopper, next_explicit_now()); });
}
void limiter_token_bucket_explicit_now(benchmark::State& state) {
    auto& w = world();
    run(state, false, [&] { return take_return(w.tb, next_explicit_now()); });
}
void limiter_throttle_explicit_now(benchmark::State& state) {
    auto& w = world();
    run(state, false, [&] { return take_return(w.throttle, next_explicit_now()); });
}

void mutex_clock(benchmark::State& state) {
    auto& w = world();
    run(state, contended(state),
        [&] { return mutex_take_return(*w.mutex_clock, lim::to_nanos(lim::Clock::now())); });
}
void limiter_trl_clock(benchmark::State& state) {
    auto& w = world();
    run(state, contended(state), [&] { return take_return(w.trl_clock, lim::Clock::now()); });
}
void limiter_token_bucket_clock(benchmark::State& state) {
    auto& w = world();
    run(state, contended(state), [&] { return take_return(w.tb_clock, lim::Clock::now()); });
}
void limiter_throttle_clock(benchmark::State& state) {
    auto& w = world();
    run(state, contended(state), [&] { return take_return(w.throttle_clock, lim::Clock::now()); });
}

void both(benchmark::internal::Benchmark* b) {
    b->ArgName("contended")->Arg(0)->Arg(1)->UseRealTime();
}
void alone(benchmark::internal::Benchmark* b) {
    b->ArgName("contended")->Arg(0)->UseRealTime();
}

}  // namespace

BENCHMARK(bare_cas)->Apply(both);
BENCHMARK(mutex_explicit_now)->Apply(alone);
BENCHMARK(limiter_trl_explicit_now)->Apply(alone);
BENCHMARK(limiter_trl_hopper_explicit_now)->Apply(alone);
BENCHMARK(limiter_token_bucket_explicit_now)->Apply(alone);
BENCHMARK(limiter_throttle_explicit_now)->Apply(alone);
BENCHMARK(mutex_clock)->Apply(both);
BENCHMARK(limiter_trl_clock)->Apply(both);
BENCHMARK(limiter_token_bucket_clock)->Apply(both);
BENCHMARK(limiter_throttle_clock)->Apply(both);

BENCHMARK_MAIN();
