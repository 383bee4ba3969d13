// Generation checkpoints (lib/src/limiter/generation_checkpoint.hpp; docs/design.md, "Generation
// checkpoints"): a taker stopped between its load of the bucket word S and its CAS must never see
// S's 16-bit generation come round to the value it read.
//
// The taker here is a real process in the real take: a TokenBucket whose rate is not a whole
// number of units per second (so its take always runs try_take_bucket's loop) and a test hook
// (detail::bucket_take_hook) that makes the taker raise SIGSTOP on itself after it has decided to
// take and before its CAS. The other side reconfigures the record through a Limiter handle, one
// switch per cycle, and drains the bucket after each: S is (generation, 0) after every cycle, so
// after 65,536 of them the stopped taker's expected word is back. Without the checkpoints that
// CAS lands and admits half a bucket on top of every drip (checked: with generation_may_advance
// always true, the first case admits 6,553,750 tokens against a bound of 6,553,701.6).
#include <doctest/doctest.h>

#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "lim/error.hpp"
#include "lim/limiter.hpp"
#include "lim/segment.hpp"
#include "lim/throttle.hpp"
#include "lim/token_bucket.hpp"
#include "limiter/generation_checkpoint.hpp"
#include "limiter/limiter_state.hpp"
#include "support/limiter_records.hpp"
#include "support/limiter_time.hpp"
#include "support/process.hpp"

using namespace lim;
using lim::test::body_of;
using lim::test::generation;
using lim::test::t0;

namespace {

// 100.000025 tokens/s: R = 1,000,000.25 units/s is not whole, so the drip has no short form and
// every take runs try_take_bucket (where the hook is). In one period P = 1 s the drip is
// floor(1,000,000.25) = 10^6 units: exactly the bucket.
constexpr double kRate = 100.000025;
constexpr double kBurst = 100;
constexpr std::int64_t kPeriodNs = 1'000'000'000;

std::atomic<bool> stop_fired{false};

// In the taker's process only: stops it once, between its decision and its CAS.
void stop_once() noexcept {
    if (!stop_fired.exchange(true)) ::raise(SIGSTOP);
}

void wait_until_stopped(pid_t pid) {
    int st = 0;
    pid_t r = 0;
    while ((r = ::waitpid(pid, &st, WUNTRACED)) < 0 && errno == EINTR) {
    }
    REQUIRE(r == pid);
    INFO("status " << st);
    REQUIRE(WIFSTOPPED(st));
}

// Forks the taker: a take of half the bucket at `at` (after the drip's anchor: at the anchor the
// drip is 0 whatever the rate, and the inline attempt takes it), stopped before its CAS. Exits 1
// if its take was admitted, 0 if refused.
pid_t stopped_taker(TokenBucket& tb, TimePoint at = t0 + std::chrono::nanoseconds(kPeriodNs / 2)) {
    const pid_t pid = lim::test::fork_child([&] {
        detail::bucket_take_hook.store(&stop_once);
        const TryTake r = tb.try_take(at, kBurst / 2);
        return r == TryTake::taken ? 1 : 0;
    });
    wait_until_stopped(pid);
    return pid;
}

// Whether a live slot other than this thread's is announced on `record`.
bool announced_elsewhere(const Segment& seg, std::uint32_t record) {
    const auto& state = *seg.state();
    for (std::uint32_t i = 0; i < state.geometry().max_processes; ++i) {
        const std::uint32_t p = state.slot(i).pending.load();
        if (p == record + 1 || p == ((record + 1) | detail::kBucketTakeTag)) return true;
    }
    return false;
}

// A segment holding the token bucket `key` of this file's rate, full at t0, and a Limiter handle
// adopting it (the reconfigurations), with its body and record index.
struct CheckpointBucket {
    lim::test::SegmentGuard guard;
    Segment seg;
    TokenBucket tb;
    Limiter l;
    detail::LimiterBody& body;
    std::uint32_t record;

