// A neighbour stopped (SIGSTOP, a debugger, Ctrl-Z) while it holds one of the segment's OFD locks
// (docs/design.md, "Stopped lock holders"). The kernel drops such a lock when its holder dies,
// never when it stops, so every call that waited on it (F_OFD_SETLKW) hung for as long as the
// neighbour stayed stopped. Each case forks a child that takes the lock (through the real code
// path where one can stop inside it, else directly) and stops itself; the parent then calls the
// user API, which must come back with Errc::busy (or its ordinary "not now" answer, for a call
// with a deadline) and change nothing; after the child is continued or killed, the same call
// works and every counter is exact.
//
// A watchdog kills the stopped child after 60 s, so that a call that hangs fails its case (the
// kill releases the lock) instead of hanging ctest. No assertion depends on how long a call took.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "lim/consumed_limiter.hpp"
#include "lim/lim.hpp"
#include "limiter/consumed_rebase.hpp"
#include "shm/file_lock.hpp"
#include "shm/records.hpp"
#include "support/process.hpp"

using namespace lim;
using namespace std::chrono_literals;

namespace {

// Kills `pid` (SIGKILL) if it is still armed after `limit`: a hang then releases the lock and
// fails the case through fired(), instead of hanging the test binary.
class Watchdog {
  public:
    explicit Watchdog(pid_t pid, std::chrono::seconds limit = 60s)
        : thread_([this, pid, limit] {
              std::unique_lock lk(m_);
              if (!cv_.wait_for(lk, limit, [&] { return disarmed_; })) {
                  fired_ = true;
                  ::kill(pid, SIGKILL);
              }
          }) {}
    ~Watchdog() { disarm(); }
    void disarm() {
        {
            std::lock_guard lk(m_);
            disarmed_ = true;
        }
        cv_.notify_all();
        if (thread_.joinable()) thread_.join();
    }
    bool fired() const { return fired_.load(); }

  private:
    std::mutex m_;
    std::condition_variable cv_;
    bool disarmed_ = false;
    std::atomic<bool> fired_{false};
    std::thread thread_;
};

Segment make_segment(const lim::test::SegmentGuard& guard) {
    return Segment::open_or_create(
        guard.name(),
        {.max_limiters = 16, .max_processes = 32, .reap_after = 0s, .reap_on_attach = false});
}

// Waits until `pid` has stopped itself.
void wait_stopped(pid_t pid) {
    int st = 0;
    REQUIRE(::waitpid(pid, &st, WUNTRACED) == pid);
    REQUIRE(WIFSTOPPED(st));
}

// Forks a child that takes `byte` on the segment's file and stops itself holding it; continued,
// it releases the lock and exits 0. Returns once it is stopped.
pid_t stopped_holder(const Segment& seg, detail::LockByte byte) {
    const int fd = seg.state()->fd();
    const pid_t pid = lim::test::fork_child([fd, byte] {
        const detail::FileLock lock = detail::FileLock::lock_exclusive(fd, byte);
        ::raise(SIGSTOP);
        return 0;
    });
    wait_stopped(pid);
    return pid;
}

using lim::test::kill_and_wait;

void continue_and_wait(pid_t pid) {
    ::kill(pid, SIGCONT);
    CHECK(lim::test::wait_child(pid) == 0);
}

// The code of the lim::Error `f` throws; nullopt if it returns.
std::optional<Errc> error_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.code();
    }
    return std::nullopt;
}

}  // namespace

