// The harness of the end-to-end lim-feeder tests (tests/global/*_test.cpp): hosts on one machine
// (a segment, its lim-feeder process and forked workers each), one redis-server (redis_fixture.hpp)
// and the workers' admission logs. A target that includes it defines FEEDER_PATH (the lim-feeder
// binary; tests/CMakeLists.txt).
#pragma once

#include <doctest/doctest.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "global/redis_fixture.hpp"
#include "lim/lim.hpp"
#include "support/admissions.hpp"
#include "support/process.hpp"

namespace lim::test::multihost {

using namespace std::chrono_literals;

inline constexpr double kBurst = 20;
inline constexpr double kRate = 100;  // tokens per second, over all hosts
inline constexpr const char* kKey = "api";
inline constexpr const char* kBackoffKey = "api_backoff";
inline constexpr std::size_t kPerWorker = 4000;

struct Host {
    std::string segment;
    std::string config;
    std::string log;
    ChildProcess feeder;
};

// Host `index`'s feeder.toml in `dir`: host name "host<index>", refresh 50 ms (or `refresh`),
// lease_ttl 500 ms (so grace 500 ms), the global rate kKey (burst, rate) and the global backoff
// kBackoffKey.
inline std::string write_config(const std::string& dir, int index, const std::string& segment,
                                int port, double burst = kBurst, double rate = kRate,
                                const std::string& refresh = "50ms") {
    const std::string path = dir + "/feeder" + std::to_string(index) + ".toml";
    std::ofstream out(path);
    out << "[feeder]\nsegment = \"" << segment << "\"\nredis = \"redis://127.0.0.1:" << port
        << "\"\nhost = \"host" << index << "\"\nrefresh = \"" << refresh
        << "\"\nlease_ttl = \"500ms\"\n"
        << "[global." << kKey << "]\nkind = \"rate\"\nburst_size = " << burst
        << "\nsustained_rate_per_sec = " << rate << "\n[global." << kBackoffKey
        << "]\nkind = \"backoff\"\n";
    return path;
}

inline void start_feeder(Host& h) {
    h.feeder.start({FEEDER_PATH, "--config", h.config}, h.log);
}

// Waits for the feeder to create the segment and its records (the rate, its two status records,
// the backoff: a worker never creates the rate itself), then opens the global rate as workers do.
// Nothing if they do not appear within 30 s (a loaded machine starts the feeder late).
inline std::optional<lim::TokenBucket> adopt_global_rate(const std::string& segment,
                                                         std::optional<lim::Segment>& seg) {
    const bool ready = lim::test::eventually(
        [&] {
            try {
                seg.emplace(lim::Segment::open(segment));
                return seg->info().limiters >= 4;
            } catch (const lim::Error&) {
                return false;
            }
        },
        30s);
    if (!ready) return std::nullopt;
    return lim::TokenBucket::open(
        *seg, kKey, {.burst_size = kBurst, .sustained_rate_per_sec = kRate}, lim::adopt_existing);
}

// A worker's admission count, stored after each admission (its log entry written first), so
// that the test can wait for what happened (live_count) instead of sleeping a fixed time.
inline void publish_count(std::int64_t* count, std::int64_t n) {
    std::atomic_ref<std::int64_t>(*count).store(n, std::memory_order_release);
}
inline std::int64_t live_count(std::int64_t* count) {
    return std::atomic_ref<std::int64_t>(*count).load(std::memory_order_acquire);
}

// The admissions of workers [first, last) that began at or after `since_ns`, read while they
// run (each worker's published count, then its log up to there).
inline std::int64_t admitted_since(const lim::test::AdmissionLog& log, std::int64_t* counts,
                                   int first, int last, std::int64_t since_ns) {
    std::int64_t n = 0;
    for (int w = first; w < last; ++w) {
        const std::int64_t c = live_count(counts + w);
        const Admission* part = log.part(w);
        for (std::int64_t i = c; i > 0 && part[i - 1].before_ns >= since_ns; --i)
            ++n;
    }
    return n;
}

// A worker: takes one token at a time every `pace`, logging each admission, until `stop`.
inline int worker(const std::string& segment, std::chrono::microseconds pace, bool blocking,
                  Admission* log, std::int64_t* count, const std::atomic<int>* stop) {
    std::optional<lim::Segment> seg;
    std::optional<lim::TokenBucket> global = adopt_global_rate(segment, seg);
    if (!global) return 3;
    lim::TokenBucket& tb = *global;
    std::int64_t n = 0;
    while (stop->load() == 0 && n < static_cast<std::int64_t>(kPerWorker)) {
        const std::int64_t before = lim::to_nanos(lim::Clock::now());
        // Busy workers poll; light ones block, so the feeder's raises must wake them.
        const bool taken = blocking ? tb.take_until(1, lim::Clock::now() + 300ms)
                                    : tb.try_take(1) == lim::TryTake::taken;
        const std::int64_t after = lim::to_nanos(lim::Clock::now());
        if (taken) {
            log[n++] = Admission{before, after, 10'000};
            publish_count(count, n);
        }
        std::this_thread::sleep_for(pace);
    }
    publish_count(count, n);
    return 0;
}

// Where a case keeps its configs and logs: a fresh directory /tmp/lim-feeder-<what>-XXXXXX.
inline std::string make_dir(const std::string& what) {
    std::string path = "/tmp/lim-feeder-" + what + "-XXXXXX";
    REQUIRE(::mkdtemp(path.data()) != nullptr);
    return path;
}

// A case's directory (make_dir(what), into `dir`) and a redis-server on a free port logging
// there (dir/redis.log), started. Null, and no directory, after saying that the case is skipped
// when redis-server is not installed.
inline std::unique_ptr<lim::test::RedisServer> start_redis(const std::string& what,
                                                           std::string& dir) {
    const std::string bin = lim::test::find_redis_server();
    if (bin.empty()) {
        MESSAGE("SKIPPED: redis-server is not installed (apt-get install redis-server)");
        return nullptr;
    }
    dir = make_dir(what);
    auto redis =
        std::make_unique<lim::test::RedisServer>(bin, lim::test::free_port(), dir + "/redis.log");
    REQUIRE(redis->start());
    return redis;
}

// Hosts 0..n-1: each a segment unique_name(prefix + h) (its guard appended to `guards`) and a
// feeder (dir/feeder<h>.toml, log dir/feeder<h>.log) fed from the Redis at `port`, started, its
// global rate (burst, rate), refreshing every `refresh`.
inline std::vector<std::unique_ptr<Host>> start_hosts(
    int n, const std::string& prefix, const std::string& dir, int port,
    std::vector<std::unique_ptr<lim::test::SegmentGuard>>& guards, double burst = kBurst,
    double rate = kRate, const std::string& refresh = "50ms") {
    std::vector<std::unique_ptr<Host>> hosts;
    for (int h = 0; h < n; ++h) {
        guards.push_back(std::make_unique<lim::test::SegmentGuard>(
            lim::test::unique_name(prefix + std::to_string(h))));
        auto host = std::make_unique<Host>();
        host->segment = guards.back()->name();
        host->config = write_config(dir, h, host->segment, port, burst, rate, refresh);
        host->log = dir + "/feeder" + std::to_string(h) + ".log";
        start_feeder(*host);
        hosts.push_back(std::move(host));
    }
    return hosts;
}

// Forks workers_of[h] workers on each host h, worker w (counted over all hosts) running
// worker() on hosts[h] with pace_of(h) and blocking_of(h), into log.part(w) and counts[w], until
// `stop`; host_of[w] is set to h. Their pids.
template <class PaceOf, class BlockingOf>
std::vector<pid_t> fork_workers(const std::vector<std::unique_ptr<Host>>& hosts,
                                const int* workers_of, PaceOf pace_of, BlockingOf blocking_of,
                                const lim::test::AdmissionLog& log, std::int64_t* counts,
                                const std::atomic<int>* stop, std::vector<int>& host_of) {
    std::vector<pid_t> pids;
    const int n = static_cast<int>(hosts.size());
    for (int h = 0, w = 0; h < n; ++h) {
        for (int i = 0; i < workers_of[h]; ++i, ++w) {
            Admission* part = log.part(w);
            std::int64_t* count = counts + w;
            const std::string segment = hosts[h]->segment;
            const std::chrono::microseconds pace = pace_of(h);
            const bool blocking = blocking_of(h);
            pids.push_back(lim::test::fork_child([segment, pace, blocking, part, count, stop] {
                return worker(segment, pace, blocking, part, count, stop);
            }));
            host_of.push_back(h);
        }
    }
    return pids;
}

inline std::string run_output(const std::string& command) {
    std::string out;
    FILE* p = ::popen(command.c_str(), "r");
    if (p == nullptr) return out;
    char buf[4096];
    while (const std::size_t n = std::fread(buf, 1, sizeof buf, p))
        out.append(buf, n);
    ::pclose(p);
    return out;
}

inline std::int64_t now_ns() {
    return lim::to_nanos(lim::Clock::now());
}

inline std::size_t count_between(const std::vector<Admission>& a, std::int64_t lo,
                                 std::int64_t hi) {
    std::size_t n = 0;
    for (const Admission& x : a)
        n += (x.before_ns >= lo && x.after_ns <= hi) ? 1 : 0;
    return n;
}

// A worker whose pace `mode` sets: 0 idle, 1 every 25 ms, 2 every 1 ms, 3 quit. Its count is
// stored after each admission, so that the log of a worker killed with SIGKILL is read whole
// (less an admission between its take and its entry).
inline int paced_worker(const std::string& segment, const std::atomic<int>* mode, Admission* log,
                        std::int64_t* count) {
    std::optional<lim::Segment> seg;
    std::optional<lim::TokenBucket> global = adopt_global_rate(segment, seg);
    if (!global) return 3;
    lim::TokenBucket& tb = *global;
    std::int64_t n = 0;
    for (int m = mode->load(); m != 3 && n < static_cast<std::int64_t>(kPerWorker);
         m = mode->load()) {
        if (m == 0) {
            std::this_thread::sleep_for(2ms);
            continue;
        }
        const std::int64_t before = now_ns();
        const bool taken = tb.try_take(1) == lim::TryTake::taken;
        const std::int64_t after = now_ns();
        if (taken) {
            log[n++] = Admission{before, after, 10'000};
            publish_count(count, n);
        }
        std::this_thread::sleep_for(m == 1 ? 25ms : 1ms);
    }
    publish_count(count, n);
    return 0;
}

}  // namespace lim::test::multihost
