// docs/global.md's failure row "clocks", end to end: Redis's clock (what the lease script reads
// with TIME) steps forward and backward while two hosts (two segments, each with its lim-feeder
// and forked workers) take from one global rate. The hosts' clocks never enter (their lease
// deadlines are CLOCK_MONOTONIC); Redis's does, and it is stepped here by running redis-server
// under libfaketime (tests/global/stepped_redis.hpp: how, and why glibc's malloc is preloaded).
// The test checks that TIME follows the offset before relying on it, and prints "SKIPPED: ..."
// (ctest reports it skipped) where it does not.
//
// What it shows (docs/global.md, "Failure behaviour", "clocks"): the lease script runs on its
// protocol clock p, which advances at each call by what TIME advanced, at most min(grace, the
// caller's own time since its previous call). A forward step of TIME thus over-admits at most
// rate x (one refresh interval of the first caller after it) in the window around it (before p,
// the bucket refilled to the burst at once and a step longer than ttl + grace forgot every live
// lease: 8.6-10.8 tokens over the bound per +10 s step here); a backward step never over-admits
// and stops the refill for one call at most (before p: until TIME caught up, 3 s here).
#include <doctest/doctest.h>

#if LIM_TEST_HIREDIS
#include <hiredis/hiredis.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "global/feeder_harness.hpp"
#include "global/redis_fixture.hpp"
#include "global/stepped_redis.hpp"
#include "lim/lim.hpp"
#include "support/admissions.hpp"
#include "support/process.hpp"

namespace {

using namespace std::chrono_literals;
using namespace lim::test::multihost;
using lim::test::Admission;

std::int64_t realtime_us() {
    timespec ts{};
    ::clock_gettime(CLOCK_REALTIME, &ts);
    return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000 + ts.tv_nsec / 1000;
}

// Redis's clock as a script reads it (TIME in EVAL, as the lease script does) less this
// machine's real time, in seconds: between `lo` and `hi` (Redis read TIME somewhere between
// this thread's two readings of its own clock, which a loaded machine may run far apart).
struct Offset {
    double lo = 0;
    double hi = 0;
    double mid() const { return (lo + hi) / 2; }
};

// Nullopt if the call fails.
std::optional<Offset> redis_clock_offset(redisContext* c) {
    const std::int64_t before = realtime_us();
    auto* r = static_cast<redisReply*>(redisCommand(c, "EVAL %s 0", "return redis.call('TIME')"));
    const std::int64_t after = realtime_us();
    if (r == nullptr) return std::nullopt;
    std::optional<Offset> out;
    if (r->type == REDIS_REPLY_ARRAY && r->elements == 2) {
        const std::int64_t server =
            std::stoll(r->element[0]->str) * 1'000'000 + std::stoll(r->element[1]->str);
        out = Offset{static_cast<double>(server - after) / 1e6,
                     static_cast<double>(server - before) / 1e6};
    }
    freeReplyObject(r);
    return out;
}

// The lease script's protocol clock p as a call now could make it at most (the stored p plus what
// TIME advanced since the last call, between 0 and grace), in microseconds; nullopt if the state
// is not there yet.
std::optional<std::int64_t> protocol_clock(redisContext* c) {
    auto* r = static_cast<redisReply*>(redisCommand(
        c, "EVAL %s 1 %s",
        "local t = redis.call('TIME') "
        "local now = tonumber(t[1]) * 1000000 + tonumber(t[2]) "
        "local s = redis.call('HMGET', KEYS[1], 'p', 'last', 'grace') "
        "if not s[1] then return -1 end "
        "return tonumber(s[1]) + math.max(0, math.min(now - tonumber(s[2]), tonumber(s[3])))",
        ("lim:global2:{" + std::string(kKey) + "}").c_str()));
    if (r == nullptr) return std::nullopt;
    std::optional<std::int64_t> out;
    if (r->type == REDIS_REPLY_INTEGER && r->integer >= 0) out = r->integer;
    freeReplyObject(r);
    return out;
}

// Whether the offset can be `expected` (within 0.5 s).
bool near(std::optional<Offset> offset, double expected) {
    return offset && offset->hi > expected - 0.5 && offset->lo < expected + 0.5;
}

double shown(std::optional<Offset> offset) {
    return offset ? offset->mid() : -1e9;
}

}  // namespace

