// limctl, run as an operator would, on a segment this test prepares: golden text and JSON output
// for every command, exit codes, and refusal of bad input without a crash.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <fstream>
#include <regex>
#include <string>
#include <vector>

#include "lim/lim.hpp"
#include "limctl/run.hpp"
#include "shm/file_lock.hpp"
#include "shm/segment_state.hpp"
#include "support/process.hpp"

using namespace lim;
using lim::test::check_golden;
using lim::test::limctl;

namespace {

// A segment with known contents: semaphore "db" (capacity 8) of which this process holds 1 and a
// child process 3, and semaphore "idle" that nobody uses.
struct Prepared {
    lim::test::SegmentGuard guard{lim::test::unique_name("limctl")};
    Segment seg = Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 16});
    Semaphore db = Semaphore::open(seg, "db", {.capacity = 8});
    Semaphore idle = Semaphore::open(seg, "idle", {.capacity = 2});
    pid_t child = 0;

    Prepared() {
        db.acquire(1);
        auto* ready = new (lim::test::shared_array<std::atomic<int>>(1)) std::atomic<int>{0};
        child = lim::test::fork_child([&] {
            db.acquire(3);
            ready->store(1);
            for (;;)
                ::pause();
            return 0;
        });
        while (ready->load() == 0)
            ::usleep(100);
    }
    ~Prepared() {
        if (child) {
            ::kill(child, SIGKILL);
            lim::test::wait_child(child);
        }
    }
    void kill_child() {
        ::kill(child, SIGKILL);
        CHECK(lim::test::wait_child(child) == 128 + SIGKILL);
    }
    std::string norm(const std::string& text) const {
        std::string t =
            std::regex_replace(text, std::regex("\\b" + std::to_string(child) + "\\b"), "<CHILD>");
        return lim::test::normalise(t, guard.name(), {::getpid()});
    }
    const std::string& name() const { return guard.name(); }
};

std::string write_toml(const std::string& text) {
    const std::string path = "/tmp/limctl-test-" + std::to_string(::getpid()) + ".toml";
    std::ofstream(path) << text;
    return path;
}

}  // namespace

TEST_CASE("show: the overview, one key in detail, and the process table") {
    Prepared p;
    const auto overview = limctl("show " + p.name());
    CHECK(overview.code == 0);
    CHECK(overview.err.empty());
    check_golden("show.txt", p.norm(overview.out));

    const auto detail = limctl("show " + p.name() + " db");
    CHECK(detail.code == 0);
    check_golden("show-db.txt", p.norm(detail.out));

    const auto procs = limctl("show --processes " + p.name());
    CHECK(procs.code == 0);
    CHECK(procs.out.find("SLOT") != std::string::npos);
    CHECK(procs.out.find(std::to_string(p.child)) != std::string::npos);

    const auto missing = limctl("show " + p.name() + " nope");
    CHECK(missing.code == 1);
    CHECK(missing.err.find("no limiter 'nope'") != std::string::npos);
}

TEST_CASE("show --json has the documented shape") {
    Prepared p;
    const auto r = limctl("show --json " + p.name());
    REQUIRE(r.code == 0);
    const auto j = nlohmann::json::parse(r.out);
    CHECK(j["segment"]["name"] == p.name());
    CHECK(j["segment"]["max_limiters"] == 8);
    CHECK(j["segment"]["processes"] == 2);
    REQUIRE(j["records"].size() == 2);
    const auto& db = j["records"][0];
    CHECK(db["key"] == "db");
    CHECK(db["kind"] == "semaphore");
    CHECK(db["config"]["capacity"] == 8);
    CHECK(db["layers"][0]["name"] == "in_use");
    CHECK(db["layers"][0]["value"] == 4);
    CHECK(db["layers"][0]["capacity"] == 8);
    CHECK(db["admitted_total"] == 2);
    REQUIRE(db["holders"].size() == 2);
    CHECK(db["holders"][0]["pid"] == ::getpid());
    CHECK(db["holders"][0]["held"]["units"] == 1);
    CHECK(db["holders"][1]["pid"] == p.child);
    CHECK(db["holders"][1]["held"]["units"] == 3);
    CHECK(db["holders"][1]["alive"] == true);
    CHECK(j["processes"].size() == 2);
    check_golden("show.json", std::regex_replace(p.norm(r.out), std::regex(R"("slot": \d+)"),
                                                 "\"slot\": <SLOT>"));

    const auto one = limctl("show --json " + p.name() + " idle");
    REQUIRE(one.code == 0);
    CHECK(nlohmann::json::parse(one.out)["records"][0]["key"] == "idle");
}