TEST_CASE("a creator stopped inside a creation: open of a new key is busy, not hung") {
    lim::test::SegmentGuard guard(lim::test::unique_name("stopped-records"));
    Segment seg = make_segment(guard);
    auto existing = Semaphore::open(seg, "existing", {.capacity = 3});
    CHECK(existing.try_acquire(1));

    // The real creation path, stopped in its record initialisation (under the records lock).
    detail::SegmentState& state = *seg.state();
    const pid_t creator = lim::test::fork_child([&state] {
        static constexpr char kConfig[8] = {};
        detail::RecordSpec spec{.kind = detail::RecordKind::semaphore, .key = "half"};
        spec.config = kConfig;
        spec.config_size = sizeof kConfig;
        detail::find_or_create_record(state, spec, [](detail::Record&) { ::raise(SIGSTOP); });
        return 0;
    });
    wait_stopped(creator);
    const std::uint32_t used = seg.info().limiters;

    Watchdog dog(creator);
    // A new key needs the records lock: busy, and nothing created.
    CHECK(error_of([&] { Semaphore::open(seg, "fresh", {.capacity = 2}); }) == Errc::busy);
    // An existing key needs no lock, and its holdings are untouched.
    auto again = Semaphore::open(seg, "existing", {.capacity = 3});
    CHECK(again.in_use() == 1);
    dog.disarm();
    CHECK_FALSE(dog.fired());
    CHECK(seg.info().limiters == used);

    // Killed mid-creation: the next creator takes the half-made record's place.
    kill_and_wait(creator);
    auto fresh = Semaphore::open(seg, "fresh", {.capacity = 2});
    CHECK(fresh.try_acquire(2));
    CHECK(fresh.in_use() == 2);
    CHECK(existing.in_use() == 1);
}

TEST_CASE("a configuration writer stopped holding the config lock: reconfiguring is busy") {
    lim::test::SegmentGuard guard(lim::test::unique_name("stopped-config"));
    Segment seg = make_segment(guard);
    auto l = Limiter::open(seg, "l",
                           {.hopper_to_bucket_rate_per_sec = infinite,
                            .bucket_size = 5,
                            .initial_bucket_level = 5,
                            .initial_hopper_level = 0});
    REQUIRE(l.try_take(2) == TryTake::taken);
    const pid_t writer = stopped_holder(seg, detail::LockByte::config);

    Watchdog dog(writer);
    CHECK(error_of([&] { l.set_bucket_size(Clock::now(), 8); }) == Errc::busy);
    CHECK(error_of([&] { l.set_token_target_level(Clock::now(), 4.0); }) == Errc::busy);
    // A forced reset rewrites both configuration blocks: it must exclude the stopped writer too.
    CHECK(error_of([&] { seg.reset({.key = "l", .force = true}); }) == Errc::busy);
    // Takes and returns on an infinite-rate limiter never need the lock.
    CHECK(l.try_take(1) == TryTake::taken);
    l.return_to_hopper(1);
    dog.disarm();
    CHECK_FALSE(dog.fired());
    // Nothing changed.
    CHECK(l.bucket_size() == 5);
    CHECK(l.in_flight(Clock::now()) == 2);
    CHECK(l.in_system(Clock::now()).value() == 5);

    continue_and_wait(writer);
    l.set_bucket_size(Clock::now(), 8);
    CHECK(l.bucket_size() == 8);
    CHECK(l.in_flight(Clock::now()) == 2);
    seg.reset({.key = "l", .force = true});
    CHECK(l.bucket_size() == 5);
    CHECK(l.in_flight(Clock::now()) == 0);
}

TEST_CASE("a stopped config-lock holder at the hard rebase point: try_take is busy, never hung") {
    lim::test::SegmentGuard guard(lim::test::unique_name("stopped-rebase"));
    Segment seg = make_segment(guard);
    // At 10^9 tokens/s from 20 s ago, the drip allowance (2 x 10^14 units) is past kRebaseHard:
    // the first take must re-anchor the drip, a configuration switch under the config lock.
    const TimePoint created = Clock::now() - 20s;
    auto l = Limiter::open(seg, "l",
                           {.hopper_to_bucket_rate_per_sec = 1e9,
                            .bucket_size = 10,
                            .initial_bucket_level = 0,
                            .initial_hopper_level = infinite},
                           created);
    auto tb =
        TokenBucket::open(seg, "tb", {.burst_size = 10, .sustained_rate_per_sec = 1e9}, created);
    const pid_t writer = stopped_holder(seg, detail::LockByte::config);

    Watchdog dog(writer);
    // try_* never waits for a lock: busy at once.
    CHECK(error_of([&] { (void)l.try_take(1); }) == Errc::busy);
    CHECK(error_of([&] { (void)tb.try_take(1); }) == Errc::busy);
    // A blocking take with a deadline honours it: false, not busy.
    bool took = true;
    CHECK_FALSE(error_of([&] { took = l.take_until(1, Clock::now() + 100ms); }).has_value());
    CHECK_FALSE(took);
    // Without a deadline: busy after the lock wait.
    CHECK(error_of([&] { l.take(1); }) == Errc::busy);
    dog.disarm();
    CHECK_FALSE(dog.fired());
    CHECK(l.in_flight(Clock::now()) == 0);

    kill_and_wait(writer);
    CHECK(l.try_take(3) == TryTake::taken);
    CHECK(tb.try_take(3) == TryTake::taken);
    CHECK(l.in_flight(Clock::now()) == 3);
    l.return_to_hopper(3);
    CHECK(l.in_flight(Clock::now()) == 0);
}

