// SPEC.md's limctl section, checked as written: `limctl create` with SPEC's own TOML and with
// every kind it names (keys are the API's option names), so that what the file declares is what
// a program opening the same keys with the same options attaches to; reset's refusal while live
// processes are attached; rm and read commands on an absent segment; exit codes 0 / 1 / 2.
#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <regex>
#include <sstream>
#include <string>

#include "lim/lim.hpp"
#include "limctl/run.hpp"
#include "support/process.hpp"

using lim::test::limctl;

namespace {

std::string write_toml(const std::string& stem, const std::string& text) {
    const std::string path =
        "/tmp/limctl-spec-" + std::to_string(::getpid()) + "-" + stem + ".toml";
    std::ofstream(path) << text;
    return path;
}

template <class F>
lim::Errc error_of(F&& f) {
    try {
        f();
    } catch (const lim::Error& e) {
        return e.code();
    }
    FAIL("no lim::Error thrown");
    return lim::Errc::system_error;
}

}  // namespace

TEST_CASE("SPEC's create example makes what the API opens with the same options") {
    lim::test::SegmentGuard guard(lim::test::unique_name("limctl-spec"));
    // Verbatim from SPEC.md, comments included.
    const std::string toml = write_toml("spec", R"([segment]
max_limiters = 256
[limiter.my_api]
kind = "dispatch"   # dispatch | token_bucket | throttle | throttled_rate_limiter | limiter
                    # | semaphore | weighted_semaphore
concurrency = 4
throttled_concurrency = 1
byte_budget = 1000
[limiter.emails]
kind = "token_bucket"
burst_size = 10
sustained_rate_per_sec = 2
)");
    const auto r = limctl("create " + guard.name() + " --config " + toml);
    REQUIRE(r.code == 0);
    auto seg = lim::Segment::open(guard.name());
    CHECK(seg.info().max_limiters == 256);
    auto window = lim::BackoffWindow::for_key(seg, "my_api");
    auto d = lim::Dispatch::open(seg, {.limiter = window,
                                       .key = "my_api",
                                       .concurrency = 4,
                                       .throttled_concurrency = 1,
                                       .byte_budget = 1000});
    CHECK(d.snapshot().concurrency == 4);
    auto tb =
        lim::TokenBucket::open(seg, "emails", {.burst_size = 10, .sustained_rate_per_sec = 2});
    CHECK(tb.burst_size() == 10);
}