TEST_CASE("stats --format prometheus parses back") {
    Prepared p;
    const auto r = limctl("stats " + p.name() + " --format prometheus");
    REQUIRE(r.code == 0);
    check_golden("stats.prom", p.norm(r.out));
    // Every sample line is name{labels} value; every family has HELP and TYPE before its samples.
    const std::regex sample(
        R"(^(lim_[a-z_]+)\{([a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*)\} (-?[0-9.e+]+|[+-]Inf)$)");
    const std::regex type(R"(^# TYPE (lim_[a-z_]+) (gauge|counter)$)");
    std::istringstream lines(r.out);
    std::string line, current;
    int samples = 0;
    double in_use = -1;
    while (std::getline(lines, line)) {
        std::smatch m;
        if (line.rfind("# HELP ", 0) == 0) continue;
        if (std::regex_match(line, m, type)) {
            current = m[1];
            if (m[2] == "counter") CHECK(current.size() > 6);
            if (m[2] == "counter") CHECK(current.substr(current.size() - 6) == "_total");
            continue;
        }
        REQUIRE_MESSAGE(std::regex_match(line, m, sample), line);
        CHECK(m[1] == current);
        ++samples;
        if (m[1] == "lim_in_use" && m[2].str().find("key=\"db\"") != std::string::npos)
            in_use = std::stod(m[4]);
    }
    CHECK(samples > 8);
    CHECK(in_use == 4);

    const auto json = limctl("stats --json " + p.name());
    REQUIRE(json.code == 0);
    CHECK(nlohmann::json::parse(json.out)["records"].size() == 2);
}

TEST_CASE("ls lists the segment; a damaged one is listed with its error") {
    Prepared p;
    lim::test::SegmentGuard junk(lim::test::unique_name("limctl-junk"));
    std::ofstream(lim::test::segment_path(junk.name()))
        << "this is not a segment, but long enough to have a header";
    const auto r = limctl("ls");
    REQUIRE(r.code == 0);
    CHECK(std::regex_search(r.out, std::regex(p.name() + R"(\s+[0-9.]+ KiB\s+2/8\s+2\s)")));
    CHECK(std::regex_search(r.out, std::regex(junk.name() + R"(\s+corrupt_segment)")));
    const auto j = limctl("ls --json");
    REQUIRE(j.code == 0);
    bool found = false;
    for (const auto& s : nlohmann::json::parse(j.out)) {
        if (s["name"] == junk.name()) {
            CHECK(s["status"] == "corrupt_segment");
            found = true;
        }
    }
    CHECK(found);
    const auto show = limctl("show " + junk.name());
    CHECK(show.code == 1);
    CHECK(show.err.find("not a valid lim segment") != std::string::npos);
}

TEST_CASE("reap gives back what a killed holder held; reset and rm repair and remove") {
    Prepared p;
    const std::string child = std::to_string(p.child);
    CHECK(limctl("reap " + p.name()).out.find("no dead processes") != std::string::npos);

    const auto busy = limctl("reset " + p.name());
    CHECK(busy.code == 1);
    CHECK(busy.err.find("(busy)") != std::string::npos);

    p.kill_child();
    const auto shown = limctl("show " + p.name() + " db");
    CHECK(shown.out.find("DEAD (reap to recover)") != std::string::npos);
    const auto reaped = limctl("reap " + p.name());
    CHECK(reaped.code == 0);
    check_golden("reap.txt", p.norm(reaped.out));
    CHECK(p.db.in_use() == 1);
    const auto again = limctl("reap --json " + p.name());
    CHECK(nlohmann::json::parse(again.out)["reaped"].empty());

    // This test process is attached too, so a plain reset is refused; force it.
    CHECK(limctl("reset " + p.name() + " db").code == 1);
    const auto reset = limctl("reset --force " + p.name() + " db");
    CHECK(reset.code == 0);
    CHECK(p.db.in_use() == 0);
    CHECK(limctl("reset " + p.name() + " nope").code == 1);

    CHECK(limctl("rm " + p.name()).code == 0);
    const auto gone = limctl("rm " + p.name());
    CHECK(gone.code == 1);
    CHECK(gone.err.find("does not exist") != std::string::npos);
}

