// lim-feeder over a real redis-server: N hosts on one machine (N segments, each with its own
// feeder process and forked workers), one Redis. The bound over all hosts (tokens admitted in any
// window T <= burst + rate x T) holds through skewed demand, a feeder killed with SIGKILL, a
// feeder stopped with SIGSTOP, and Redis killed and restarted; a backoff set on one host reaches
// the other.
#include <doctest/doctest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "global/feeder_harness.hpp"
#include "global/redis_fixture.hpp"
#if LIM_TEST_HIREDIS
#include <hiredis/hiredis.h>

#include <cmath>

#include "global/redis_client.hpp"
#include "scripts.hpp"  // tools/feeder: the lease script the feeders run
#endif
#include "lim/consumed_limiter.hpp"
#include "lim/lim.hpp"
#include "limiter/consumed_rebase.hpp"
#include "support/admissions.hpp"
#include "support/consumed_records.hpp"
#include "support/mid_take.hpp"
#include "support/process.hpp"

namespace {

using namespace std::chrono_literals;
using namespace lim::test::multihost;
using lim::test::Admission;
using lim::test::ChildProcess;

}  // namespace

TEST_CASE("lim-feeder: the bound holds over all hosts through feeder and Redis failures") {
    std::string dir;
    const auto redis = start_redis("test", dir);
    if (!redis) return;

    constexpr int kHosts = 2;
    // Host 0 is busy (4 workers, one attempt per ms each); host 1 is light (one worker, 10/s).
    const int workers_of[kHosts] = {4, 1};
    const std::chrono::microseconds pace_of[kHosts] = {1000us, 100'000us};
    std::vector<std::unique_ptr<lim::test::SegmentGuard>> guards;
    const std::vector<std::unique_ptr<Host>> hosts =
        start_hosts(kHosts, "feeder", dir, redis->port(), guards);

    // The feeders create the segments and their records (the rate, two status records, the
    // backoff) before any worker or check opens them.
    for (auto& h : hosts) {
        const std::string name = h->segment;
        REQUIRE(lim::test::eventually(
            [&] {
                try {
                    return lim::Segment::open(name).info().limiters >= 4;
                } catch (const lim::Error&) {
                    return false;
                }
            },
            30s));
    }
    const int total_workers = workers_of[0] + workers_of[1];
    lim::test::AdmissionLog log(total_workers, kPerWorker);
    auto* counts = lim::test::shared_array<std::int64_t>(total_workers);
    auto* stop = new (lim::test::shared_array<std::atomic<int>>(1)) std::atomic<int>(0);
    std::vector<int> host_of;
    const std::vector<pid_t> pids = fork_workers(
        hosts, workers_of, [&](int h) { return pace_of[h]; }, [](int h) { return h == 1; }, log,
        counts, stop, host_of);
    const auto admissions_of = [&](int h) {
        std::vector<Admission> out;
        for (int w = 0; w < total_workers; ++w) {
            if (host_of[w] != h) continue;
            out.insert(out.end(), log.part(w), log.part(w) + counts[w]);
        }
        return out;
    };
    // Waits (up to 30 s: a loaded machine runs feeders and workers late) until the workers of
    // host h (or of every host, h = -1) admitted something that began at or after `since`.
    const auto fed_since = [&](int h, std::int64_t since) {
        return lim::test::eventually(
            [&] {
                for (int w = 0; w < total_workers; ++w) {
                    if ((h < 0 || host_of[w] == h) &&
                        admitted_since(log, counts, w, w + 1, since) > 0)
                        return true;
                }
                return false;
            },
            30s);
    };

    // Phase A: skewed demand, and a backoff set on host 0 reaches host 1 (and back, never shorter).
    // A fresh global key grants nothing for one lease_ttl + grace (1 s): the fence.
    const std::int64_t run_start = now_ns();
    std::this_thread::sleep_for(1200ms);
    const std::int64_t a_start = now_ns();
    {
        auto seg0 = lim::Segment::open(hosts[0]->segment);
        auto seg1 = lim::Segment::open(hosts[1]->segment);
        auto w0 = lim::BackoffWindow::for_key(seg0, kBackoffKey);
        auto w1 = lim::BackoffWindow::for_key(seg1, kBackoffKey);
        // limctl shows the lease, its expiry and the last contact with Redis.
        const std::string leases =
            run_output(std::string(LIMCTL_PATH) + " leases " + hosts[0]->segment + " --json");
        CHECK(leases.find("\"key\": \"api\"") != std::string::npos);
        CHECK(leases.find("\"lease_expires_in_seconds\"") != std::string::npos);
        CHECK(leases.find("\"last_contact_seconds_ago\": null") == std::string::npos);
        const std::string stats =
            run_output(std::string(LIMCTL_PATH) + " stats " + hosts[0]->segment);
        CHECK(stats.find("lim_feeder_last_contact_seconds{") != std::string::npos);
        CHECK(stats.find("lim_feeder_lease_held_tokens{") != std::string::npos);
        // Each lim_feeder_* sample is printed as limctl's others are: a whole number, or 4
        // decimals.
        for (std::size_t at = stats.find("\nlim_feeder_"); at != std::string::npos;
             at = stats.find("\nlim_feeder_", at + 1)) {
            const std::size_t end = stats.find('\n', at + 1);
            const std::string line = stats.substr(at + 1, end - at - 1);
            const std::string value = line.substr(line.rfind(' ') + 1);
            const std::size_t dot = value.find('.');
            CAPTURE(line);
            CHECK((dot == std::string::npos || value.size() - dot - 1 == 4));
        }
        // So does the key's own view, in text and JSON.
        const std::string shown =
            run_output(std::string(LIMCTL_PATH) + " show " + hosts[0]->segment + " api");
        CHECK(shown.find("LAST REDIS CONTACT") != std::string::npos);
        const std::string shown_json =
            run_output(std::string(LIMCTL_PATH) + " show --json " + hosts[0]->segment + " api");
        CHECK(shown_json.find("\"global_lease\"") != std::string::npos);
        CHECK(shown_json.find("\"lease_held_tokens\"") != std::string::npos);
        // The deadlines compared, not what remains when this thread looks (a loaded machine can
        // run it seconds late): a propagated deadline is never earlier than the one set (the
        // feeders pass on what remains, and apply it later), nor later than the wait it took.
        w0.set(3s);
        const lim::TimePoint w0_until = w0.until().value();
        CHECK(lim::test::eventually([&] { return w1.should_backoff(); }, 30s));
        CHECK(w1.remaining() <= 3s + 100ms);
        CHECK(w1.until().value() >= w0_until - 100ms);
        w1.set(8s);  // a longer one on host 1 reaches host 0; the shorter never wins back
        const lim::TimePoint w1_until = w1.until().value();
        CHECK(lim::test::eventually(
            [&] { return w0.until().value_or(lim::TimePoint{}) >= w1_until - 100ms; }, 30s));
        std::this_thread::sleep_for(300ms);
        CHECK(w1.until().value() >= w1_until);
        std::this_thread::sleep_for(1000ms);
    }
    const std::int64_t a_end = now_ns();

    // Phase B: kill -9 host 0's feeder; its workers run down what they hold, then admit nothing;
    // a restarted feeder reconciles from the segment.
    hosts[0]->feeder.stop(SIGKILL);
    const std::int64_t killed = now_ns();
    std::this_thread::sleep_for(1500ms);
    const std::int64_t restarted = now_ns();
    start_feeder(*hosts[0]);
    std::this_thread::sleep_for(1500ms);
    CHECK(fed_since(0, restarted));  // the restarted feeder feeds its host again

    // Phase C: SIGSTOP host 1's feeder for three lease TTLs.
    hosts[1]->feeder.signal(SIGSTOP);
    std::this_thread::sleep_for(1500ms);
    hosts[1]->feeder.signal(SIGCONT);
    std::this_thread::sleep_for(1000ms);

    // Phase D: Redis killed and restarted empty on the same port.
    redis->kill();
    const std::int64_t redis_down = now_ns();
    std::this_thread::sleep_for(1000ms);
    const std::int64_t redis_back = now_ns();
    REQUIRE(redis->start());
    std::this_thread::sleep_for(2000ms);
    CHECK(fed_since(-1, redis_back));  // past the fresh key's fence, fed again
    // Phase E: Redis killed and restarted at once, while every host still holds a lease: the
    // empty state must not grant a fresh burst on top of what the hosts hold (the fence).
    redis->kill();
    REQUIRE(redis->start());
    const std::int64_t redis_quick = now_ns();
    std::this_thread::sleep_for(2000ms);
    CHECK(fed_since(-1, redis_quick));

    stop->store(1);
    for (const pid_t p : pids)
        CHECK(lim::test::wait_child(p) == 0);
    const std::int64_t end = now_ns();
    for (auto& h : hosts) {
        // A graceful stop gives the leases back and exits 0 (under sanitizers: with no report).
        const int status = h->feeder.stop(SIGTERM);
        CHECK(WIFEXITED(status));
        CHECK(WEXITSTATUS(status) == 0);
    }
    redis->kill();

    std::vector<Admission> all = admissions_of(0);
    {
        const auto more = admissions_of(1);
        all.insert(all.end(), more.begin(), more.end());
    }
    const lim::test::BucketCheck check =
        lim::test::check_bucket(all, kBurst * 10'000, kRate * 10'000, 10'000, all.size());
    const double seconds = static_cast<double>(end - run_start) / 1e9;
    MESSAGE("admitted " << all.size() << " tokens in " << seconds << " s over " << kHosts
                        << " hosts; bound allows " << kBurst + kRate * seconds
                        << "; worst window excess " << check.worst_excess_units / 10'000.0
                        << " tokens (<= 0 conforms, 1 token of rounding allowed)");
    CHECK(check.worst_excess_units <= 0);

    // Skewed demand: the busy host got most of the budget, the light one what it asked for.
    const auto busy = admissions_of(0);
    const auto light = admissions_of(1);
    const std::size_t busy_a = count_between(busy, a_start, a_end);
    const std::size_t light_a = count_between(light, a_start, a_end);
    const double a_seconds = static_cast<double>(a_end - a_start) / 1e9;
    MESSAGE("phase A (" << a_seconds << " s): busy host " << busy_a << ", light host " << light_a
                        << "; utilisation "
                        << static_cast<double>(busy_a + light_a) / (kBurst + kRate * a_seconds)
                        << "; after the feeder's restart "
                        << count_between(busy, restarted, redis_down) << ", after Redis came back "
                        << count_between(all, redis_back, redis_quick)
                        << ", after the quick restart " << count_between(all, redis_quick, end));
    // Both hosts were fed (how much depends on how a loaded machine schedules them: printed)...
    CHECK(busy_a > 0);
    CHECK(light_a > 0);
    // ...and the light one never more than it asked for: one take per pace (100 ms) at most.
    CHECK(static_cast<double>(light_a) <= a_seconds / 0.1 + 1);

    // A killed feeder: its host admits nothing past its lease deadline, at most lease_ttl
    // (500 ms) after its last ask, which came before the kill (fail-closed).
    CHECK(count_between(busy, killed + 500'000'000, restarted) == 0);
    // Redis down: past the lease deadlines (the last asks answered before the kill) nothing is
    // admitted anywhere until Redis answers again.
    CHECK(count_between(all, redis_down + 600'000'000, redis_back) == 0);
    // (That the hosts were fed again after each restart is checked above, by waiting for it.)

    if (check.worst_excess_units > 0) {
        for (auto& h : hosts)
            MESSAGE(lim::test::read_file(h->log));
    }
    for (auto& h : hosts)
        std::remove(("/dev/shm/lim-feeder." + h->segment + ".lock").c_str());
    std::remove((dir + "/redis.log").c_str());
}

TEST_CASE(
    "lim-feeder: with Redis unreachable, closed admits nothing and open admits the local rate") {
    const std::string dir = make_dir("down");
    const int port = lim::test::free_port();  // nothing listens there
    for (const bool open : {false, true}) {
        CAPTURE(open);
        lim::test::SegmentGuard guard(lim::test::unique_name(open ? "down-open" : "down-closed"));
        const std::string config = dir + (open ? "/open.toml" : "/closed.toml");
        {
            std::ofstream out(config);
            out << "[feeder]\nsegment = \"" << guard.name()
                << "\"\nredis = \"redis://127.0.0.1:" << port
                << "\"\nhost = \"h\"\nrefresh = \"50ms\"\nlease_ttl = \"500ms\"\n"
                << "on_redis_down = \"" << (open ? "open" : "closed") << "\"\n[global." << kKey
                << "]\nkind = \"rate\"\nburst_size = " << kBurst
                << "\nsustained_rate_per_sec = " << kRate << "\n";
        }
        ChildProcess feeder;
        feeder.start({FEEDER_PATH, "--config", config}, dir + "/down.log");
        std::optional<lim::Segment> seg;
        REQUIRE(lim::test::eventually(
            [&] {
                try {
                    seg.emplace(lim::Segment::open(guard.name()));
                    return seg->info().limiters >= 3;
                } catch (const lim::Error&) {
                    return false;
                }
            },
            30s));
        auto tb = lim::TokenBucket::open(*seg, kKey,
                                         {.burst_size = kBurst, .sustained_rate_per_sec = kRate},
                                         lim::adopt_existing);
        const auto start = lim::Clock::now();
        int taken = 0;
        // 1.5 s; open: on until something is taken (up to 30 s: a loaded machine runs the
        // feeder's ticks late).
        while (lim::Clock::now() < start + 1500ms ||
               (open && taken == 0 && lim::Clock::now() < start + 30s)) {
            taken += tb.try_take(1) == lim::TryTake::taken ? 1 : 0;
            std::this_thread::sleep_for(1ms);
        }
        const double seconds = std::chrono::duration<double>(lim::Clock::now() - start).count();
        MESSAGE(std::string(open ? "open" : "closed")
                << ": " << taken << " taken in " << seconds << " s");
        if (open) {
            CHECK(taken > 0);  // fed at the global rate by this host alone (the count printed)
            CHECK(taken <= kBurst + kRate * seconds + 1);
        } else {
            CHECK(taken == 0);  // fail-closed: no lease was ever granted
        }
        CHECK(WEXITSTATUS(feeder.stop(SIGTERM)) == 0);
        std::remove(("/dev/shm/lim-feeder." + guard.name() + ".lock").c_str());
    }
}

// Issue 12's overspend: the lease deadline used to be enforced by the feeder alone, so a host
// whose feeder was stopped for longer than the grace could spend what was left of its lease after
// Redis had freed it and let the budget refill for the others. The takers now enforce it.
TEST_CASE("lim-feeder: a stopped feeder's host spends nothing past its lease deadline") {
    std::string dir;
    const auto redis = start_redis("stop", dir);
    if (!redis) return;

    constexpr int kHosts = 2;
    constexpr int kWorkersPerHost = 2;
    std::vector<std::unique_ptr<lim::test::SegmentGuard>> guards;
    const std::vector<std::unique_ptr<Host>> hosts =
        start_hosts(kHosts, "stop", dir, redis->port(), guards);
    constexpr int kWorkers = kHosts * kWorkersPerHost;
    lim::test::AdmissionLog log(kWorkers, kPerWorker);
    auto* counts = lim::test::shared_array<std::int64_t>(kWorkers);
    auto* modes = lim::test::shared_array<std::atomic<int>>(kHosts);
    for (int h = 0; h < kHosts; ++h)
        new (modes + h) std::atomic<int>(0);
    std::vector<pid_t> pids;
    for (int w = 0; w < kWorkers; ++w) {
        const int h = w / kWorkersPerHost;
        Admission* part = log.part(w);
        std::int64_t* count = counts + w;
        const std::string segment = hosts[h]->segment;
        const std::atomic<int>* mode = modes + h;
        pids.push_back(lim::test::fork_child(
            [segment, mode, part, count] { return paced_worker(segment, mode, part, count); }));
    }
    const auto admissions_of = [&](int h) {
        std::vector<Admission> out;
        for (int w = h * kWorkersPerHost; w < (h + 1) * kWorkersPerHost; ++w)
            out.insert(out.end(), log.part(w), log.part(w) + counts[w]);
        return out;
    };
    // Waits (up to 30 s: a loaded machine runs feeders and workers late) until host h's workers
    // admitted at least n that began at or after `since`.
    const auto admitted = [&](int h, std::int64_t since, std::int64_t n) {
        return lim::test::eventually(
            [&] {
                return admitted_since(log, counts, h * kWorkersPerHost, (h + 1) * kWorkersPerHost,
                                      since) >= n;
            },
            30s);
    };

    // Past the fence (lease_ttl + grace = 1 s), host 0 spends 80/s of the 100/s, so its lease
    // stays well filled (about 4 refreshes of demand: ~16 tokens).
    std::this_thread::sleep_for(1200ms);
    modes[0].store(1);
    std::this_thread::sleep_for(1500ms);
    REQUIRE(admitted(0, 0, 40));
    // Host 0's workers pause and its feeder stops, with its lease unspent. Host 1 gets busy and
    // takes what the global bucket has (Redis frees host 0's lease ttl + grace after its last
    // renewal), then goes idle so that the bucket refills to the burst.
    modes[0].store(0);
    hosts[0]->feeder.signal(SIGSTOP);
    const std::int64_t stopped = now_ns();
    modes[1].store(2);
    std::this_thread::sleep_for(1300ms);
    REQUIRE(admitted(1, stopped, 20));
    modes[1].store(0);
    std::this_thread::sleep_for(700ms);
    // Both hosts now take as fast as they can, host 0's feeder still stopped: host 1 takes the
    // full burst and the rate; host 0 must take nothing (its deadline passed ~1.5 s ago). Before
    // the takers enforced the deadline, host 0 spent what was left of its lease here, on top.
    const std::int64_t resumed = now_ns();
    modes[0].store(2);
    modes[1].store(2);
    std::this_thread::sleep_for(1000ms);
    REQUIRE(admitted(1, resumed, 20));
    // Host 1 goes idle as host 0's feeder runs again, so that host 0 is surely fed (Redis shares
    // the bucket as it is at each call: two feeders ticking in phase can starve the one that
    // always calls second).
    modes[1].store(0);
    const std::int64_t continued = now_ns();
    hosts[0]->feeder.signal(SIGCONT);
    std::this_thread::sleep_for(1500ms);
    CHECK(admitted(0, continued, 1));  // fed again
    const std::int64_t end = now_ns();
    modes[0].store(3);
    modes[1].store(3);
    for (const pid_t p : pids)
        CHECK(lim::test::wait_child(p) == 0);
    for (auto& h : hosts) {
        const int status = h->feeder.stop(SIGTERM);
        CHECK(WIFEXITED(status));
        CHECK(WEXITSTATUS(status) == 0);
    }
    redis->kill();

    const auto busy = admissions_of(0);
    const auto other = admissions_of(1);
    std::vector<Admission> all = busy;
    all.insert(all.end(), other.begin(), other.end());
    const lim::test::BucketCheck check =
        lim::test::check_bucket(all, kBurst * 10'000, kRate * 10'000, 10'000, all.size());
    MESSAGE("host 0: " << count_between(busy, 0, stopped) << " before its feeder stopped, "
                       << count_between(busy, stopped, continued) << " while stopped, "
                       << count_between(busy, continued, end)
                       << " after; host 1: " << count_between(other, stopped, resumed)
                       << " while host 0 paused, " << count_between(other, resumed, end)
                       << " after; worst window excess " << check.worst_excess_units / 10'000.0
                       << " tokens (<= 0 conforms, 1 token of rounding allowed)");
    // The scenario happened (waited for above, so that a loaded machine only makes it take
    // longer): host 0 held and spent a lease, host 1 took the freed budget.
    CHECK(count_between(busy, 0, stopped) >= 40);
    CHECK(count_between(other, stopped, resumed) >= 20);
    CHECK(count_between(other, resumed, continued) >= 20);
    // The bound over all hosts, in every window.
    CHECK(check.worst_excess_units <= 0);
    // Host 0 admitted nothing from its deadline (at most lease_ttl after its last ask, before
    // the stop) until its feeder ran again; then it is fed again.
    CHECK(count_between(busy, stopped + 550'000'000, continued) == 0);
    CHECK(count_between(busy, continued, end) > 0);
    if (check.worst_excess_units > 0) {
        for (auto& h : hosts)
            MESSAGE(lim::test::read_file(h->log));
    }
    for (auto& h : hosts)
        std::remove(("/dev/shm/lim-feeder." + h->segment + ".lock").c_str());
    std::remove((dir + "/redis.log").c_str());
}

TEST_CASE("lim-feeder refuses a general Limiter a worker created first (its takers lend tokens)") {
    std::string dir;
    const auto redis = start_redis("first", dir);
    if (!redis) return;
    lim::test::SegmentGuard guard(lim::test::unique_name("feeder-first"));
    {
        // A worker got there first with a general Limiter, whose takers may return what they
        // took: after a conversion, a token returned would be spendable with no lease.
        auto seg = lim::Segment::open_or_create(guard.name());
        auto l = lim::Limiter::open(seg, kKey,
                                    {.hopper_to_bucket_rate_per_sec = 10,
                                     .bucket_size = kBurst,
                                     .initial_bucket_level = 0,
                                     .initial_hopper_level = lim::infinite});
        CHECK(l.try_take(1) == lim::TryTake::unable);
    }
    Host host;
    host.segment = guard.name();
    host.config = write_config(dir, 0, host.segment, redis->port());
    host.log = dir + "/feeder-first.log";
    start_feeder(host);
    const std::optional<int> status = host.feeder.wait_for(60s);
    REQUIRE(status.has_value());
    CHECK(WIFEXITED(*status));
    CHECK(WEXITSTATUS(*status) == 1);
    const std::string text = lim::test::read_file(host.log);
    CHECK(text.find("existed before this feeder made it") != std::string::npos);
    CHECK(text.find("cannot be converted") != std::string::npos);
}

// The conversion's step 5, end to end: a worker stopped in the middle of a take on the bucket it
// made (between its take's two CASes) when lim-feeder converts the record. Until that take ends,
// the feeder grants the key nothing (a grant could count the take's tentative token as spent,
// which the take would then give back); it says so, and feeds the key once the take has ended.
TEST_CASE("lim-feeder grants a converted key nothing while a take on it is stopped half-way") {
    std::string dir;
    const auto redis = start_redis("settle", dir);
    if (!redis) return;
    lim::test::Taker worker("feeder-settle");  // the worker's bucket "api" (kKey), and its taker
    worker.catch_mid_take();
    Host host;
    host.segment = worker.guard.name();
    host.config = write_config(dir, 0, host.segment, redis->port());
    host.log = dir + "/feeder-settle.log";
    start_feeder(host);
    auto seg = lim::Segment::open(host.segment);
    lim::Limiter l =
        lim::Limiter::open(seg, kKey, lim::test::feeder_config(kBurst), lim::adopt_existing);
    REQUIRE(lim::test::eventually([&] { return lim::is_consumed(l); }, 30s));
    REQUIRE(lim::test::eventually(
        [&] {
            return lim::test::read_file(host.log).find("stopped in the middle of a take") !=
                   std::string::npos;
        },
        30s));
    // Past the fence after a fresh key (lease_ttl 500 ms + grace) and many refreshes (50 ms):
    // nothing to take, whoever asks (these refusals are demand the feeder sees).
    const lim::TimePoint until = lim::Clock::now() + 1500ms;
    int refused = 0;
    while (lim::Clock::now() < until) {
        CHECK(l.try_take(1) == lim::TryTake::unable);
        ++refused;
        std::this_thread::sleep_for(10ms);
    }
    CHECK(refused > 0);
    CHECK(l.in_bucket() == 0);
    // The take resumes: its bucket CAS fails on the switch, its token stays in flight (consumed,
    // not admitted), and its next take is refused: it ends having been admitted nothing.
    CHECK(worker.resume_and_count() == 0);
    REQUIRE(lim::test::eventually(
        [&] {
            return lim::test::read_file(host.log).find("the stopped take has ended") !=
                   std::string::npos;
        },
        30s));
    // Fed from now on.
    CHECK(lim::test::eventually([&] { return l.try_take(1) == lim::TryTake::taken; }, 30s));
    MESSAGE(lim::test::read_file(host.log));
}

// R4's boot order: a worker opens the global rate (SPEC's TokenBucket::open(..., adopt_existing))
// before the feeder has made it, so it creates a plain token bucket and admits at its local rate,
// with no lease. The feeder, started later, converts that record in place: from the conversion
// on, every admission (by the handles the workers opened before it, polling and blocking) is
// within the global bound; a restarted feeder converts nothing again.
TEST_CASE("lim-feeder converts a token bucket a worker made first: bound from the conversion on") {
    std::string dir;
    const auto redis = start_redis("convert", dir);
    if (!redis) return;
    lim::test::SegmentGuard guard(lim::test::unique_name("feeder-convert"));
    (void)lim::Segment::open_or_create(guard.name());
    constexpr int kWorkers = 2;
    constexpr std::size_t kMax = 20'000;
    lim::test::AdmissionLog log(kWorkers, kMax);
    auto* counts = lim::test::shared_array<std::int64_t>(kWorkers);
    auto* started = lim::test::shared_array<std::atomic<int>>(1);
    auto* stop = new (lim::test::shared_array<std::atomic<int>>(1)) std::atomic<int>(0);
    const std::string segment = guard.name();
    std::vector<pid_t> pids;
    for (int w = 0; w < kWorkers; ++w) {
        Admission* part = log.part(w);
        std::int64_t* count = counts + w;
        pids.push_back(lim::test::fork_child([segment, w, part, count, started, stop] {
            auto seg = lim::Segment::open(segment);
            // Its own (local) burst and rate, far above the global ones: before the feeder, it
            // admits at this rate.
            auto tb = lim::TokenBucket::open(seg, kKey,
                                             {.burst_size = 200, .sustained_rate_per_sec = 5000},
                                             lim::adopt_existing);
            started->fetch_add(1);
            std::size_t n = 0;
            while (stop->load() == 0 && n < kMax) {
                const std::int64_t before = lim::to_nanos(lim::Clock::now());
                const bool taken = w == 0 ? tb.try_take(1) == lim::TryTake::taken
                                          : tb.take_until(1, lim::Clock::now() + 300ms);
                const std::int64_t after = lim::to_nanos(lim::Clock::now());
                if (taken) part[n++] = Admission{before, after, 10'000};
                std::this_thread::sleep_for(1ms);
            }
            *count = static_cast<std::int64_t>(n);
            return 0;
        }));
    }
    REQUIRE(lim::test::eventually([&] { return started->load() == kWorkers; }, 30s));
    std::this_thread::sleep_for(500ms);  // admitting at the local rate, with no feeder

    Host host;
    host.segment = segment;
    host.config = write_config(dir, 0, segment, redis->port());
    host.log = dir + "/feeder-convert.log";
    const std::int64_t feeder_started = now_ns();
    start_feeder(host);
    auto seg = lim::Segment::open(segment);
    lim::Limiter l = lim::Limiter::open(seg, kKey,
                                        {.hopper_to_bucket_rate_per_sec = lim::infinite,
                                         .bucket_size = kBurst,
                                         .initial_bucket_level = 0,
                                         .initial_hopper_level = 0.0},
                                        lim::adopt_existing);
    REQUIRE(lim::test::eventually([&] { return lim::is_consumed(l); }, 30s));
    const std::int64_t converted = now_ns();  // the conversion is done by now
    std::this_thread::sleep_for(2500ms);      // the fence (1 s), then grants
    // limctl shows the converted record as the feeder's global rate.
    const std::string leases =
        run_output(std::string(LIMCTL_PATH) + " leases " + segment + " --json");
    CHECK(leases.find("\"key\": \"api\"") != std::string::npos);

    // A restarted feeder finds the record consumed: nothing converted again, nothing lost.
    host.feeder.stop(SIGKILL);
    const std::string first_log = lim::test::read_file(host.log);
    host.log = dir + "/feeder-convert2.log";
    start_feeder(host);
    std::this_thread::sleep_for(1500ms);
    stop->store(1);
    for (const pid_t p : pids)
        CHECK(lim::test::wait_child(p) == 0);
    const int status = host.feeder.stop(SIGTERM);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
    const std::int64_t end = now_ns();
    redis->kill();

    MESSAGE("first feeder: " << first_log);
    CHECK(first_log.find("warning: 'api'") != std::string::npos);
    CHECK(first_log.find("converted in place") != std::string::npos);
    const std::string second_log = lim::test::read_file(host.log);
    CHECK(second_log.find("converted") == std::string::npos);

    std::vector<Admission> before, after;
    for (int w = 0; w < kWorkers; ++w) {
        for (std::int64_t i = 0; i < counts[w]; ++i) {
            const Admission& a = log.part(w)[i];
            (a.before_ns >= converted ? after : before).push_back(a);
        }
    }
    // Before: the local rate, unbounded by the global one (R4: what remains exposed).
    REQUIRE_FALSE(before.empty());
    const double pre_seconds = static_cast<double>(feeder_started - before.front().before_ns) / 1e9;
    MESSAGE(before.size() << " admitted before the conversion (the global bound over the "
                          << pre_seconds << " s before the feeder started: "
                          << kBurst + kRate * pre_seconds << ")");
    CHECK(static_cast<double>(before.size()) > kBurst + kRate * pre_seconds);
    // After: within the global bound in every window, through the restart.
    const lim::test::BucketCheck check =
        lim::test::check_bucket(after, kBurst * 10'000, kRate * 10'000, 10'000, after.size());
    const double seconds = static_cast<double>(end - converted) / 1e9;
    MESSAGE(after.size() << " admitted in the " << seconds << " s from the conversion on; bound "
                         << kBurst + kRate * seconds << "; worst window excess "
                         << check.worst_excess_units / 10'000.0 << " tokens");
    CHECK(check.worst_excess_units <= 0);
    CHECK(after.size() > 0);  // the grants reached the workers' old handles
    CHECK(static_cast<double>(after.size()) <= kBurst + kRate * seconds);
    std::remove(("/dev/shm/lim-feeder." + segment + ".lock").c_str());
}

TEST_CASE(
    "lim-feeder refuses a planted lock file (a link or a FIFO) and writes nothing through it") {
    const std::string dir = make_dir("planted");
    lim::test::SegmentGuard guard(lim::test::unique_name("feeder-planted"));
    const std::string lock = "/dev/shm/lim-feeder." + guard.name() + ".lock";
    const std::string victim = dir + "/victim";
    std::ofstream(victim) << "precious";
    for (const bool fifo : {false, true}) {
        CAPTURE(fifo);
        ::unlink(lock.c_str());
        REQUIRE((fifo ? ::mkfifo(lock.c_str(), 0600) : ::symlink(victim.c_str(), lock.c_str())) ==
                0);
        Host host;
        host.segment = guard.name();
        // No Redis is needed: the lock is taken before the feeder contacts it.
        host.config = write_config(dir, 0, host.segment, lim::test::free_port());
        host.log = dir + "/planted.log";
        start_feeder(host);
        const std::optional<int> status = host.feeder.wait_for(60s);
        REQUIRE(status.has_value());  // no hang on a FIFO
        CHECK(WIFEXITED(*status));
        CHECK(WEXITSTATUS(*status) == 1);
        std::ifstream in(victim);
        const std::string text((std::istreambuf_iterator<char>(in)),
                               std::istreambuf_iterator<char>());
        CHECK(text == "precious");  // the link was not followed: no instance id written there
    }
    ::unlink(lock.c_str());
    std::remove(victim.c_str());
    std::remove((dir + "/planted.log").c_str());
    std::remove((dir + "/feeder0.toml").c_str());
    ::rmdir(dir.c_str());
}

TEST_CASE("lim-feeder feeds past the old 10^9-token lifetime cap, and repairs a rebase cut short") {
    // A host spending far more than 10^9 tokens of one global rate: the feeder rebases the record
    // (target and in_flight lowered together) every 10^8 tokens, and keeps feeding. Then a rebase
    // is killed between its steps (target lowered, in_flight not: nothing may be taken), and the
    // restarted feeder repairs it and feeds again.
    std::string dir;
    const auto redis = start_redis("rebase", dir);
    if (!redis) return;
    lim::test::SegmentGuard guard(lim::test::unique_name("feeder-rebase"));
    constexpr double kBigBurst = 1e8;  // tokens
    constexpr double kBigRate = 1e9;   // tokens per second, the most a rate may be
    constexpr double kTake = 1e7;      // tokens per take
    Host host;
    host.segment = guard.name();
    host.config = dir + "/feeder.toml";
    {
        std::ofstream out(host.config);
        out << "[feeder]\nsegment = \"" << host.segment
            << "\"\nredis = \"redis://127.0.0.1:" << redis->port()
            << "\"\nhost = \"big\"\nrefresh = \"20ms\"\nlease_ttl = \"500ms\"\n"
            << "[global.big]\nkind = \"rate\"\nburst_size = " << kBigBurst
            << "\nsustained_rate_per_sec = " << kBigRate << "\n";
    }
    host.log = dir + "/feeder.log";
    start_feeder(host);
    REQUIRE(lim::test::eventually(
        [&] {
            try {
                return lim::Segment::open(host.segment).info().limiters >= 3;
            } catch (const lim::Error&) {
                return false;
            }
        },
        30s));

    constexpr int kWorkers = 2;
    auto* admitted = lim::test::shared_array<std::atomic<std::int64_t>>(kWorkers);  // tokens
    auto* stop = lim::test::make_flag();
    const std::string segment = host.segment;
    std::vector<pid_t> pids;
    for (int w = 0; w < kWorkers; ++w) {
        pids.push_back(lim::test::fork_child([segment, w, admitted, stop] {
            auto seg = lim::Segment::open(segment);
            auto tb = lim::TokenBucket::open(
                seg, "big", {.burst_size = kBigBurst, .sustained_rate_per_sec = kBigRate},
                lim::adopt_existing);
            while (stop->value.load() == 0) {
                // Blocking: a sleeper is what tells the feeder its host starves (it then doubles
                // its ask each refresh up to the burst); a refused try_take is not seen.
                if (tb.take_until(kTake, lim::Clock::now() + 50ms)) {
                    admitted[w].fetch_add(static_cast<std::int64_t>(kTake));
                }
            }
            return 0;
        }));
    }
    const auto total = [&] {
        double t = 0;
        for (int w = 0; w < kWorkers; ++w)
            t += static_cast<double>(admitted[w].load());
        return t;
    };
    auto seg = lim::Segment::open(host.segment);
    lim::Limiter local = lim::Limiter::open(seg, "big",
                                            {.hopper_to_bucket_rate_per_sec = lim::infinite,
                                             .bucket_size = kBigBurst,
                                             .initial_bucket_level = 0,
                                             .initial_hopper_level = 0.0},
                                            lim::adopt_existing);
    const std::int64_t start = now_ns();
    // Phase 1: three times the old cap. The target stays far below its limit all along.
    double max_target = 0;
    const bool crossed = lim::test::eventually(
        [&] {
            max_target = std::max(max_target, local.token_target_level().value_or(0));
            return total() >= 3e9;
        },
        120s);
    const double elapsed_s = static_cast<double>(now_ns() - start) / 1e9;
    MESSAGE("admitted ", total(), " tokens in ", elapsed_s, " s; in_flight now ", local.in_flight(),
            ", the target never seen above ", max_target);
    const auto stop_workers = [&] {
        stop->set();
        for (const pid_t pid : pids)
            CHECK(lim::test::wait_child(pid) == 0);
        pids.clear();
    };
    if (!crossed) stop_workers();
    REQUIRE(crossed);
    CHECK(host.feeder.running());
    CHECK(max_target < 1e9);
    CHECK(local.in_flight() < 1e9);  // rebased: far less than what was spent
    CHECK(total() <= kBigBurst + kBigRate * elapsed_s);

    // Phase 2: the feeder dies, and a rebase of its record dies between its two steps. Its own
    // rebase (every 10^8 tokens) leaves in_flight at 0 when no take lands during it, and the
    // workers' takes (10^7 each) may find less than that held: a rebase of nothing has no step to
    // die between (the rebaser then exits 0; seen in about one run in ten). So the feeder is
    // stopped and this thread takes what may be taken, which stays in flight, and the feeder is
    // killed while still stopped (ChildProcess::stop continues it first, and a feeder continued
    // with 10^8 in flight rebased it to 0 before the SIGKILL landed).
    bool in_flight_at_kill = false;
    for (int attempt = 0; attempt < 100 && !in_flight_at_kill; ++attempt) {
        host.feeder.signal(SIGSTOP);
        std::this_thread::sleep_for(10ms);  // a rebase under way when the signal came is done
        // Take all that may be taken, so that in flight is at least the headroom left: then the
        // rebase's first step (target lowered by all in flight) leaves the target below in
        // flight, whatever the feeder's own rebases left in flight and the lease in the bucket.
        for (double chunk = 1e7; chunk >= 1; chunk /= 10) {
            while (local.try_take(chunk) == lim::TryTake::taken)
                in_flight_at_kill = true;
        }
        if (!in_flight_at_kill) {
            host.feeder.signal(SIGCONT);
            std::this_thread::sleep_for(20ms);
        }
    }
    if (!in_flight_at_kill) stop_workers();
    REQUIRE(in_flight_at_kill);
    host.feeder.signal(SIGKILL);
    host.feeder.stop(SIGKILL);
    const pid_t rebaser = lim::test::fork_child([segment] {
        auto s = lim::Segment::open(segment);
        lim::Limiter l = lim::Limiter::open(s, "big",
                                            {.hopper_to_bucket_rate_per_sec = lim::infinite,
                                             .bucket_size = kBigBurst,
                                             .initial_bucket_level = 0,
                                             .initial_hopper_level = 0.0},
                                            lim::adopt_existing);
        lim::detail::rebase_consumed_units(
            l, [](void*) { ::raise(SIGKILL); }, nullptr);
        return 0;
    });
    CHECK(lim::test::wait_child(rebaser) == 128 + SIGKILL);
    CHECK(local.token_target_level().value() < local.in_flight());  // nothing may be taken
    CHECK(local.try_take(1) == lim::TryTake::unable);
    const double before_restart = total();
    std::this_thread::sleep_for(100ms);
    CHECK(total() == before_restart);  // and nothing is
    // The restarted feeder repairs the record (target raised to in_flight, then rebased) before
    // it reports to Redis, and feeds again: the host is not starved.
    start_feeder(host);
    const bool fed_again =
        lim::test::eventually([&] { return total() >= before_restart + 1e9; }, 60s);
    stop_workers();
    MESSAGE("after the restart: ", total() - before_restart, " tokens more");
    CHECK(fed_again);
    CHECK(host.feeder.running());
    CHECK(local.token_target_level().value() >= local.in_flight());
    CHECK(local.in_flight() < 1e9);
}

TEST_CASE("lim-feeder: hosts that all want more than there is share by their waiting workers") {
    // Both hosts saturated (every worker blocks in take_until, back to back): each host's ask is
    // capped at the burst, so before, both asked the same and got about equal shares (the demo:
    // 6 workers 105 tokens, 2 workers 157). Redis now divides by each host's want weighted by
    // its sleeping workers: the host with three times the workers gets the larger share.
    std::string dir;
    const auto redis = start_redis("share", dir);
    if (!redis) return;
    constexpr int kHosts = 2;
    const int workers_of[kHosts] = {6, 2};
    std::vector<std::unique_ptr<lim::test::SegmentGuard>> guards;
    const std::vector<std::unique_ptr<Host>> hosts =
        start_hosts(kHosts, "share", dir, redis->port(), guards);
    const int total_workers = workers_of[0] + workers_of[1];
    lim::test::AdmissionLog log(total_workers, kPerWorker);
    auto* counts = lim::test::shared_array<std::int64_t>(total_workers);
    auto* stop = new (lim::test::shared_array<std::atomic<int>>(1)) std::atomic<int>(0);
    std::vector<int> host_of;
    const std::vector<pid_t> pids = fork_workers(
        hosts, workers_of, [](int) { return 0us; }, [](int) { return true; }, log, counts, stop,
        host_of);
    // Past the fence (lease_ttl + grace = 1 s) and the ramp of the asks, measure 4 s.
    std::this_thread::sleep_for(2000ms);
    const std::int64_t from = now_ns();
    std::this_thread::sleep_for(4000ms);
    const std::int64_t to = now_ns();
    stop->store(1);
    for (const pid_t pid : pids)
        CHECK(lim::test::wait_child(pid) == 0);
    std::vector<Admission> all;
    std::size_t of_host[kHosts] = {0, 0};
    for (int w = 0; w < total_workers; ++w) {
        const std::vector<Admission> mine(log.part(w), log.part(w) + counts[w]);
        of_host[host_of[w]] += count_between(mine, from, to);
        all.insert(all.end(), mine.begin(), mine.end());
    }
    const lim::test::BucketCheck check =
        lim::test::check_bucket(all, kBurst * 10'000, kRate * 10'000, 10'000, all.size());
    const double seconds = static_cast<double>(to - from) / 1e9;
    const double offered = kBurst + kRate * seconds;
    const auto busy = static_cast<double>(of_host[0]);
    const auto light = static_cast<double>(of_host[1]);
    MESSAGE("saturated for " << seconds << " s: 6-worker host " << of_host[0] << ", 2-worker host "
                             << of_host[1] << " (shares " << busy / (busy + light) << " : "
                             << light / (busy + light) << "); utilisation "
                             << (busy + light) / offered << "; worst window excess "
                             << check.worst_excess_units / 10'000.0);
    CHECK(check.worst_excess_units <= 0);  // the bound, always
    // Both hosts are fed. The shares (about 3:1 by workers on time) are printed, not asserted:
    // the weight is the workers asleep when each feeder ticks, which a loaded machine decides
    // (under ASan with two busy loops: 55 to the 6-worker host, 95 to the 2-worker one, once in
    // ten runs).
    CHECK(of_host[0] > 0);
    CHECK(of_host[1] > 0);
}

#if LIM_TEST_HIREDIS
namespace {

// One simulated host of the lease protocol, calling the lease script (tools/feeder/scripts.hpp)
// exactly as lim-feeder does (the same text by EVAL, the same ARGV), and spending each grant at
// once, before its local deadline (asked + lease_ttl), as its workers may.
struct SimHost {
    std::string name;
    std::string instance;
    double sleepers;  // workers asleep on its record: its weight is want x (1 + sleepers)
    std::int64_t last_us;
    std::int64_t deadline_us = 0;
    long long held = 0;  // units, spendable until deadline_us
};

std::int64_t mono_us() {
    return now_ns() / 1000;
}

struct ShareRun {
    std::vector<long long> busy, light;  // units granted at each round's call
    std::vector<Admission> admitted;     // every spend, in units
};

}  // namespace

// Issue 12, item 5: "with skewed demand the busy hosts get most of the budget". The feeders'
// case above prints the share: which host gets more is decided by how many of its workers sleep
// when each feeder ticks, i.e. by the scheduler. Here two hosts drive the lease script on a real
// redis-server with a demand the test sets, and the share is asserted as an invariant of the
// script, whatever the timing: both want the whole burst at every call, the busy host with the
// weight of 2 sleeping workers (want x 3), the light one with none (want x 1); they call in turn
// and spend each grant at once. At its call a host gets floor(tokens x its weight / the weights of
// the hosts that want), so the light host takes at most a quarter of what it finds, and the busy
// host's next call finds at least the three quarters left (refills only add; the clamp to
// burst - leases cannot take away what the light host left, and neither entry can expire between
// two consecutive calls, p advancing at most grace = lease_ttl per call): busy(i+1) >= 9/4 x
// light(i) - 1 unit, so the busy host's share is at least 9/13 (0.69) of all but the light host's
// last grant (0.69 to 0.92 by the timing of the calls). The bound burst + rate x T is checked over
// every window of the spends.
TEST_CASE("lease script: the host with the larger demand gets the larger share, within the bound") {
    if (lim::test::find_redis_server().empty()) {
        MESSAGE("SKIPPED: redis-server is not installed");
        return;
    }
    std::string dir;
    const auto redis = start_redis("sim-share", dir);
    REQUIRE(redis);
    lim::test::RedisTestClient redis_client(redis->port());
    constexpr long long kUnitsPer = 10'000;
    constexpr long long kSimBurst = 10 * kUnitsPer;
    constexpr long long kSimRate = 100 * kUnitsPer;  // per second
    constexpr long long kTtlUs = 500'000;            // lease_ttl = grace: the fence is 1 s of p
    const std::int64_t start = mono_us();
    SimHost busy{"busy", "00000000000000b1", 2, start};
    SimHost light{"light", "00000000000000a1", 0, start};
    ShareRun run;
    const auto call = [&](SimHost& h) {
        const std::int64_t asked = mono_us();
        const long long held = asked < h.deadline_us ? h.held : 0;  // spent at once: 0
        const long long want = kSimBurst - held;
        const long long weight = std::llround(static_cast<double>(want) * (1 + h.sleepers));
        redisReply* r = redis_client.cmd(
            {"EVAL", lim::feeder::kLeaseScript, "3", "lim:global2:{share}",
             "lim:global2:{share}:leases", "lim:global:{share}:leases", h.name,
             std::to_string(held), "0", std::to_string(want), std::to_string(kTtlUs),
             std::to_string(kSimBurst), std::to_string(kSimRate), std::to_string(kTtlUs),
             std::to_string(weight), h.instance, std::to_string(asked - h.last_us),
             std::to_string(asked)});
        h.last_us = asked;
        REQUIRE(r != nullptr);
        const bool ok = r->type == REDIS_REPLY_ARRAY && r->elements == 3;
        if (!ok && r->type == REDIS_REPLY_ERROR) MESSAGE("lease script: " << std::string(r->str));
        const long long keep = ok ? r->element[0]->integer : 0;
        const long long granted = ok ? r->element[1]->integer : 0;
        freeReplyObject(r);
        REQUIRE(ok);
        // The feeder's step 4: keep min(held, keep) and the grant; the new deadline.
        h.held = std::min(held, keep) + granted;
        h.deadline_us = asked + kTtlUs;
        // Its workers spend it all at once, if before the deadline (else it died unspent).
        const std::int64_t at = mono_us();
        if (at < h.deadline_us && h.held > 0) {
            run.admitted.push_back(Admission{at * 1000, at * 1000, h.held});
            h.held = 0;
        }
        return granted;
    };
    // Past the fence (nothing is granted for ttl + grace of p after the first call).
    bool fed = false;
    for (int i = 0; i < 3000 && !fed; ++i) {
        fed = call(busy) > 0;
        fed = call(light) > 0 || fed;
        std::this_thread::sleep_for(10ms);
    }
    REQUIRE(fed);
    run.admitted.clear();  // the spends of the fence's last round are not in the rounds below
    const std::int64_t from = mono_us();
    constexpr int kRounds = 150;
    for (int i = 0; i < kRounds; ++i) {
        run.busy.push_back(call(busy));
        run.light.push_back(call(light));
        std::this_thread::sleep_for(10ms);
    }
    const std::int64_t to = mono_us();
    long long busy_total = 0;
    long long light_total = 0;
    for (int i = 0; i < kRounds; ++i) {
        busy_total += run.busy[static_cast<std::size_t>(i)];
        light_total += run.light[static_cast<std::size_t>(i)];
        // The invariant, call by call: what the light host left, the busy host finds.
        if (i > 0) {
            CAPTURE(i);
            CHECK(4 * run.busy[static_cast<std::size_t>(i)] + 4 >=
                  9 * run.light[static_cast<std::size_t>(i) - 1]);
        }
    }
    const double seconds = static_cast<double>(to - from) / 1e6;
    const double offered =
        (static_cast<double>(kSimBurst) + static_cast<double>(kSimRate) * seconds) /
        static_cast<double>(kUnitsPer);
    const double busy_tokens = static_cast<double>(busy_total) / kUnitsPer;
    const double light_tokens = static_cast<double>(light_total) / kUnitsPer;
    const lim::test::BucketCheck check =
        lim::test::check_bucket(run.admitted, kSimBurst, kSimRate, kUnitsPer, run.admitted.size());
    MESSAGE("weights 3:1 for " << seconds << " s: busy host " << busy_tokens << " tokens, light "
                               << light_tokens << " (busy share "
                               << busy_tokens / (busy_tokens + light_tokens)
                               << ", at least 9/13 = 0.69 asserted); utilisation "
                               << (busy_tokens + light_tokens) / offered << "; worst window excess "
                               << check.worst_excess_units / 1e4);
    CHECK(light_total > 0);
    const long long light_last = run.light.back();
    // Summed: busy >= 9/4 x (light - its last grant) - a unit a round.
    CHECK(4 * busy_total + 4 * kRounds >= 9 * (light_total - light_last));
    CHECK(busy_total > light_total);
    CHECK(check.worst_excess_units <= 0);  // burst + rate x T over every window of the spends
}
#endif  // LIM_TEST_HIREDIS