TEST_CASE("create: every kind SPEC names, with the API's option names") {
    lim::test::SegmentGuard guard(lim::test::unique_name("limctl-kinds"));
    const std::string toml = write_toml("kinds", R"(
[segment]
max_limiters = 16
max_processes = 32

[limiter.th]
kind = "throttle"
max_concurrent_jobs = 8

[limiter.trl]
kind = "throttled_rate_limiter"
burst_size = 2
sustained_rate_per_sec = 1
max_concurrent_jobs = 3

[limiter.raw]
kind = "limiter"
hopper_to_bucket_rate_per_sec = 2.0
bucket_size = 10
initial_bucket_level = 0
initial_hopper_level = "infinite"

[limiter.instant]
kind = "limiter"
hopper_to_bucket_rate_per_sec = inf
bucket_size = 4
initial_bucket_level = 1
initial_hopper_level = 3

[limiter.tb]
kind = "token_bucket"
burst_size = 10
sustained_rate_per_sec = 2
initial_bucket_level = 5

[limiter.sem]
kind = "semaphore"
capacity = 8

[limiter.ws]
kind = "weighted_semaphore"
capacity = 5000000
)");
    const auto r = limctl("create " + guard.name() + " --config " + toml);
    INFO(r.err);
    REQUIRE(r.code == 0);
    auto seg = lim::Segment::open(guard.name());
    CHECK(seg.info().max_processes == 32);
    CHECK(lim::Throttle::open(seg, "th", {.max_concurrent_jobs = 8}).max_concurrent_jobs() == 8);
    (void)lim::ThrottledRateLimiter::open(
        seg, "trl", {.burst_size = 2, .sustained_rate_per_sec = 1, .max_concurrent_jobs = 3});
    (void)lim::Limiter::open(seg, "raw",
                             lim::LimiterConfig{.hopper_to_bucket_rate_per_sec = 2.0,
                                                .bucket_size = 10,
                                                .initial_bucket_level = 0,
                                                .initial_hopper_level = lim::infinite});
    auto instant =
        lim::Limiter::open(seg, "instant",
                           lim::LimiterConfig{.hopper_to_bucket_rate_per_sec = lim::infinite,
                                              .bucket_size = 4,
                                              .initial_bucket_level = 1,
                                              .initial_hopper_level = 3.0});
    CHECK(instant.hopper_to_bucket_rate_per_sec().is_infinite());
    (void)lim::TokenBucket::open(
        seg, "tb", {.burst_size = 10, .sustained_rate_per_sec = 2, .initial_bucket_level = 5});
    CHECK(lim::Semaphore::open(seg, "sem", {.capacity = 8}).capacity() == 8);
    CHECK(lim::WeightedSemaphore::open(seg, "ws", {.capacity = 5'000'000}).capacity() == 5'000'000);
    CHECK(seg.info().limiters == 7);

    // Prometheus' text format: an infinite value is +Inf (docs/limctl.md says so too); every
    // sample's value is one Go's ParseFloat and OpenMetrics both accept.
    const auto prom = limctl("stats " + guard.name());
    REQUIRE(prom.code == 0);
    const std::string raw = "{segment=\"" + guard.name() + "\",key=\"raw\",kind=\"limiter\"} ";
    const std::string inst = "{segment=\"" + guard.name() + "\",key=\"instant\",kind=\"limiter\"} ";
    CHECK(prom.out.find("lim_tokens_in_hopper" + raw + "+Inf\n") != std::string::npos);
    CHECK(prom.out.find("lim_fill_rate_tokens_per_second" + inst + "+Inf\n") != std::string::npos);
    const std::regex value(R"(^[^#].* (-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?|[+-]Inf|NaN)$)");
    std::istringstream lines(prom.out);
    for (std::string line; std::getline(lines, line);) {
        if (line.rfind("# ", 0) == 0) continue;
        CHECK_MESSAGE(std::regex_match(line, value), line);
    }
    // The read commands show every kind, in text and as JSON.
    for (const std::string& cmd :
         {"show " + guard.name(), "show -p " + guard.name(), "show " + guard.name() + " raw",
          "stats --json " + guard.name(), "show --json " + guard.name()}) {
        CAPTURE(cmd);
        const auto shown = limctl(cmd);
        CHECK(shown.code == 0);
        if (cmd.find("json") != std::string::npos) CHECK(nlohmann::json::accept(shown.out));
    }
}

TEST_CASE("reset refuses while a live process is attached unless --force; exit codes") {
    lim::test::SegmentGuard guard(lim::test::unique_name("limctl-reset"));
    auto seg = lim::Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 8});
    auto sem = lim::Semaphore::open(seg, "db", {.capacity = 4});
    sem.acquire(3);  // this test's process is live and attached
    const auto refused = limctl("reset " + guard.name());
    CHECK(refused.code == 1);
    CHECK(sem.in_use() == 3);
    CHECK(limctl("reset " + guard.name() + " db").code == 1);
    CHECK(limctl("reset " + guard.name() + " nosuchkey --force").code == 1);  // not_found
    const auto forced = limctl("reset " + guard.name() + " db --force");
    CHECK(forced.code == 0);
    CHECK(sem.in_use() == 0);
    // What this process held is forgotten: its release is now an over-release.
    CHECK(error_of([&] { sem.release(3); }) == lim::Errc::over_release);
}

TEST_CASE("an absent segment: read and repair commands exit 1; rm says so") {
    const std::string absent = lim::test::unique_name("limctl-absent");
    for (const std::string& cmd :
         {"show " + absent, "show --json " + absent, "stats " + absent,
          "stats --format prometheus " + absent, "stats --json " + absent, "reap " + absent,
          "reset " + absent, "rm " + absent, "set-backoff " + absent + " k 1s",
          "watch -n 1 " + absent + " </dev/null"}) {
        CAPTURE(cmd);
        const auto r = limctl(cmd);
        CHECK(r.code == 1);
        CHECK(r.err.find("not_found") != std::string::npos);
    }
}

