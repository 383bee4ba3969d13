// lim::convert_to_consumed: a worker opened a global rate before lim-feeder made it (SPEC's
// TokenBucket::open(..., adopt_existing) creates the key), so the record is a plain token bucket;
// the feeder converts it in place into its consumed record, holding nothing. From the conversion
// on, no take is admitted but from what the target writer grants: by TokenBucket handles opened
// before it, by a take() asleep on it, in any process; a converter killed at any step leaves a
// state that a second call finishes; converting twice changes nothing; a reap afterwards gives
// nothing back.
#include <signal.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "lim/consumed_limiter.hpp"
#include "lim/lim.hpp"
#include "limiter/consumed_rebase.hpp"
#include "limiter/limiter_state.hpp"
#include "shm/file_lock.hpp"
#include "shm/ledger.hpp"
#include "shm/records.hpp"
#include "support/consumed_records.hpp"
#include "support/limiter_records.hpp"
#include "support/process.hpp"

using lim::test::feeder_config;
using lim::test::grant;
using lim::test::worker_bucket;
using namespace std::chrono_literals;

namespace {

lim::detail::Record& record_of(const lim::Segment& seg, const std::string& key) {
    return seg.state()->record(lim::test::record_of(seg, key));
}

std::uint16_t flavor_of(const lim::Segment& seg, const std::string& key) {
    return lim::detail::load_flavor(record_of(seg, key).header);
}

std::uint32_t created_flags(const lim::Segment& seg, const std::string& key) {
    lim::detail::LimiterRecordConfig c{};
    std::memcpy(&c, record_of(seg, key).config, sizeof c);
    return c.flags;
}

std::uint64_t bucket_word(const lim::Segment& seg, const std::string& key) {
    return lim::test::body_of(seg, key).bucket.load();
}

// The state a finished conversion leaves, with at most `extra` tokens back in flight (takes that
// landed between clearing in_flight and the switch).
void check_converted(const lim::Segment& seg, const std::string& key, lim::Limiter& l, double burst,
                     double extra = 0) {
    CHECK(lim::is_consumed(l));
    CHECK(l.hopper_to_bucket_rate_per_sec().is_infinite());
    CHECK(l.bucket_size() == burst);
    CHECK(l.token_target_level().value_or(-1) == 0);
    CHECK(l.in_flight() <= extra);
    CHECK(l.in_bucket() == 0);
    const auto d = lim::lease_deadline(l);
    REQUIRE(d.has_value());
    CHECK(*d < lim::Clock::now());
    CHECK(flavor_of(seg, key) == static_cast<std::uint16_t>(lim::detail::LimiterFlavor::limiter));
    CHECK(created_flags(seg, key) == (lim::detail::kRateInfinite | lim::detail::kConsumed));
    l.invariant();
}

}  // namespace

TEST_CASE("convert: a worker's token bucket becomes the feeder's record; twice is a no-op") {
    lim::test::SegmentGuard guard(lim::test::unique_name("convert"));
    auto seg = lim::Segment::open_or_create(guard.name(), lim::SegmentOptions{});
    // A worker creates the key as SPEC's worker line does, before any feeder, and takes at its
    // local rate: 6 by try_take (the token bucket's own take: ledger layer 1), 3 by take (the
    // general take: in_flight and ledger layer 0). It stays alive, holding its handle.
    auto* took = lim::test::make_flag();
    auto* go = lim::test::make_flag();
    auto* after = lim::test::shared_array<std::atomic<int>>(3);  // taken, unable, timed out
    const pid_t worker = lim::test::fork_child([&] {
        auto tb = worker_bucket(seg, "api", 100, 1000, 100);
        for (int i = 0; i < 6; ++i) {
            if (tb.try_take(1) != lim::TryTake::taken) return 1;
        }
        for (int i = 0; i < 3; ++i)
            tb.take(1);
        took->set();
        go->wait();
        // The handle opened before the conversion: bound by what is granted (5), nothing more.
        for (int i = 0; i < 20; ++i) {
            const lim::TryTake r = tb.try_take(1);
            after[r == lim::TryTake::taken ? 0 : 1].fetch_add(1);
        }
        if (!tb.take_until(1, lim::Clock::now() + 200ms)) after[2].fetch_add(1);
        return 0;
    });
    took->wait();
    CHECK(flavor_of(seg, "api") ==
          static_cast<std::uint16_t>(lim::detail::LimiterFlavor::token_bucket));

    // lim-feeder adopts it (open_consumed_limiter adopts what exists), finds it not consumed.
    lim::Limiter l = lim::open_consumed_limiter(seg, "api", feeder_config(10));
    REQUIRE_FALSE(lim::is_consumed(l));
    const lim::ConsumedConversion c = lim::convert_to_consumed(l, 10);
    CHECK(c.converted);
    CHECK(c.bucket_taken == 6);
    CHECK(c.in_flight == 3);
    check_converted(seg, "api", l, 10);

    // Converting again (a restarted feeder) changes nothing: not even the generation.
    const std::uint64_t s = bucket_word(seg, "api");
    const lim::ConsumedConversion again = lim::convert_to_consumed(l, 10);
    CHECK_FALSE(again.converted);
    CHECK(bucket_word(seg, "api") == s);
    check_converted(seg, "api", l, 10);

    // The feeder grants 5; the worker's old handle takes exactly those.
    grant(l, 5);
    go->set();
    REQUIRE(lim::test::wait_child(worker) == 0);
    CHECK(after[0].load() == 5);
    CHECK(after[1].load() == 15);
    CHECK(after[2].load() == 1);  // take_until: nothing more without a grant
    CHECK(l.in_flight() == 5);
    // Converting now, with tokens spent from a lease, still changes nothing.
    CHECK_FALSE(lim::convert_to_consumed(l, 10).converted);
    CHECK(l.in_flight() == 5);

    // The worker is gone: a reap gives nothing back (a consumed record) although its ledgers
    // still say it took 9 before the conversion, and reports nothing given back for this record.
    const lim::ReapReport report = seg.reap();
    for (const auto& p : report.reaped) {
        for (const auto& r : p.returned)
            CHECK_MESSAGE(r.key != "api", "reported given back: " << r.amount);
    }
    CHECK(l.in_flight() == 5);
    CHECK(l.token_target_level().value_or(-1) == 5);
    l.invariant();

    // A reset restores the creation configuration, which is now the feeder's: consumed, empty.
    seg.reset(lim::ResetOptions{.key = "api"});
    CHECK(lim::is_consumed(l));
    CHECK(l.token_target_level().value_or(-1) == 0);
    CHECK(l.try_take(1) == lim::TryTake::unable);
}