TEST_CASE("a stopped config-lock holder at the hard rebase point: a return is busy, keeps tokens") {
    lim::test::SegmentGuard guard(lim::test::unique_name("stopped-return"));
    Segment seg = make_segment(guard);
    // A finite target, so that a return folds the drip (and must rebase it first).
    const TimePoint created = Clock::now() - 20s;
    auto l = Limiter::open(seg, "l",
                           {.hopper_to_bucket_rate_per_sec = 1e9,
                            .bucket_size = 10,
                            .initial_bucket_level = 10,
                            .initial_hopper_level = 0},
                           created);
    REQUIRE(l.try_take(created, 4) == TryTake::taken);
    const pid_t writer = stopped_holder(seg, detail::LockByte::config);

    Watchdog dog(writer);
    CHECK(error_of([&] { l.return_to_hopper(4); }) == Errc::busy);
    dog.disarm();
    CHECK_FALSE(dog.fired());
    CHECK(l.in_flight(Clock::now()) == 4);  // still held: the caller may return them again

    continue_and_wait(writer);
    l.return_to_hopper(4);
    CHECK(l.in_flight(Clock::now()) == 0);
    CHECK(l.in_system(Clock::now()).value() == 10);
}

TEST_CASE("a stopped config-lock holder: converting a token bucket is busy and changes nothing") {
    lim::test::SegmentGuard guard(lim::test::unique_name("stopped-convert"));
    Segment seg = make_segment(guard);
    auto tb = TokenBucket::open(seg, "g", {.burst_size = 5, .sustained_rate_per_sec = 1});
    auto l = Limiter::open(seg, "g",
                           {.hopper_to_bucket_rate_per_sec = 1,
                            .bucket_size = 5,
                            .initial_bucket_level = 0,
                            .initial_hopper_level = infinite},
                           adopt_existing);
    const pid_t writer = stopped_holder(seg, detail::LockByte::config);

    Watchdog dog(writer);
    CHECK(error_of([&] { convert_to_consumed(l, 5); }) == Errc::busy);
    dog.disarm();
    CHECK_FALSE(dog.fired());

    kill_and_wait(writer);
    CHECK(convert_to_consumed(l, 5).converted);
}