    CheckpointBucket(std::string_view stem, const char* key)
        : guard(lim::test::unique_name(stem)),
          seg(lim::test::limiter_segment(guard)),
          tb(TokenBucket::open(seg, key,
                               {.burst_size = kBurst,
                                .sustained_rate_per_sec = kRate,
                                .initial_bucket_level = kBurst},
                               t0)),
          l(Limiter::open(seg, key, {.bucket_size = 1}, lim::adopt_existing, t0)),
          body(body_of(seg, key)),
          record(lim::test::record_of(seg, key)) {}

    // Straight to two switches before the checkpoint: the generation moved by hand to a value
    // whose block (gen & 1 = 0) is the one in use, X kept.
    void skip_to_checkpoint_minus_2() {
        const std::uint64_t s = body.bucket.load();
        body.bucket.store(
            detail::BucketWord::make(detail::kGenerationCheckpoint - 2, detail::BucketWord::x(s)));
    }
};

}  // namespace

TEST_CASE(
    "a taker stopped between its load of S and its CAS holds the generation at the next "
    "checkpoint: reconfigurations are refused (busy) there, and nothing beyond burst + rate x T "
    "is admitted") {
    CheckpointBucket b("gen-ckpt", "tb");
    Segment& seg = b.seg;
    TokenBucket& tb = b.tb;
    Limiter& l = b.l;
    detail::LimiterBody& body = b.body;
    const std::uint32_t record = b.record;
    double admitted = 0;
    REQUIRE(tb.try_take(t0, kBurst) == TryTake::taken);
    admitted += kBurst;
    REQUIRE(generation(body) == 0);
    REQUIRE(detail::BucketWord::x(body.bucket.load()) == 0);
    const std::uint64_t seen_by_taker = body.bucket.load();

    const pid_t taker = stopped_taker(tb);
    CHECK(body.bucket.load() == seen_by_taker);  // it decided, and has not CASed
    CHECK(announced_elsewhere(seg, record));     // its attempt is announced

    // Each cycle: a re-anchoring switch at t_k (the bucket full again: X = -C), then the whole
    // bucket taken (X = 0). 65,536 cycles would bring S back to the taker's word.
    std::int64_t t = to_nanos(t0);
    int refused_at = 0;
    std::string refusal;
    for (int k = 1; k <= 65'536; ++k) {
        t += kPeriodNs;
        try {
            l.set_hopper_to_bucket_rate_per_sec(from_nanos(t), kRate);
        } catch (const Error& e) {
            CHECK(e.code() == Errc::busy);
            refused_at = k;
            refusal = e.what();
            break;
        }
        REQUIRE(tb.try_take(from_nanos(t), kBurst) == TryTake::taken);
        admitted += kBurst;
    }
    CHECK(refused_at == static_cast<int>(detail::kGenerationCheckpoint));
    CHECK(generation(body) == detail::kGenerationCheckpoint - 1);
    CHECK(refusal.find("stopped") != std::string::npos);
    CHECK(body.bucket.load() != seen_by_taker);

    // The taker runs again: its CAS fails (the generation moved), and it decides afresh at the
    // limiter's time, where the bucket has just been drained.
    REQUIRE(::kill(taker, SIGCONT) == 0);
    const int took = lim::test::wait_child(taker);
    CHECK(took == 0);
    if (took == 1) admitted += kBurst / 2;
    // burst + rate x T over [t0, t], T in whole periods (rate x P = 100.000025 tokens).
    const double periods = static_cast<double>(t - to_nanos(t0)) / kPeriodNs;
    const double bound = kBurst + kRate * periods;
    MESSAGE("admitted " << admitted << " tokens in " << periods << " s; bound " << bound);
    CHECK(admitted <= bound);

    // With the taker gone, the checkpoint lets the generation move on (once the refusal's memo,
    // kCheckpointMemo, has passed: until then a switch at the checkpoint is refused at once).
    CHECK(lim::test::eventually([&] {
        try {
            l.set_hopper_to_bucket_rate_per_sec(from_nanos(t), kRate);
            return true;
        } catch (const Error& e) {
            return e.code() == Errc::busy ? false : throw;
        }
    }));
    CHECK(generation(body) == detail::kGenerationCheckpoint);
}