TEST_CASE("convert: a take() asleep on the record is woken, re-checks, and waits for the lease") {
    lim::test::SegmentGuard guard(lim::test::unique_name("convsleep"));
    auto seg = lim::Segment::open_or_create(guard.name(), lim::SegmentOptions{});
    // The worker's bucket is empty and refills one token in 10 s: its take() sleeps.
    auto* admitted = lim::test::shared_array<std::atomic<int>>(1);
    (void)worker_bucket(seg, "api", 1, 0.1);  // the key exists before the feeder opens it
    const pid_t worker = lim::test::fork_child([&] {
        auto tb = worker_bucket(seg, "api", 1, 0.1);
        // (Bounded, so that a failed check below cannot leave it asleep for ever.)
        if (!tb.take_until(1, lim::Clock::now() + 120s)) return 1;
        admitted->store(1);
        return 0;
    });
    lim::Limiter l = lim::open_consumed_limiter(seg, "api", feeder_config(5));
    REQUIRE(lim::test::eventually([&] { return l.waiters() == 1; }));
    REQUIRE(lim::convert_to_consumed(l, 5).converted);
    // Tokens, but no lease (the deadline is past): the switch woke the sleeper, which re-checked
    // and sleeps again; a raise of the target wakes it again, and it still may not take.
    l.set_token_target_level(l.in_flight() + 1);
    CHECK(l.in_bucket() == 1);
    std::this_thread::sleep_for(300ms);
    CHECK(admitted->load() == 0);
    CHECK(l.waiters() == 1);
    CHECK(l.in_flight() == 0);
    // The lease: admitted.
    lim::set_lease_deadline(l, lim::Clock::now() + 10s);
    CHECK(lim::test::eventually([&] { return admitted->load() == 1; }));
    CHECK(lim::test::wait_child(worker) == 0);
    CHECK(l.in_flight() == 1);
}