TEST_CASE(
    "Redis's clock steps forward and back: at most rate x one refresh more per forward step") {
    const std::string dir = make_dir("clock");
    std::string why_not;
    const auto redis = lim::test::SteppedRedis::start(dir, why_not);
    if (!redis) {
        MESSAGE(why_not);
        return;
    }
    const timeval tv{2, 0};
    redisContext* c = redisConnectWithTimeout("127.0.0.1", redis->port(), tv);
    REQUIRE(c != nullptr);
    REQUIRE(c->err == 0);
    // Does a script's TIME follow the offset? +10 s, then back to +0 (before any state exists).
    const std::optional<Offset> at_zero = redis_clock_offset(c);
    redis->set_offset(10);
    const std::optional<Offset> at_ten = redis_clock_offset(c);
    redis->set_offset(0);
    const std::optional<Offset> back_at_zero = redis_clock_offset(c);
    if (!near(at_zero, 0) || !near(at_ten, 10) || !near(back_at_zero, 0)) {
        MESSAGE("SKIPPED: libfaketime does not shift Redis's TIME: offsets seen "
                << shown(at_zero) << ", " << shown(at_ten) << ", " << shown(back_at_zero)
                << " s for 0, +10, 0");
        redisFree(c);
        return;
    }

    constexpr int kHosts = 2;
    constexpr int kWorkersPerHost = 2;
    constexpr int kWorkers = kHosts * kWorkersPerHost;
    std::vector<std::unique_ptr<lim::test::SegmentGuard>> guards;
    const std::vector<std::unique_ptr<Host>> hosts =
        start_hosts(kHosts, "clock", dir, redis->port(), guards);  // burst 20, 100/s
    lim::test::AdmissionLog log(kWorkers, kPerWorker);
    auto* counts = lim::test::shared_array<std::int64_t>(kWorkers);
    auto* modes = lim::test::shared_array<std::atomic<int>>(kWorkers);  // paced_worker's modes
    for (int w = 0; w < kWorkers; ++w)
        new (modes + w) std::atomic<int>(0);
    std::vector<pid_t> pids;
    for (int w = 0; w < kWorkers; ++w) {
        Admission* part = log.part(w);
        std::int64_t* count = counts + w;
        const std::string segment = hosts[static_cast<std::size_t>(w / kWorkersPerHost)]->segment;
        const std::atomic<int>* mode = modes + w;
        pids.push_back(lim::test::fork_child(
            [segment, mode, part, count] { return paced_worker(segment, mode, part, count); }));
    }
    const auto set_modes = [&](int first_of_host, int second_of_host) {
        for (int w = 0; w < kWorkers; ++w)
            modes[w].store(w % kWorkersPerHost == 0 ? first_of_host : second_of_host);
    };

    // F1: the hosts idle past the fence (1 s) until the bucket is full (the burst), then busy:
    // they spend the burst, and their asks grow to it; 400 ms later Redis's clock steps 10 s
    // forward (more than ttl + grace). Before the protocol clock, every live lease was forgotten
    // and the bucket was full again at once; now p advances by at most one caller's interval.
    // (The 400 ms, and until they spent 10: up to 30 s, a loaded machine runs them late.)
    std::this_thread::sleep_for(2200ms);
    const std::int64_t busy1 = now_ns();
    set_modes(2, 2);
    std::this_thread::sleep_for(400ms);
    REQUIRE(lim::test::eventually(
        [&] { return admitted_since(log, counts, 0, kWorkers, busy1) >= 10; }, 30s));
    // The real time between the two readings of p, at least: stamped after the first and before
    // the second (so a late stamp only makes the measured advance of p ahead of it larger).
    const std::optional<std::int64_t> p_before1 = protocol_clock(c);
    const std::int64_t step1 = now_ns();
    redis->set_offset(10);
    const std::optional<Offset> after_step1 = redis_clock_offset(c);
    std::this_thread::sleep_for(300ms);
    const std::int64_t after1 = now_ns();
    const std::optional<std::int64_t> p_after1 = protocol_clock(c);
    std::this_thread::sleep_for(300ms);

    // B: Redis's clock steps 3 s back (to real + 7 s) with both hosts busy. Before the protocol
    // clock the refill stopped until TIME was past the last refill time again (3 s); now p stops
    // for the one call that straddles the step, and the rate goes on.
    constexpr int kBack = 3;
    const std::optional<std::int64_t> p_before2 = protocol_clock(c);
    const std::int64_t step2 = now_ns();
    redis->set_offset(10 - kBack);
    const std::optional<Offset> after_step2 = redis_clock_offset(c);
    std::this_thread::sleep_for(std::chrono::seconds{kBack} + 800ms);
    const std::int64_t after2 = now_ns();
    const std::optional<std::int64_t> p_after2 = protocol_clock(c);

    // F2: each host spends 40/s with one worker (so each holds a lease of about 8 tokens, the
    // bucket the rest), then the clock steps 10 s forward again as all workers get busy. Before
    // the protocol clock the leases were forgotten and the bucket refilled to the burst, and the
    // hosts spent both; now the leases live on and the refill adds at most one interval's worth.
    const std::int64_t paced2 = now_ns();
    set_modes(1, 0);
    std::this_thread::sleep_for(1000ms);
    const std::optional<std::int64_t> p_before3 = protocol_clock(c);
    const std::int64_t step3 = now_ns();
    redis->set_offset(20 - kBack);
    set_modes(2, 2);
    const std::optional<Offset> after_step3 = redis_clock_offset(c);
    std::this_thread::sleep_for(300ms);
    const std::int64_t after3 = now_ns();
    const std::optional<std::int64_t> p_after3 = protocol_clock(c);
    std::this_thread::sleep_for(700ms);
    const std::int64_t end = now_ns();

    set_modes(3, 3);
    for (const pid_t p : pids)
        CHECK(lim::test::wait_child(p) == 0);
    for (auto& h : hosts) {
        const int status = h->feeder.stop(SIGTERM);
        CHECK(WIFEXITED(status));
        CHECK(WEXITSTATUS(status) == 0);
    }
    redisFree(c);
    redis->server().kill();

    // The steps happened as Redis's scripts see them.
    CHECK(near(after_step1, 10));
    CHECK(near(after_step2, 10 - kBack));
    CHECK(near(after_step3, 20 - kBack));

    std::vector<Admission> all;
    for (int w = 0; w < kWorkers; ++w)
        all.insert(all.end(), log.part(w), log.part(w) + counts[w]);
    const auto between = [&](std::int64_t lo, std::int64_t hi) {
        std::vector<Admission> out;
        for (const Admission& a : all) {
            if (a.before_ns >= lo && a.after_ns <= hi) out.push_back(a);
        }
        return out;
    };
    // Worst excess over burst + rate x T (tokens; 1 of rounding allowed) over every window of
    // the admissions in [lo, hi].
    const auto excess = [&](std::int64_t lo, std::int64_t hi) {
        const std::vector<Admission> part = between(lo, hi);
        return lim::test::check_bucket(part, kBurst * 10'000, kRate * 10'000, 10'000, part.size())
                   .worst_excess_units /
               10'000.0;
    };
    const double f1 = excess(0, step2);
    const double back = excess(step2, paced2);
    const double f2 = excess(paced2, end);
    const double overall = excess(0, end);
    // Over the 2.8 s after the step back, in every 500 ms window (10 ms apart): the fewest
    // admitted (before the protocol clock: 2-3 tokens in 2.7 s; printed).
    constexpr std::int64_t kWindow = 500'000'000;
    std::size_t fewest = all.size();
    std::int64_t fewest_at = 0;
    for (std::int64_t t = step2; t + kWindow <= step2 + 2'800'000'000LL; t += 10'000'000) {
        const std::size_t n = count_between(all, t, t + kWindow);
        if (n < fewest) {
            fewest = n;
            fewest_at = t - step2;
        }
    }
    const std::size_t after_back = count_between(all, step2, paced2);
    // How far the protocol clock ran ahead of real time across each forward step (us; the
    // first call after the step may add up to min(grace, its caller's interval), 50 ms here).
    const auto p_ahead = [](std::optional<std::int64_t> before, std::optional<std::int64_t> after,
                            std::int64_t real_ns) {
        return before && after ? static_cast<double>(*after - *before - real_ns / 1000) / 1e3
                               : -1e9;
    };
    const double ahead1 = p_ahead(p_before1, p_after1, after1 - step1);
    const double ahead3 = p_ahead(p_before3, p_after3, after3 - step3);
    // Across the step back: how far p fell behind real time (before p, it stopped until TIME
    // caught up: kBack s; now for the one call that straddles the step).
    const double behind2 = -p_ahead(p_before2, p_after2, after2 - step2);
    const auto s = [](std::int64_t ns) { return static_cast<double>(ns) / 1e9; };
    MESSAGE(all.size() << " admitted over " << kHosts << " hosts (burst " << kBurst << ", " << kRate
                       << "/s). Worst window excess over burst + rate x T, tokens: "
                       << "forward step of 10 s with the bucket just spent (F1) " << f1
                       << "; backward step of " << kBack << " s (B) " << back
                       << "; forward step of 10 s with leases outstanding (F2) " << f2
                       << "; over the whole run " << overall);
    MESSAGE("protocol clock ahead of real time across the step, ms: F1 "
            << ahead1 << ", F2 " << ahead3 << " (at most min(grace, one refresh) = 50 ms, plus "
            << "the lateness of that caller's tick); behind it across the step back: " << behind2
            << " ms");
    MESSAGE("F1: " << count_between(all, busy1, step1) << " admitted in the " << s(step1 - busy1)
                   << " s busy before the step, " << count_between(all, step1, step1 + 300'000'000)
                   << " in the 0.3 s after");
    MESSAGE("B: " << after_back << " admitted in the " << s(paced2 - step2)
                  << " s after the step back; the fewest in a 0.5 s window: " << fewest << " (at +"
                  << s(fewest_at) << " s)");
    MESSAGE("F2: " << count_between(all, paced2, step3) << " admitted in the 1 s paced, "
                   << count_between(all, step3, step3 + 300'000'000)
                   << " in the 0.3 s after the step");

    // A forward step over-admits at most rate x (the interval of the first caller after it: the
    // refresh, 50 ms, or longer by as much as its tick came late, which is what p ran ahead of
    // real time across the step, measured above; never more than grace, 500 ms), + a 25 ms
    // margin: 7.5 tokens here on time (before the protocol clock: 8.6-10.8 per step).
    const auto per_step = [&](double ahead_ms) {
        return kRate * (std::clamp(ahead_ms, 50.0, 500.0) + 25) / 1000;
    };
    CHECK(f1 <= per_step(ahead1));
    CHECK(f2 <= per_step(ahead3));
    CHECK(overall <= per_step(ahead1) + per_step(ahead3));
    // A backward step never over-admits, and stops the refill briefly at most (one call): p,
    // which the refill runs on, kept up with real time but for far less than the kBack s it
    // lost before (a feeder's tick more than grace late loses the rest: 1.5 s of slack for a
    // loaded machine). The admissions' fewest in a window is printed only: it is scheduling.
    CHECK(back <= 0);
    CHECK(behind2 < 1500);
    CHECK(after_back > 0);
    // The scenario happened: busy hosts spent the burst before the first step (waited for).
    CHECK(count_between(all, busy1, step1) >= 10);

    for (auto& h : hosts)
        std::remove(("/dev/shm/lim-feeder." + h->segment + ".lock").c_str());
    std::remove((dir + "/redis.log").c_str());
    std::remove((dir + "/faketime.rc").c_str());
}

#endif  // LIM_TEST_HIREDIS