TEST_CASE("reap while another reap is stopped holding the recovery lock: busy, exit 1, not hung") {
    Prepared p;
    p.kill_child();  // 3 units for the reap to give back
    // A reaper stopped (Ctrl-Z on limctl reap) holds the recovery lock for as long as it stays
    // stopped: the kernel drops the lock on death, not on stop.
    const int fd = p.seg.state()->fd();
    const pid_t stopped = lim::test::fork_child([fd] {
        const auto lock =
            lim::detail::FileLock::lock_exclusive(fd, lim::detail::LockByte::recovery);
        ::raise(SIGSTOP);
        return 0;
    });
    int st = 0;
    REQUIRE(::waitpid(stopped, &st, WUNTRACED) == stopped);
    REQUIRE(WIFSTOPPED(st));

    // `timeout 60` is the watchdog: before, this reap hung until the reaper was continued.
    const auto busy = limctl("reap " + p.name(), "timeout 60 ");
    CHECK(busy.code == 1);
    CHECK(busy.err.find("(busy)") != std::string::npos);
    CHECK(busy.err.find("recovery lock") != std::string::npos);
    CHECK(p.db.in_use() == 4);  // nothing given back yet

    ::kill(stopped, SIGCONT);
    CHECK(lim::test::wait_child(stopped) == 0);
    const auto reaped = limctl("reap " + p.name(), "timeout 60 ");
    CHECK(reaped.code == 0);
    CHECK(p.db.in_use() == 1);  // exactly the dead child's 3 units, once
}

TEST_CASE("create declares a segment from TOML, idempotently, and refuses bad files clearly") {
    lim::test::SegmentGuard guard(lim::test::unique_name("limctl-create"));
    const std::string good = write_toml(R"(
[segment]
max_limiters = 32
max_processes = 64

[limiter.db]
kind = "semaphore"
capacity = 8
)");
    const auto first = limctl("create " + guard.name() + " --config " + good);
    CHECK(first.code == 0);
    check_golden("create.txt", lim::test::normalise(first.out, guard.name(), {}));
    const auto second = limctl("create " + guard.name() + " --config " + good);
    CHECK(second.code == 0);
    CHECK(second.out.find("already existed") != std::string::npos);
    auto seg = Segment::open(guard.name());
    CHECK(seg.info().max_limiters == 32);
    CHECK(Semaphore::open(seg, "db", {.capacity = 8}).capacity() == 8);

    const auto typo = limctl("create " + guard.name() + " --config " +
                             write_toml("[limiter.db]\nkind = \"semaphore\"\ncapcity = 8\n"));
    CHECK(typo.code == 2);
    CHECK(typo.err.find(":3: limiter.db.capcity: unknown option") != std::string::npos);

    const auto mismatch = limctl("create " + guard.name() + " --config " +
                                 write_toml("[limiter.db]\nkind = \"semaphore\"\ncapacity = 9\n"));
    CHECK(mismatch.code == 1);
    CHECK(mismatch.err.find("config_mismatch") != std::string::npos);

    const auto kind = limctl("create " + guard.name() + " --config " +
                             write_toml("[limiter.x]\nkind = \"pool\"\n"));
    CHECK(kind.code == 2);
    CHECK(kind.err.find("'pool' is not a kind") != std::string::npos);

    const auto syntax =
        limctl("create " + guard.name() + " --config " + write_toml("[limiter.x\n"));
    CHECK(syntax.code == 2);
    CHECK(syntax.err.find(".toml:1:") != std::string::npos);
    // The parser's own "'\n'" reaches the operator as written, not escaped twice ("\x5cx5cn").
    CHECK(syntax.err.find("x5c") == std::string::npos);
    CHECK(syntax.err.find("'\\n'") != std::string::npos);
    // A key with a control byte is still shown escaped, once.
    const auto control = limctl("create " + guard.name() + " --config " +
                                write_toml("[limiter.\"a\\u001bb\"]\nkind = \"semaphore\"\n"));
    CHECK(control.code == 2);
    CHECK(control.err.find("'a\\x1bb'") != std::string::npos);
    CHECK(control.err.find('\x1b') == std::string::npos);
}