TEST_CASE("convert: forked takers on handles opened before it admit exactly what is granted") {
    lim::test::SegmentGuard guard(lim::test::unique_name("convrace"));
    auto seg = lim::Segment::open_or_create(guard.name(), lim::SegmentOptions{});
    constexpr int kTakers = 4;
    constexpr double kGrant = 50;
    constexpr int kGrants = 20;
    auto* converted = lim::test::make_flag();
    auto* stop = lim::test::make_flag();
    auto* ready = lim::test::shared_array<std::atomic<int>>(1);
    // Tokens admitted to takes that began after the conversion had returned (so certainly after
    // it), by taker.
    auto* post = lim::test::shared_array<std::atomic<std::int64_t>>(kTakers);
    (void)worker_bucket(seg, "api", 1000, 1e6, 1000);  // the first worker made it
    std::vector<pid_t> pids;
    for (int i = 0; i < kTakers; ++i) {
        pids.push_back(lim::test::fork_child([&, i] {
            auto tb = worker_bucket(seg, "api", 1000, 1e6);
            ready->fetch_add(1);
            const double sizes[] = {1, 3, 7};
            for (std::uint64_t k = 0; stop->value.load() == 0; ++k) {
                const double n = sizes[(k + static_cast<std::uint64_t>(i)) % 3];
                const bool after = converted->value.load() != 0;
                // Half poll (the token bucket's own take first), half block briefly.
                const bool taken = (i % 2 == 0) ? tb.try_take(n) == lim::TryTake::taken
                                                : tb.take_until(n, lim::Clock::now() + 2ms);
                if (taken && after) post[i].fetch_add(static_cast<std::int64_t>(n));
            }
            return 0;
        }));
    }
    REQUIRE(lim::test::eventually([&] { return ready->load() == kTakers; }));
    std::this_thread::sleep_for(50ms);  // they take at the token bucket's rate meanwhile
    lim::Limiter l = lim::open_consumed_limiter(seg, "api", feeder_config(kGrant));
    const lim::ConsumedConversion c = lim::convert_to_consumed(l, kGrant);
    converted->set();
    REQUIRE(c.converted);
    MESSAGE("taken before the conversion: " << c.bucket_taken << " by try_take, " << c.in_flight
                                            << " by take");
    CHECK(c.bucket_taken + c.in_flight > 0);
    // Takes that began before the switch and landed between clearing in_flight and the switch
    // are back in flight; the target is 0, so they leave nothing to take.
    const double left = l.in_flight();
    CHECK(l.in_bucket() == 0);
    std::this_thread::sleep_for(20ms);
    CHECK(l.in_flight() == left);  // nothing admitted without a grant
    double granted = 0;
    for (int k = 0; k < kGrants; ++k) {
        // As lim-feeder: a target below in_flight is raised to it first (nothing gained).
        if (l.token_target_level().value() < l.in_flight()) l.set_token_target_level(l.in_flight());
        grant(l, kGrant);
        granted += kGrant;
        lim::test::eventually([&] { return l.in_bucket() < 7; }, 2s);
    }
    std::this_thread::sleep_for(20ms);
    stop->set();
    for (const pid_t p : pids)
        CHECK(lim::test::wait_child(p) == 0);
    std::int64_t after = 0;
    for (int i = 0; i < kTakers; ++i)
        after += post[i].load();
    MESSAGE("granted " << granted << ", admitted after the conversion " << after << ", in flight "
                       << l.in_flight());
    CHECK(static_cast<double>(after) <= granted);
    // What was granted was spent (a take of 7 may find the last few tokens too few).
    CHECK(static_cast<double>(after) >= granted - kGrants * 7 - kTakers * 7);
    CHECK(l.in_flight() - left <= granted);
    l.invariant();
}

TEST_CASE("convert: a converter killed after any step leaves a safe state; a second call ends it") {
    for (int step = 1; step <= 4; ++step) {
        CAPTURE(step);
        lim::test::SegmentGuard guard(lim::test::unique_name("convkill"));
        auto seg = lim::Segment::open_or_create(guard.name(), lim::SegmentOptions{});
        auto tb = worker_bucket(seg, "api", 10, 1000, 10);
        REQUIRE(tb.try_take(2) == lim::TryTake::taken);
        tb.take(1);  // in flight (the general take)
        lim::Limiter l = lim::open_consumed_limiter(seg, "api", feeder_config(4));
        struct Ctx {
            int step;
        } ctx{step};
        const pid_t converter = lim::test::fork_child([&] {
            lim::detail::convert_to_consumed_units(
                l, 4,
                [](int at, void* p) {
                    if (at == static_cast<Ctx*>(p)->step) ::kill(::getpid(), SIGKILL);
                },
                &ctx);
            return 1;
        });
        CHECK(lim::test::wait_child(converter) == 128 + SIGKILL);
        (void)seg.reap();  // the converter's slot: nothing of it held
        if (step < 4) {
            // Not consumed yet: still a token bucket for its takers (its own rate: this is
            // before the conversion), and the next call converts it from where it stands.
            CHECK_FALSE(lim::is_consumed(l));
            CHECK(tb.try_take(1) == lim::TryTake::taken);
            const lim::ConsumedConversion c = lim::convert_to_consumed(l, 4);
            CHECK(c.converted);
        } else {
            CHECK(lim::is_consumed(l));
            CHECK_FALSE(lim::convert_to_consumed(l, 4).converted);
        }
        check_converted(seg, "api", l, 4);
        CHECK(tb.try_take(1) == lim::TryTake::unable);
        grant(l, 3);
        CHECK(tb.try_take(3) == lim::TryTake::taken);
        CHECK(tb.try_take(1) == lim::TryTake::unable);
        CHECK(l.in_flight() == 3);
    }
}

