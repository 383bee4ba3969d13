// Handing a holding from one process to another (lim/hand_off.hpp): a dispatcher acquires, a
// worker process receives and releases; counters stay exact whoever dies, and a parcel is
// received at most once.
#include <signal.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstring>

#include "lim/lim.hpp"
#include "support/process.hpp"

using namespace lim;
using namespace std::chrono_literals;

namespace {

SegmentOptions options() {
    return {.max_limiters = 8, .max_processes = 16, .reap_after = 1s, .reap_on_attach = false};
}

// A pipe carrying HandOffs as raw bytes, as a real dispatcher would send them.
struct Pipe {
    int fd[2] = {-1, -1};
    Pipe() { REQUIRE(::pipe(fd) == 0); }
    ~Pipe() {
        ::close(fd[0]);
        ::close(fd[1]);
    }
    void send(const HandOff& h) const {
        REQUIRE(::write(fd[1], &h, sizeof h) == static_cast<ssize_t>(sizeof h));
    }
    bool receive(HandOff& h) const {
        return ::read(fd[0], &h, sizeof h) == static_cast<ssize_t>(sizeof h);
    }
};

using lim::test::kill_and_wait;

std::size_t units_returned(const ReapReport& r) {
    std::size_t n = 0;
    for (const auto& p : r.reaped)
        n += p.returned.size();
    return n;
}

}  // namespace

TEST_CASE("a dispatcher hands units to a worker process, which releases them; counts stay exact") {
    lim::test::SegmentGuard guard(lim::test::unique_name("ho-sem"));
    auto seg = Segment::open_or_create(guard.name(), options());
    auto sem = Semaphore::open(seg, "db", {.capacity = 4});
    auto* result = lim::test::shared_array<std::atomic<int>>(2);
    new (result) std::atomic<int>[2] {};
    Pipe pipe;
    const pid_t worker = lim::test::fork_child([&] {
        HandOff h;
        if (!pipe.receive(h)) return 1;
        if (!sem.receive(h)) return 2;
        if (sem.receive(h)) return 3;  // a parcel is received once
        if (sem.in_use() != 3) return 4;
        sem.release(2);  // the worker's own now
        return sem.in_use() == 1 ? 0 : 5;
    });
    sem.acquire(3);
    const HandOff h = sem.hand_off(2);
    CHECK(sem.in_use() == 3);  // nothing is given back by a hand-off: no one else is admitted
    // The giver no longer holds the two units: it cannot release them.
    CHECK_THROWS_AS(sem.release(2), Error);
    pipe.send(h);
    CHECK(lim::test::wait_child(worker) == 0);
    CHECK(sem.in_use() == 1);
    CHECK_FALSE(sem.receive(h));  // taken already
    CHECK(units_returned(seg.reap()) == 0);
    CHECK(sem.in_use() == 1);
    sem.release(1);
    CHECK(sem.in_use() == 0);
    CHECK(sem.try_acquire(4));
    sem.release(4);
}

TEST_CASE("a parcel whose giver dies is given back by the reap, and cannot be received") {
    lim::test::SegmentGuard guard(lim::test::unique_name("ho-giver-dies"));
    auto seg = Segment::open_or_create(guard.name(), options());
    auto sem = Semaphore::open(seg, "db", {.capacity = 4});
    auto* ticket = lim::test::shared_array<HandOff>(1);
    auto* offered = lim::test::shared_array<std::atomic<int>>(1);
    new (offered) std::atomic<int>{0};
    const pid_t giver = lim::test::fork_child([&] {
        sem.acquire(3);
        *ticket = sem.hand_off(2);
        offered->store(1);
        for (;;)
            ::pause();
        return 0;
    });
    REQUIRE(lim::test::eventually([&] { return offered->load() == 1; }));
    CHECK(sem.in_use() == 3);
    kill_and_wait(giver);
    CHECK_FALSE(sem.receive(*ticket));
    CHECK(sem.in_use() == 3);
    const ReapReport r = seg.reap();
    CHECK_FALSE(r.reaped.empty());
    CHECK(sem.in_use() == 0);  // the one it kept and the two in the parcel
    CHECK_FALSE(sem.receive(*ticket));
    CHECK(sem.try_acquire(4));
    sem.release(4);
}