TEST_CASE("create makes a Dispatch from TOML; set-backoff backs it off; show and stats tell") {
    lim::test::SegmentGuard guard(lim::test::unique_name("limctl-dispatch"));
    const std::string toml = write_toml(R"(
[limiter.my_api]
kind = "dispatch"
concurrency = 4
throttled_concurrency = 1
byte_budget = 1000
backoff_window = "2s"

[limiter.bytes]
kind = "weighted_semaphore"
capacity = 5000
)");
    const auto created = limctl("create " + guard.name() + " --config " + toml);
    REQUIRE(created.code == 0);
    auto seg = Segment::open(guard.name());
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "my_api"),
                                  .key = "my_api",
                                  .concurrency = 4,
                                  .throttled_concurrency = 1,
                                  .byte_budget = 1000,
                                  .backoff_window = std::chrono::seconds{2}});
    CHECK_FALSE(d.snapshot().backoff_active);

    const auto set = limctl("set-backoff " + guard.name() + " my_api 30s");
    CHECK(set.code == 0);
    CHECK(d.snapshot().backoff_active);
    CHECK(d.snapshot().backoff_remaining > std::chrono::seconds{25});
    auto permit = d.acquire(100);  // under backoff: throttled and penalised (x20, clamped)
    CHECK(permit.throttled());
    CHECK(permit.bytes() == 1000);

    const auto json = nlohmann::json::parse(limctl("show --json " + guard.name() + " my_api").out);
    bool saw_dispatch = false;
    for (const auto& r : json["records"]) {
        if (r["kind"] != "dispatch") continue;
        saw_dispatch = true;
        CHECK(r["config"]["concurrency"] == 4);
        CHECK(r["config"]["backoff_window_ms"] == 2000);
        CHECK(r["layers"][0]["value"] == 1);
        CHECK(r["layers"][1]["name"] == "throttled_in_flight");
        CHECK(r["layers"][1]["value"] == 1);
        CHECK(r["layers"][2]["unit"] == "bytes");
        CHECK(r["layers"][2]["value"] == 1000);
        CHECK(r["values"][0]["name"] == "backoff_active");
        CHECK(r["values"][0]["value"] == 1);
        CHECK(r["holders"][0]["held"]["bytes"] == 1000);
    }
    CHECK(saw_dispatch);
    const auto prom = limctl("stats " + guard.name()).out;
    CHECK(prom.find("lim_backoff_active{segment=\"" + guard.name() +
                    "\",key=\"my_api\",kind=\"dispatch\"} 1") != std::string::npos);
    CHECK(prom.find("lim_in_flight_bytes{segment=\"" + guard.name() +
                    "\",key=\"my_api\",kind=\"dispatch\"} 1000") != std::string::npos);

    CHECK(limctl("set-backoff " + guard.name() + " my_api --clear").code == 0);
    CHECK_FALSE(d.snapshot().backoff_active);
    CHECK(limctl("set-backoff " + guard.name() + " nope 1s").code == 1);
    CHECK(limctl("set-backoff " + guard.name() + " my_api soon").code == 2);
}

TEST_CASE("set-backoff refuses lim-feeder's status records of a rate, and nothing else") {
    lim::test::SegmentGuard guard(lim::test::unique_name("limctl-feeder-status"));
    auto seg = Segment::open_or_create(guard.name());
    (void)TokenBucket::open(seg, "api", {.burst_size = 10, .sustained_rate_per_sec = 1});
    auto lease = BackoffWindow::for_key(seg, "feeder.api.lease");
    auto contact = BackoffWindow::for_key(seg, "feeder.api.contact");
    // The same shape with no rate record behind it is an ordinary window.
    auto plain = BackoffWindow::for_key(seg, "feeder.other.lease");
    for (const char* key : {"feeder.api.lease", "feeder.api.contact"}) {
        const auto r = limctl("set-backoff " + guard.name() + " " + key + " 60s");
        CHECK(r.code == 1);
        CHECK(r.err.find("lim-feeder's status record") != std::string::npos);
        CHECK(limctl("set-backoff " + guard.name() + " " + key + " --clear").code == 1);
    }
    CHECK_FALSE(lease.should_backoff());
    CHECK_FALSE(contact.should_backoff());
    CHECK(limctl("set-backoff " + guard.name() + " feeder.other.lease 60s").code == 0);
    CHECK(plain.should_backoff());
}

TEST_CASE("watch without a terminal prints plain frames, as many as asked") {
    Prepared p;
    const auto r = limctl("watch " + p.name() + " --iterations 3 --interval 50ms </dev/null");
    CHECK(r.code == 0);
    std::size_t frames = 0;
    for (std::size_t at = r.out.find("lim watch:"); at != std::string::npos;
         at = r.out.find("lim watch:", at + 1)) {
        ++frames;
    }
    CHECK(frames == 3);
    CHECK(r.out.find("\x1b[") == std::string::npos);  // no terminal control sequences
    CHECK(r.out.find("4 / 8") != std::string::npos);
}