TEST_CASE(
    "a taker that died between its load of S and its CAS does not hold the generation: its "
    "announcement is ignored once its owner is dead") {
    CheckpointBucket b("gen-ckpt-dead", "tb");
    Segment& seg = b.seg;
    TokenBucket& tb = b.tb;
    Limiter& l = b.l;
    detail::LimiterBody& body = b.body;
    const std::uint32_t record = b.record;
    REQUIRE(tb.try_take(t0, kBurst) == TryTake::taken);
    const pid_t taker = stopped_taker(tb);
    lim::test::kill_and_wait(taker);
    CHECK(announced_elsewhere(seg, record));  // its slot still names the record (not reaped)

    b.skip_to_checkpoint_minus_2();
    std::int64_t t = to_nanos(t0);
    for (int k = 0; k < 2; ++k) {
        t += kPeriodNs;
        CHECK_NOTHROW(l.set_hopper_to_bucket_rate_per_sec(from_nanos(t), kRate));
        CHECK(tb.try_take(from_nanos(t), kBurst) == TryTake::taken);
    }
    CHECK(generation(body) == detail::kGenerationCheckpoint);
}

TEST_CASE(
    "at a checkpoint, a rebase that does not wait gives up on a stopped taker (false, nothing "
    "changed) and a waiting one is refused busy; both go through once it continues") {
    CheckpointBucket b("gen-ckpt-rebase", "tb");
    Segment& seg = b.seg;
    TokenBucket& tb = b.tb;
    detail::LimiterBody& body = b.body;
    const std::uint32_t record = b.record;
    REQUIRE(tb.try_take(t0, kBurst) == TryTake::taken);
    b.skip_to_checkpoint_minus_2();
    const pid_t taker = stopped_taker(tb);
    detail::LimiterCore core(*seg.state(), record);
    const std::int64_t t = to_nanos(t0) + kPeriodNs;
    CHECK(core.rebase(t, std::nullopt));  // to kGenerationCheckpoint - 1: no checkpoint
    const std::uint64_t before = body.bucket.load();
    bool refused = false;
    CHECK_FALSE(core.rebase(t, std::nullopt, &refused));  // soft: a try's wait, then refused
    CHECK(refused);
    CHECK(body.bucket.load() == before);
    // A try's hard rebase makes the checkpoint (kCheckpointWait at least), and is refused busy;
    // another within kCheckpointMemo is refused at once, and neither changes anything.
    for (int i = 0; i < 2; ++i) {
        const auto start = std::chrono::steady_clock::now();
        CHECK_THROWS_AS(core.rebase_hard(t, detail::RebaseWait{}), Error);
        const auto took = std::chrono::steady_clock::now() - start;
        if (i == 1) CHECK(took < detail::kCheckpointWait);
        CHECK(body.bucket.load() == before);
    }
    REQUIRE(::kill(taker, SIGCONT) == 0);
    // Its CAS fails (the generation moved); it decides again on the re-anchored bucket.
    const int took = lim::test::wait_child(taker);
    CHECK((took == 0 || took == 1));
    // Within the second after a refusal, a soft rebase gives up at once; once the memo has
    // passed, a rebase makes the checkpoint.
    CHECK_FALSE(core.rebase(t, std::nullopt));
    CHECK(lim::test::eventually(
        [&] { return core.rebase(t, Clock::now() + std::chrono::seconds{5}); }));
    CHECK(generation(body) == detail::kGenerationCheckpoint);
}

namespace {

// Threads taking from a token bucket in a loop (never stopped), more of them than cores.
struct BusyTakers {
    std::atomic<bool> stop{false};
    std::vector<std::thread> threads;
    BusyTakers(TokenBucket& tb, int n) {
        for (int i = 0; i < n; ++i) {
            threads.emplace_back([&] {
                while (!stop.load(std::memory_order_relaxed))
                    (void)tb.try_take(0.001);
            });
        }
    }
    ~BusyTakers() {
        stop = true;
        for (auto& t : threads)
            t.join();
    }
};

constexpr int kBusyTakers = 16;

}  // namespace