TEST_CASE("convert: in_flight is cleared only once a reaper's recount has thawed the word") {
    lim::test::SegmentGuard guard(lim::test::unique_name("convfrozen"));
    auto seg = lim::Segment::open_or_create(guard.name(), lim::SegmentOptions{});
    auto tb = worker_bucket(seg, "api", 10, 1000, 10);
    tb.take(3);  // the general take: in flight, and in this thread's ledger (layer 0)
    lim::Limiter l = lim::open_consumed_limiter(seg, "api", feeder_config(4));
    const auto rec =
        lim::detail::find_record(*seg.state(), lim::detail::RecordKind::limiter, "api");
    REQUIRE(rec.has_value());
    // As a reaper does: the recovery lock held (so nobody thaws the word behind its back), the
    // record's in-flight word frozen.
    std::optional<lim::detail::FileLock> reaping =
        lim::detail::FileLock::lock_exclusive(seg.state()->fd(), lim::detail::LockByte::recovery);
    lim::detail::kLimiterOps.freeze(*seg.state(), *rec);
    const auto frozen_at = std::chrono::steady_clock::now();
    std::atomic<bool> done{false};
    lim::ConsumedConversion result;
    std::thread converter([&] {
        result = lim::convert_to_consumed(l, 4);
        done = true;
    });
    // Step 1 does not wait for a recount; step 2 (clearing in_flight) waits aside.
    REQUIRE(lim::test::eventually([&] {
        return flavor_of(seg, "api") ==
               static_cast<std::uint16_t>(lim::detail::LimiterFlavor::limiter);
    }));
    std::this_thread::sleep_for(30ms);
    // Read while the freeze is younger than kFrozenBreakTimeout (measured after the reads): past
    // it the converter thaws the word itself (the reaper is presumed stopped) and goes on, which
    // only a badly loaded machine that descheduled this thread that long lets happen.
    const bool done_frozen = done.load();
    const bool consumed_frozen = lim::is_consumed(l);
    const double in_flight_frozen = l.in_flight();
    if (std::chrono::steady_clock::now() - frozen_at < lim::detail::kFrozenBreakTimeout) {
        CHECK_FALSE(done_frozen);
        CHECK_FALSE(consumed_frozen);
        CHECK(in_flight_frozen == 3);
    } else {
        MESSAGE("this thread stalled past the break timeout: the frozen-window checks skipped");
    }
    // The recount reads the rewritten creation configuration: consumed, so it leaves in_flight
    // as it is (the live ledger says 3; a consumed record's recount never stores it).
    lim::detail::LiveHoldings live;
    live.held[0] = 30'000;
    lim::detail::kLimiterOps.recount(*seg.state(), *rec, live, {}, lim::Clock::now());
    reaping.reset();
    converter.join();
    CHECK(result.converted);
    CHECK(result.in_flight == 3);
    check_converted(seg, "api", l, 4);
    CHECK(tb.try_take(1) == lim::TryTake::unable);
}

TEST_CASE("convert: a general Limiter's or a Throttle's record is refused, and left as it was") {
    lim::test::SegmentGuard guard(lim::test::unique_name("convrefuse"));
    auto seg = lim::Segment::open_or_create(guard.name(), lim::SegmentOptions{});
    lim::Limiter general = lim::Limiter::open(seg, "lent", feeder_config(10));
    general.set_token_target_level(10.0);
    REQUIRE(general.try_take(4) == lim::TryTake::taken);  // lent: may be returned
    auto throttle = lim::Throttle::open(seg, "jobs", {.max_concurrent_jobs = 3});
    for (const std::string key : {"lent", "jobs"}) {
        CAPTURE(key);
        lim::Limiter l = lim::open_consumed_limiter(seg, key, feeder_config(10));
        const std::uint64_t s = bucket_word(seg, key);
        const std::uint16_t flavor = flavor_of(seg, key);
        const std::uint32_t flags = created_flags(seg, key);
        try {
            (void)lim::convert_to_consumed(l, 10);
            FAIL("converted");
        } catch (const lim::Error& e) {
            CHECK(e.code() == lim::Errc::invalid_argument);
            CHECK(std::string(e.what()).find("cannot be converted") != std::string::npos);
        }
        CHECK_FALSE(lim::is_consumed(l));
        CHECK(bucket_word(seg, key) == s);
        CHECK(flavor_of(seg, key) == flavor);
        CHECK(created_flags(seg, key) == flags);
    }
    general.return_to_hopper(4);
    CHECK(general.in_flight() == 0);
    lim::Limiter l = lim::open_consumed_limiter(seg, "lent", feeder_config(10));
    CHECK_THROWS_AS(lim::convert_to_consumed(l, 0), lim::Error);
    CHECK_THROWS_AS(lim::convert_to_consumed(l, 2e9), lim::Error);
}