TEST_CASE("rm removes; stats --format prometheus is the default; ls --json parses") {
    lim::test::SegmentGuard guard(lim::test::unique_name("limctl-rm"));
    {
        auto seg = lim::Segment::open_or_create(guard.name(), {.max_limiters = 4});
        (void)lim::Semaphore::open(seg, "db", {.capacity = 2});
    }
    const auto prom = limctl("stats " + guard.name() + " --format prometheus");
    CHECK(prom.code == 0);
    CHECK(prom.out == limctl("stats " + guard.name()).out);
    CHECK(prom.out.find("lim_capacity{segment=\"" + guard.name() + "\",key=\"db\"") !=
          std::string::npos);
    const auto ls = limctl("ls --json");
    REQUIRE(ls.code == 0);
    CHECK(nlohmann::json::accept(ls.out));
    CHECK(limctl("rm " + guard.name()).code == 0);
    CHECK_FALSE(lim::Segment::remove(guard.name()));
    CHECK(limctl("rm " + guard.name()).code == 1);
}

TEST_CASE("SPEC: every read command has --json, and what it prints is JSON") {
    lim::test::SegmentGuard guard(lim::test::unique_name("limctl-json"));
    {
        auto seg = lim::Segment::open_or_create(guard.name(), {.max_limiters = 8});
        (void)lim::Semaphore::open(seg, "db", {.capacity = 2});
        auto window = lim::BackoffWindow::for_key(seg, "my_api");
        (void)lim::Dispatch::open(seg, {.limiter = window, .key = "my_api", .concurrency = 4});
        (void)lim::TokenBucket::open(seg, "emails",
                                     {.burst_size = 10, .sustained_rate_per_sec = 2});
    }
    const std::string& s = guard.name();
    for (const std::string& cmd :
         {std::string("ls --json"), "show --json " + s, "show " + s + " db --json",
          "stats " + s + " --json", "stats " + s + " --format json", "leases " + s + " --json"}) {
        CAPTURE(cmd);
        const auto r = limctl(cmd);
        CHECK(r.code == 0);
        CHECK(nlohmann::json::accept(r.out));
    }
    // watch --json: one document per line, per frame.
    const auto w = limctl("watch " + s + " --json -n 2 -i 50ms </dev/null");
    CHECK(w.code == 0);
    std::istringstream lines(w.out);
    std::string line;
    int frames = 0;
    while (std::getline(lines, line)) {
        CAPTURE(line);
        CHECK(nlohmann::json::accept(line));
        ++frames;
    }
    CHECK(frames == 2);
    // ls --json: the segment objects of show --json, plus status (docs/limctl.md, "JSON").
    const auto shown = nlohmann::json::parse(limctl("show --json " + s).out)["segment"];
    bool listed = false;
    for (const auto& entry : nlohmann::json::parse(limctl("ls --json").out)) {
        if (entry["name"] != s) continue;
        listed = true;
        CHECK(entry["status"] == "ok");
        for (auto it = shown.begin(); it != shown.end(); ++it) {
            CAPTURE(it.key());
            CHECK(entry.contains(it.key()));
        }
    }
    CHECK(listed);
    // show --json <segment> <key>: only that key's records (docs/limctl.md, "JSON").
    const auto one = nlohmann::json::parse(limctl("show --json " + s + " my_api").out);
    CHECK(one["segment"] == s);
    REQUIRE(one["records"].size() == 2);  // the Dispatch and its BackoffWindow share the key
    for (const auto& r : one["records"])
        CHECK(r["key"] == "my_api");
}

TEST_CASE("set-backoff: the durations docs/limctl.md lists, --clear; exit 1 and 2 as SPEC says") {
    lim::test::SegmentGuard guard(lim::test::unique_name("limctl-backoff"));
    {
        auto seg = lim::Segment::open_or_create(guard.name(), {.max_limiters = 4});
        (void)lim::BackoffWindow::for_key(seg, "my_api");
    }
    const std::string base = "set-backoff " + guard.name() + " my_api ";
    for (const char* d : {"500ms", "10s", "1.5s", "2m", "1h", "30"}) {
        CAPTURE(d);
        CHECK(limctl(base + d).code == 0);
    }
    auto seg = lim::Segment::open(guard.name());
    auto window = lim::BackoffWindow::for_key(seg, "my_api");
    CHECK(window.remaining() > std::chrono::minutes{59});  // 1h, never shortened by the rest
    CHECK(limctl(base + "--clear").code == 0);
    CHECK_FALSE(window.should_backoff());
    CHECK(limctl(base + "soon").code == 2);                                         // usage
    CHECK(limctl("set-backoff " + guard.name() + " no_such_window 1s").code == 1);  // error
    CHECK_FALSE(window.should_backoff());
}