TEST_CASE("a receiver that dies holding what it received is reaped like any holder") {
    lim::test::SegmentGuard guard(lim::test::unique_name("ho-receiver-dies"));
    auto seg = Segment::open_or_create(guard.name(), options());
    auto bytes = WeightedSemaphore::open(seg, "bytes", {.capacity = 100});
    auto* ticket = lim::test::shared_array<HandOff>(1);
    auto* received = lim::test::shared_array<std::atomic<int>>(1);
    new (received) std::atomic<int>{0};
    bytes.acquire(70);
    *ticket = bytes.hand_off(60);
    const pid_t receiver = lim::test::fork_child([&] {
        received->store(bytes.receive(*ticket) ? 1 : 2);
        for (;;)
            ::pause();
        return 0;
    });
    REQUIRE(lim::test::eventually([&] { return received->load() != 0; }));
    CHECK(received->load() == 1);
    CHECK(bytes.in_use() == 70);
    // What the parent kept is still its own; what it handed off is not.
    CHECK_THROWS_AS(bytes.release(20), Error);
    kill_and_wait(receiver);
    CHECK(units_returned(seg.reap()) > 0);
    CHECK(bytes.in_use() == 10);
    bytes.release(10);
    CHECK(bytes.in_use() == 0);
    CHECK(bytes.try_acquire(100));
    bytes.release(100);
}

TEST_CASE("jobs started by a dispatcher are finished by the worker that received them") {
    lim::test::SegmentGuard guard(lim::test::unique_name("ho-jobs"));
    auto seg = Segment::open_or_create(guard.name(), options());
    auto th = Throttle::open(seg, "jobs", {.max_concurrent_jobs = 3});
    auto other = Throttle::open(seg, "other", {.max_concurrent_jobs = 1});
    Pipe pipe;
    const pid_t worker = lim::test::fork_child([&] {
        HandOff h;
        if (!pipe.receive(h)) return 1;
        try {
            (void)other.receive(h);
            return 2;  // a HandOff of another limiter must be refused
        } catch (const Error& e) {
            if (e.code() != Errc::invalid_argument) return 3;
        }
        if (!th.receive(h)) return 4;
        th.finish_job();
        th.finish_job();
        try {
            th.finish_job();  // the third job is the dispatcher's
            return 5;
        } catch (const Error& e) {
            if (e.code() != Errc::over_release) return 6;
        }
        return th.limiter().in_flight() == 1 ? 0 : 7;
    });
    th.start_job();
    th.start_job();
    th.start_job();
    CHECK_THROWS_AS(th.hand_off_jobs(4), Error);  // runs only three
    CHECK_THROWS_AS(th.hand_off_jobs(0), Error);
    pipe.send(th.hand_off_jobs(2));
    CHECK(lim::test::wait_child(worker) == 0);
    CHECK(th.limiter().in_flight() == 1);
    CHECK(units_returned(seg.reap()) == 0);
    th.finish_job();
    CHECK(th.limiter().in_flight() == 0);
    CHECK(th.try_start_job() == StartJob::start());
    th.finish_job();
}

TEST_CASE("hand_off refuses what this process does not hold, and changes nothing") {
    lim::test::SegmentGuard guard(lim::test::unique_name("ho-refuse"));
    auto seg = Segment::open_or_create(guard.name(), options());
    auto sem = Semaphore::open(seg, "db", {.capacity = 4});
    sem.acquire(1);
    try {
        (void)sem.hand_off(2);
        FAIL("hand_off of more than is held");
    } catch (const Error& e) {
        CHECK(e.code() == Errc::over_release);
    }
    CHECK_THROWS_AS((void)sem.hand_off(0), Error);
    CHECK(sem.in_use() == 1);
    sem.release(1);
    CHECK(sem.in_use() == 0);
}