TEST_CASE(
    "a config-lock holder that stops between a conversion's steps: the final switch is busy, the "
    "record admits no more than the token bucket did, and a second call finishes it") {
    lim::test::SegmentGuard guard(lim::test::unique_name("stopped-convert4"));
    Segment seg = make_segment(guard);
    // Rate 0, starting full: the token bucket admits its burst (5) once, ever; any admission beyond
    // it is a token the interrupted conversion made up.
    auto tb = TokenBucket::open(
        seg, "g", {.burst_size = 5, .sustained_rate_per_sec = 0, .initial_bucket_level = 5});
    auto l = Limiter::open(seg, "g",
                           {.hopper_to_bucket_rate_per_sec = 0,
                            .bucket_size = 5,
                            .initial_bucket_level = 5,
                            .initial_hopper_level = infinite},
                           adopt_existing);
    int admitted = 0;
    for (int i = 0; i < 2; ++i)
        admitted += tb.try_take(1) == TryTake::taken ? 1 : 0;
    REQUIRE(admitted == 2);

    // After step 3 (creation configuration rewritten, in_flight cleared, a past lease deadline),
    // before the switch: a configuration writer takes the config lock and stops.
    struct Ctx {
        const Segment* seg;
        pid_t writer = -1;
    } ctx{&seg};
    const auto busy = error_of([&] {
        (void)detail::convert_to_consumed_units(
            l, 5,
            [](int step, void* p) {
                auto& c = *static_cast<Ctx*>(p);
                if (step == 3) c.writer = stopped_holder(*c.seg, detail::LockByte::config);
            },
            &ctx);
    });
    REQUIRE(ctx.writer > 0);
    CHECK(busy == Errc::busy);
    CHECK_FALSE(is_consumed(l));  // the switch did not happen

    // The interrupted record: what its takers may take is still the token bucket's rest.
    for (int i = 0; i < 20; ++i) {
        admitted += tb.try_take(1) == TryTake::taken ? 1 : 0;
        admitted += l.try_take(1) == TryTake::taken ? 1 : 0;
    }
    CHECK(admitted <= 5);

    // The writer goes; the conversion, called again, finishes: from then on nothing is admitted
    // until a lease grants it.
    kill_and_wait(ctx.writer);
    const ConsumedConversion c = convert_to_consumed(l, 5);
    CHECK(c.converted);
    CHECK(is_consumed(l));
    for (int i = 0; i < 10; ++i) {
        CHECK(tb.try_take(1) != TryTake::taken);
        CHECK(l.try_take(1) != TryTake::taken);
    }
}

namespace {

// A limiter filled at 10^8 tokens/s from 40 s ago (4 x 10^13 units of drip allowance by now,
// past kRebaseAt, so a reap's fold must re-anchor under the config lock), whose whole bucket a
// child took at created + 1 s (no re-anchor yet) before it was killed.
Limiter limiter_with_dead_holder(const Segment& seg) {
    const TimePoint created = Clock::now() - 40s;
    auto l = Limiter::open(seg, "l",
                           {.hopper_to_bucket_rate_per_sec = 1e8,
                            .bucket_size = 1e9,
                            .initial_bucket_level = 1e9,
                            .initial_hopper_level = 0},
                           created);
    const pid_t child = lim::test::fork_child([&] {
        if (l.try_take(created + 1s, 1e9) != TryTake::taken) return 1;
        ::raise(SIGSTOP);
        return 0;
    });
    wait_stopped(child);
    REQUIRE(l.in_flight(created + 1s) == 1e9);
    kill_and_wait(child);
    return l;
}

}  // namespace

TEST_CASE("a reap whose fold must re-anchor the drip takes the free config lock and folds") {
    // The reaper's fold at a drip allowance past kRebaseAt is a re-anchoring switch under the
    // config lock (bounded: kTryLockGrace). Skipped, the returned tokens would be in the bucket
    // at once; folded, they drip back from the reap on.
    lim::test::SegmentGuard guard(lim::test::unique_name("reap-fold"));
    Segment seg = make_segment(guard);
    auto l = limiter_with_dead_holder(seg);

    const TimePoint before = Clock::now();
    const ReapReport report = seg.reap();
    REQUIRE(report.reaped.size() == 1);
    CHECK(l.in_flight(Clock::now()) == 0);
    // Back in the hopper, dripping at 10^8/s from the reap on: half of them is 5 s away (a `now`
    // from before the reap counts as the limiter's time, the reap's).
    CHECK(l.try_take(before, 5e8) == TryTake::unable);
}