TEST_CASE("set-backoff: a Dispatch's key reaches the BackoffWindow that Dispatch uses") {
    // SPEC: `limctl set-backoff <segment> <key> <duration>`, where its other commands take any
    // limiter's key. A Dispatch whose window has another key (.limiter = for_key(seg, "w"),
    // .key = "api"): backing off "api" is what the operator means.
    lim::test::SegmentGuard guard(lim::test::unique_name("limctl-dbackoff"));
    auto seg = lim::Segment::open_or_create(guard.name(), {.max_limiters = 8});
    auto window = lim::BackoffWindow::for_key(seg, "api_window");
    auto d = lim::Dispatch::open(seg, {.limiter = window, .key = "api"});
    const auto r = limctl("set-backoff " + guard.name() + " api 30s");
    CHECK_MESSAGE(r.code == 0, r.err);
    CHECK_MESSAGE(r.out.find("'api_window'") != std::string::npos, r.out);
    CHECK(window.should_backoff());
    CHECK(d.snapshot().backoff_active);
    CHECK(limctl("set-backoff " + guard.name() + " api --clear").code == 0);
    CHECK_FALSE(window.should_backoff());
    // The window's own key still works, and a key that is neither is still an error.
    CHECK(limctl("set-backoff " + guard.name() + " api_window 1s").code == 0);
    CHECK(window.should_backoff());
    CHECK(limctl("set-backoff " + guard.name() + " nothing 1s").code == 1);
}

TEST_CASE("every read command's --json carries a global rate's lease, as its text view does") {
    // Issue 12: "limctl shows, for a global limiter, the lease held, its expiry, the feeder's
    // last contact with Redis"; SPEC: "Every read command has --json". lim-feeder's status
    // records (tools/feeder/status.hpp), written here as the feeder writes them, no Redis.
    lim::test::SegmentGuard guard(lim::test::unique_name("limctl-leasejson"));
    auto seg = lim::Segment::open_or_create(guard.name(), {.max_limiters = 8});
    auto rate = lim::Limiter::open(seg, "api",
                                   {.hopper_to_bucket_rate_per_sec = lim::infinite,
                                    .bucket_size = 10,
                                    .initial_bucket_level = 0,
                                    .initial_hopper_level = 0.0});
    lim::BackoffWindow::for_key(seg, "feeder.api.lease").set(std::chrono::seconds{30});
    lim::BackoffWindow::for_key(seg, "feeder.api.contact").set(std::chrono::seconds{3599});
    // The text view shows it ...
    for (const std::string cmd : {"show ", "watch -n 1 "}) {
        CAPTURE(cmd);
        const auto text = limctl(cmd + guard.name());
        REQUIRE(text.code == 0);
        CHECK_MESSAGE(text.out.find("LAST REDIS CONTACT") != std::string::npos, text.out);
    }
    // ... and so does every JSON view of the segment.
    for (const std::string cmd : {"show --json ", "stats --json ", "watch -n 1 --json "}) {
        CAPTURE(cmd);
        const auto r = limctl(cmd + guard.name());
        REQUIRE(r.code == 0);
        const auto j = nlohmann::json::parse(r.out);
        bool found = false;
        for (const auto& rec : j.at("records")) {
            if (rec.at("key") != "api" || rec.at("kind") != "limiter") continue;
            REQUIRE(rec.contains("global_lease"));
            const auto& lease = rec.at("global_lease");
            CHECK(lease.at("lease_expires_in_seconds").get<double>() > 20);
            CHECK(lease.at("last_contact_seconds_ago").get<double>() < 60);
            CHECK(lease.contains("lease_held_tokens"));
            found = true;
        }
        CHECK(found);
        for (const auto& rec : j.at("records")) {  // nothing else gets one
            if (rec.at("key") != "api") CHECK_FALSE(rec.contains("global_lease"));
        }
    }
}
