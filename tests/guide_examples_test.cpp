// The code in README.md, docs/guide.md and the SPEC's API section, compiled and run, so that the
// documentation cannot drift from the code.
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include "lim/lim.hpp"
#include "support/process.hpp"

using namespace std::chrono_literals;

namespace {
struct Response {
    int status = 200;
    std::vector<std::pair<std::string, std::string>> headers;
};
}  // namespace

TEST_CASE("guide: segments, semaphores, byte budgets") {
    lim::test::SegmentGuard guard(lim::test::unique_name("guide"));
    auto seg = lim::Segment::open_or_create(
        guard.name(), {.max_limiters = 64, .max_processes = 256, .mode = 0660});
    CHECK(seg.info().max_limiters == 64);

    auto db = lim::Semaphore::open(seg, "db", {.capacity = 8});
    int queries = 0;
    {
        lim::SemaphoreGuard g(db);
        ++queries;
        CHECK(db.in_use() == 1);
    }
    if (db.acquire_until(1, lim::Clock::now() + std::chrono::seconds{2})) {
        ++queries;
        db.release();
    }
    CHECK(queries == 2);
    CHECK(db.in_use() == 0);

    const std::string body(1000, 'x');
    auto bytes = lim::WeightedSemaphore::open(seg, "upload", {.capacity = 50'000'000});
    bytes.acquire(body.size());
    CHECK(bytes.in_use() == 1000);
    bytes.release(body.size());
    CHECK(bytes.in_use() == 0);
}

TEST_CASE("guide: token bucket, throttle, throttled rate limiter") {
    lim::test::SegmentGuard guard(lim::test::unique_name("guide-js"));
    auto seg =
        lim::Segment::open_or_create(guard.name(), {.max_limiters = 16, .max_processes = 16});
    auto emails = lim::TokenBucket::open(
        seg, "emails", {.burst_size = 10, .sustained_rate_per_sec = 2, .initial_bucket_level = 1});
    int sent = 0;
    if (emails.try_take(1) == lim::TryTake::taken) ++sent;
    CHECK(sent == 1);

    auto jobs = lim::Throttle::open(seg, "jobs", {.max_concurrent_jobs = 8});
    int ran = 0;
    if (jobs.try_start_job().kind() == lim::StartJob::Kind::start) {
        ++ran;
        jobs.finish_job();
    }
    CHECK(ran == 1);

    auto api = lim::ThrottledRateLimiter::open(
        seg, "api", {.burst_size = 2, .sustained_rate_per_sec = 1, .max_concurrent_jobs = 3});
    api.start_job();
    CHECK(api.in_flight() == 1.0);
    api.finish_job();

    // The SPEC's expert limiter.
    auto ex = lim::Limiter::open(seg, "raw",
                                 lim::LimiterConfig{.hopper_to_bucket_rate_per_sec = 2.0,
                                                    .bucket_size = 10,
                                                    .initial_bucket_level = 0,
                                                    .initial_hopper_level = lim::infinite});
    CHECK(ex.bucket_size() == 10);
}

TEST_CASE("guide: a Dispatch guarding an API, backing off on 429") {
    lim::test::SegmentGuard guard(lim::test::unique_name("guide-d"));
    auto seg =
        lim::Segment::open_or_create(guard.name(), {.max_limiters = 16, .max_processes = 16});
    auto window = lim::BackoffWindow::for_key(seg, "my_api");
    auto d = lim::Dispatch::open(seg, {.limiter = window,
                                       .key = "my_api",
                                       .concurrency = 100,
                                       .throttled_concurrency = 5,
                                       .byte_budget = 5'000'000});
    const std::string body(2000, 'x');
    auto http_post = [&] {
        CHECK(d.snapshot().in_flight == 1);
        return Response{429, {{"Retry-After", "3"}}};
    };
    auto response = d.with_rate_limit(body.size(), [&] { return http_post(); });
    if (response.status == 429) {
        d.set_backoff(lim::parse_retry_after(response.headers).value_or(std::chrono::seconds{1}));
    }
    const lim::DispatchSnapshot s = d.snapshot();
    CHECK(s.backoff_active);
    CHECK(s.backoff_remaining > 2s);
    CHECK(s.in_flight == 0);
}

TEST_CASE("guide: forked workers share one Dispatch") {
    lim::test::SegmentGuard guard(lim::test::unique_name("guide-fork"));
    auto seg = lim::Segment::open_or_create(guard.name());
    auto d = lim::Dispatch::open(seg, {.limiter = lim::BackoffWindow::for_key(seg, "vendor"),
                                       .key = "vendor",
                                       .concurrency = 32});
    std::vector<pid_t> workers;
    for (int i = 0; i < 4; ++i) {
        workers.push_back(lim::test::fork_child([&] {
            for (int n = 0; n < 100; ++n)
                d.with_rate_limit(10, [] { return 0; });
            return 0;
        }));
    }
    for (pid_t w : workers)
        CHECK(lim::test::wait_child(w) == 0);
    CHECK(d.snapshot().in_flight == 0);
    // They exited holding nothing: reaping frees their slots and gives nothing back.
    const lim::ReapReport report = seg.reap();
    CHECK(report.reaped.size() == 4);
    for (const auto& p : report.reaped)
        CHECK(p.returned.empty());
}

TEST_CASE("guide: handing a holding to another process") {
    lim::test::SegmentGuard guard(lim::test::unique_name("guide-hand-off"));
    auto seg = lim::Segment::open_or_create(guard.name());
    auto db = lim::Semaphore::open(seg, "db", {.capacity = 8});
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    const int to_worker = fds[1], from_dispatcher = fds[0];
    int queries = 0;
    const auto run_query = [&] { ++queries; };
    const pid_t worker = lim::test::fork_child([&] {
        // The worker process (same segment, same key): receive, then release as its own.
        lim::HandOff ticket;
        if (read(from_dispatcher, &ticket, sizeof ticket) != static_cast<ssize_t>(sizeof ticket))
            return 1;
        if (db.receive(ticket)) {
            run_query();
            db.release(2);
        }
        return queries == 1 && db.in_use() == 0 ? 0 : 2;
    });
    {
        // The dispatcher: acquire, hand off, send the ticket.
        db.acquire(2);
        const lim::HandOff ticket = db.hand_off(2);
        REQUIRE(write(to_worker, &ticket, sizeof ticket) == static_cast<ssize_t>(sizeof ticket));
    }
    CHECK(lim::test::wait_child(worker) == 0);
    ::close(fds[0]);
    ::close(fds[1]);
    CHECK(db.in_use() == 0);
    for (const auto& p : seg.reap().reaped)
        CHECK(p.returned.empty());
}