// A token bucket's take is announced with a tag that a reap's and a reset's quiescence waits do
// not wait for (it changes no word they recount, and does not step aside from a frozen one):
// untagged, 16 busy takers on 2 cores kept some slot announced nearly always, and resets were
// refused busy (20 of 20 with 32 takers) and reaps deferred.
TEST_CASE("a reset of a token bucket with busy (never stopped) takers is not refused") {
    lim::test::SegmentGuard guard(lim::test::unique_name("gen-ckpt-reset"));
    auto seg = lim::test::limiter_segment(guard);
    auto tb = TokenBucket::open(
        seg, "tb", {.burst_size = 1e6, .sustained_rate_per_sec = 1e6, .initial_bucket_level = 1e6});
    const BusyTakers takers(tb, kBusyTakers);
    int busy = 0;
    for (int i = 0; i < 10; ++i) {
        try {
            seg.reset({.key = "tb"});
        } catch (const Error& e) {
            CHECK(e.code() == Errc::busy);
            ++busy;
        }
    }
    CHECK(busy == 0);
}

TEST_CASE("a reap of a token bucket a dead process took from, with busy takers, is not deferred") {
    lim::test::SegmentGuard guard(lim::test::unique_name("gen-ckpt-reap"));
    auto seg = lim::test::limiter_segment(guard);
    auto tb = TokenBucket::open(
        seg, "tb", {.burst_size = 1e6, .sustained_rate_per_sec = 1e6, .initial_bucket_level = 1e6});
    const pid_t child = lim::test::child_holding([&] { (void)tb.try_take(1); });
    lim::test::kill_and_wait(child);
    const BusyTakers takers(tb, kBusyTakers);
    const ReapReport r = seg.reap();
    CHECK(r.deferred.empty());
    CHECK(r.reaped.size() == 1);
}

// A refused checkpoint is remembered in the record (kCheckpointMemo), so a writer retrying the
// record while a thread stays stopped holds the segment's config lock for a checkpoint's wait
// once per memo, not on every try: other records' switches, which share the lock, go on, and a
// reap that must fold an unrelated record takes no lock at all when nothing needs folding.
TEST_CASE(
    "a stopped taker at a checkpoint, and a writer retrying that record: other records are "
    "reconfigured and reaped as usual") {
    CheckpointBucket b("gen-ckpt-other", "a");
    Segment& seg = b.seg;
    TokenBucket& tb = b.tb;
    Limiter& la = b.l;
    detail::LimiterBody& body = b.body;
    auto lb = Limiter::open(seg, "b",
                            {.hopper_to_bucket_rate_per_sec = 10.0,
                             .bucket_size = 10,
                             .initial_bucket_level = 10,
                             .initial_hopper_level = 0});
    auto thr = Throttle::open(seg, "thr", {.max_concurrent_jobs = 4});
    b.skip_to_checkpoint_minus_2();
    la.set_hopper_to_bucket_rate_per_sec(t0 + std::chrono::seconds{1}, kRate);
    REQUIRE(generation(body) == detail::kGenerationCheckpoint - 1);
    const pid_t holder = lim::test::child_holding([&] { (void)thr.try_start_job(); });
    lim::test::kill_and_wait(holder);
    const pid_t taker = stopped_taker(tb, t0 + std::chrono::milliseconds{1'500});
    std::atomic<bool> stop{false};
    std::atomic<int> a_refused{0};
    std::thread writer([&] {
        while (!stop) {
            try {
                la.set_hopper_to_bucket_rate_per_sec(t0 + std::chrono::seconds{3}, kRate);
            } catch (const Error& e) {
                if (e.code() == Errc::busy) ++a_refused;
            }
        }
    });
    REQUIRE(lim::test::eventually([&] { return a_refused.load() > 0; }));
    int b_busy = 0;
    for (int i = 0; i < 5; ++i) {
        try {
            lb.set_token_target_level(10.0 + i);
        } catch (const Error& e) {
            CHECK(e.code() == Errc::busy);
            ++b_busy;
        }
    }
    const ReapReport r = seg.reap();
    stop = true;
    writer.join();
    REQUIRE(::kill(taker, SIGCONT) == 0);
    const int took = lim::test::wait_child(taker);
    CHECK((took == 0 || took == 1));
    CHECK(b_busy == 0);
    CHECK(r.deferred.empty());
    CHECK(r.reaped.size() == 1);
    CHECK(generation(body) == detail::kGenerationCheckpoint - 1);
}