TEST_CASE("watch --json prints one JSON document per frame, as show --json shapes it") {
    // SPEC: every read command has --json; watch is one.
    Prepared p;
    const auto r =
        limctl("watch " + p.name() + " --json --iterations 2 --interval 50ms </dev/null");
    CHECK(r.code == 0);
    std::vector<nlohmann::json> frames;
    std::size_t start = 0;
    for (std::size_t nl = r.out.find('\n'); nl != std::string::npos;
         start = nl + 1, nl = r.out.find('\n', start)) {
        frames.push_back(nlohmann::json::parse(r.out.substr(start, nl - start)));
    }
    REQUIRE(frames.size() == 2);
    CHECK(r.out.find("\x1b[") == std::string::npos);
    for (const auto& f : frames) {
        CHECK(f["segment"]["name"] == p.name());
        REQUIRE(f["records"].size() == 2);
        CHECK(f["records"][0]["key"] == "db");
        CHECK(f["records"][0]["layers"][0]["value"] == 4);
    }
    CHECK_FALSE(frames[0]["records"][0].contains("admitted_per_second"));
    CHECK(frames[1]["records"][0]["admitted_per_second"] == 0.0);
}

TEST_CASE("a segment name outside the alphabet is a usage error (exit 2), named clearly") {
    for (const std::string cmd : {"show 'bad/name'", "stats 'bad name'", "reap ''", "rm 'a:b'",
                                  "watch -n 1 'bad/name'", "set-backoff 'x/y' k 1s"}) {
        CAPTURE(cmd);
        const auto r = limctl(cmd);
        CHECK(r.code == 2);
        CHECK(r.err.find("invalid_name") != std::string::npos);
    }
    CHECK(limctl("show " + std::string(201, 'a')).code == 2);
    CHECK(limctl("show " + std::string(200, 'a')).code == 1);  // valid, absent: not_found
}

TEST_CASE("read commands never write to the segment") {
    lim::test::SegmentGuard guard(lim::test::unique_name("limctl-ro"));
    {
        auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 8});
        auto sem = Semaphore::open(seg, "db", {.capacity = 4});
        auto tb = TokenBucket::open(seg, "emails", {.burst_size = 5, .sustained_rate_per_sec = 1});
        auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"), .key = "api"});
        sem.acquire(2);
        d.set_backoff(std::chrono::seconds{60});
    }  // this process detaches; its slot is freed, what it held stays recorded as nobody's
    const auto before = lim::test::segment_file_bytes(guard.name());
    for (const std::string& cmd :
         {std::string("ls"), std::string("ls --json"), "show " + guard.name(),
          "show -p " + guard.name(), "show " + guard.name() + " db", "show --json " + guard.name(),
          "stats " + guard.name(), "stats --json " + guard.name(),
          "watch -n 2 -i 50ms " + guard.name() + " </dev/null"}) {
        CAPTURE(cmd);
        CHECK(limctl(cmd).code == 0);
    }
    CHECK(lim::test::segment_file_bytes(guard.name()) == before);
}

TEST_CASE("usage errors exit 2; --help works on every subcommand") {
    CHECK(limctl("").code == 2);
    CHECK(limctl("frobnicate").code == 2);
    CHECK(limctl("show").code == 2);
    CHECK(limctl("stats x --format xml").code == 2);
    CHECK(limctl("watch x --interval soon").code == 2);
    for (const char* sub :
         {"ls", "show", "watch", "stats", "reap", "reset", "rm", "create", "set-backoff"}) {
        CAPTURE(sub);
        const auto help = limctl(std::string(sub) + " --help");
        CHECK(help.code == 0);
        CHECK(help.out.find("Usage") != std::string::npos);
    }
    CHECK(limctl("--help").code == 0);
    CHECK(limctl("--version").out.find("limctl") != std::string::npos);
}

TEST_CASE("a user without access gets a clear permission error") {
    if (::geteuid() != 0) {
        MESSAGE("not root: cannot switch users, skipping");
        return;
    }
    Prepared p;
    const auto r =
        limctl("show " + p.name(), "setpriv --reuid=65534 --regid=65534 --clear-groups ");
    CHECK(r.code == 1);
    CHECK(r.err.find("permission denied") != std::string::npos);
}