TEST_CASE("a reap whose fold needs the config lock a stopped writer holds defers the record") {
    // As above, with a writer stopped holding the config lock: the fold cannot re-anchor, and
    // returning the dead's tokens unfolded would put 4 x 10^13 units of allowance in the bucket
    // at once (the whole bucket over the bound). The record is deferred instead, the dead's
    // tokens kept in flight, and the next reap after the writer is gone gives them back folded.
    lim::test::SegmentGuard guard(lim::test::unique_name("reap-fold-stopped"));
    Segment seg = make_segment(guard);
    auto l = limiter_with_dead_holder(seg);

    const pid_t writer = stopped_holder(seg, detail::LockByte::config);
    Watchdog dog(writer);
    const TimePoint before = Clock::now();
    const ReapReport deferred = seg.reap();
    CHECK(deferred.reaped.empty());
    CHECK(deferred.deferred.size() == 1);
    CHECK(l.in_flight(Clock::now()) == 1e9);  // still the dead's, not given back unfolded
    CHECK(l.try_take(before, 5e8) == TryTake::unable);
    dog.disarm();
    CHECK_FALSE(dog.fired());
    kill_and_wait(writer);

    const TimePoint later = Clock::now();
    const ReapReport report = seg.reap();
    REQUIRE(report.reaped.size() == 1);
    CHECK(l.in_flight(Clock::now()) == 0);
    CHECK(l.try_take(later, 5e8) == TryTake::unable);  // folded: dripping back from the reap on
}

TEST_CASE("a stopped reaper holding the recovery lock: reap, reset and hand-offs are busy") {
    lim::test::SegmentGuard guard(lim::test::unique_name("stopped-recovery"));
    Segment seg = make_segment(guard);
    auto sem = Semaphore::open(seg, "s", {.capacity = 4});
    REQUIRE(sem.try_acquire(2));
    const HandOff given = sem.hand_off(1);  // made before the reaper stopped
    const pid_t reaper = stopped_holder(seg, detail::LockByte::recovery);

    Watchdog dog(reaper);
    CHECK(error_of([&] { (void)seg.reap(); }) == Errc::busy);
    CHECK(error_of([&] { seg.reset({.key = "s", .force = true}); }) == Errc::busy);
    CHECK(error_of([&] { (void)sem.hand_off(1); }) == Errc::busy);
    CHECK(error_of([&] { (void)sem.receive(given); }) == Errc::busy);
    // Holding operations take no lock.
    CHECK(sem.try_acquire(1));
    sem.release(1);
    dog.disarm();
    CHECK_FALSE(dog.fired());
    CHECK(sem.in_use() == 2);

    continue_and_wait(reaper);
    CHECK(sem.receive(given));  // nothing was handed over twice, nothing lost
    const HandOff second = sem.hand_off(1);
    CHECK(sem.receive(second));
    sem.release(2);
    CHECK(sem.in_use() == 0);
    CHECK(seg.reap().reaped.empty());
}

TEST_CASE("a stopped reaper and a full process table: a new thread gets table_full, not a hang") {
    lim::test::SegmentGuard guard(lim::test::unique_name("stopped-full"));
    Segment seg = Segment::open_or_create(
        guard.name(),
        {.max_limiters = 4, .max_processes = 4, .reap_after = 0s, .reap_on_attach = false});
    auto sem = Semaphore::open(seg, "s", {.capacity = 10});
    REQUIRE(sem.try_acquire(1));  // this thread's slot
    std::vector<pid_t> holders;
    for (int i = 0; i < 3; ++i)
        holders.push_back(lim::test::child_holding([&] { REQUIRE(sem.try_acquire(1)); }));
    CHECK(sem.in_use() == 4);
    kill_and_wait(holders.back());  // dead, so a reap could free its slot
    holders.pop_back();
    const pid_t reaper = stopped_holder(seg, detail::LockByte::recovery);

    // A thread with no slot claims one; the table is full, so the claim reaps first, which needs
    // the recovery lock: it waited for it forever before.
    Watchdog dog(reaper);
    std::optional<Errc> code;
    std::thread([&] { code = error_of([&] { (void)sem.try_acquire(1); }); }).join();
    dog.disarm();
    CHECK_FALSE(dog.fired());
    CHECK(code == Errc::table_full);
    CHECK(sem.in_use() == 4);  // nothing taken, nothing reaped

    continue_and_wait(reaper);
    std::thread([&] {
        CHECK(sem.try_acquire(1));  // the claim's reap frees the dead child's slot
        sem.release(1);
    }).join();
    CHECK(sem.in_use() == 3);  // the dead child's unit given back once; the live ones kept
    for (const pid_t pid : holders)
        kill_and_wait(pid);
}
