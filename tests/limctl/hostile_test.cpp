// limctl against what a hostile neighbour can plant in /dev/shm: FIFOs, symbolic links, files of
// other users, segments truncated while watched, names and keys with terminal escapes and
// invalid UTF-8. Every command answers (never hangs, never dies of a signal), says what is
// wrong, and prints nothing that could forge a row or break JSON.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstring>
#include <string>

#include "lim/lim.hpp"
#include "limctl/run.hpp"
#include "shm/segment_state.hpp"
#include "support/process.hpp"

using namespace lim;
using lim::test::limctl;
using lim::test::SegmentGuard;
using lim::test::unique_name;

namespace {

// Every command runs under `timeout`: a hang shows as exit code 124, a signal as -1.
lim::test::Run bounded(const std::string& args) {
    return limctl(args, "timeout -s KILL 20 ");
}

bool no_control_bytes(const std::string& text) {
    for (unsigned char c : text) {
        if ((c < 0x20 && c != '\n') || c == 0x7f || c >= 0x80) return false;
    }
    return true;
}

}  // namespace

TEST_CASE("a FIFO or symlink under a segment's name: every command answers at once") {
    SegmentGuard guard(unique_name("limctl-fifo"));
    const std::string path = lim::test::segment_path(guard.name());
    SUBCASE("FIFO") {
        REQUIRE(::mkfifo(path.c_str(), 0666) == 0);
    }
    SUBCASE("symlink") {
        REQUIRE(::symlink("/etc/passwd", path.c_str()) == 0);
    }
    for (const std::string cmd : {"show", "show --json", "stats", "watch -n 1", "reap", "reset"}) {
        CAPTURE(cmd);
        const auto r = bounded(cmd + " " + guard.name());
        CHECK(r.code == 1);
        CHECK(r.err.find("regular file") != std::string::npos);
    }
    const auto ls = bounded("ls");
    CHECK(ls.code == 0);
    CHECK(ls.out.find(guard.name()) != std::string::npos);
    const auto json = bounded("ls --json");
    REQUIRE(json.code == 0);
    bool listed = false;
    for (const auto& j : nlohmann::json::parse(json.out)) {
        if (j["name"] == guard.name()) listed = j["status"] == "permission_denied";
    }
    CHECK(listed);
    struct stat st {};
    REQUIRE(::lstat(path.c_str(), &st) == 0);
    CHECK_FALSE(S_ISREG(st.st_mode));
}

TEST_CASE("empty lim.* files are listed as unready, without waiting on them") {
    SegmentGuard a(unique_name("limctl-empty"));
    SegmentGuard b(unique_name("limctl-empty"));
    for (const auto* g : {&a, &b}) {
        const int fd = ::open(lim::test::segment_path(g->name()).c_str(), O_CREAT | O_RDWR, 0600);
        REQUIRE(fd >= 0);
        ::close(fd);
    }
    const auto r = bounded("ls --json");
    REQUIRE(r.code == 0);
    int unready = 0;
    for (const auto& j : nlohmann::json::parse(r.out)) {
        if (j["name"] == a.name() || j["name"] == b.name()) unready += j["status"] == "unready";
    }
    CHECK(unready == 2);
    CHECK(bounded("show " + a.name()).err.find("not initialised") != std::string::npos);
}

TEST_CASE("names with terminal escapes, newlines and invalid UTF-8 are escaped; JSON stays valid") {
    const std::string base = unique_name("limctl-esc");
    const std::string hostile = base + "\x1b[31mFORGED\nrow\xff\xfe";
    const std::string path = "/dev/shm/lim." + hostile;
    {
        const int fd = ::open(path.c_str(), O_CREAT | O_RDWR, 0600);
        REQUIRE(fd >= 0);
        ::close(fd);
    }
    const auto text = bounded("ls");
    const auto json = bounded("ls --json");
    ::unlink(path.c_str());
    CHECK(text.code == 0);
    CHECK(no_control_bytes(text.out));
    CHECK(text.out.find(base + "\\x1b[31mFORGED\\x0arow\\xff\\xfe") != std::string::npos);
    CHECK(text.out.find("\nrow") == std::string::npos);  // no forged row
    REQUIRE(json.code == 0);
    CHECK(nlohmann::json::accept(json.out));
}

TEST_CASE("a damaged key is escaped in text, JSON and Prometheus output") {
    SegmentGuard guard(unique_name("limctl-key"));
    {
        auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 4});
        Semaphore::open(seg, "db", {.capacity = 2});
        // Damage the key in place: what a writer with a bug, or a hostile one, could leave.
        auto& rec = seg.state()->record(0);
        std::memcpy(rec.header.key, "\x1b[2J\xff", 5);
        rec.header.key_length = 5;
    }
    for (const std::string cmd : {"show", "show --json", "stats", "stats --json", "watch -n 1"}) {
        CAPTURE(cmd);
        const auto r = bounded(cmd + " " + guard.name());
        CHECK(r.code == 0);
        CHECK(no_control_bytes(r.out));
        // JSON and Prometheus escape the backslash of the escape once more.
        const bool doubled = cmd != "show" && cmd != "watch -n 1";
        CHECK(r.out.find(doubled ? "\\\\x1b[2J\\\\xff" : "\\x1b[2J\\xff") != std::string::npos);
        if (cmd.find("json") != std::string::npos) CHECK(nlohmann::json::accept(r.out));
    }
}

TEST_CASE("a record whose state word is damaged is not silently dropped from show") {
    SegmentGuard guard(unique_name("limctl-state"));
    {
        auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 4});
        Semaphore::open(seg, "db", {.capacity = 2});
        Semaphore::open(seg, "idle", {.capacity = 2});
        seg.state()->record(0).header.state.store(0xDEADBEEF);  // neither empty nor ready
    }
    const auto r = bounded("show " + guard.name());
    CHECK(r.code == 0);
    CHECK(r.out.find("1 of 2 records not shown") != std::string::npos);
    CHECK(r.out.find("idle") != std::string::npos);
}

TEST_CASE("a segment truncated while watched ends watch with an error, not SIGBUS") {
    SegmentGuard guard(unique_name("limctl-trunc"));
    {
        auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 4});
        Semaphore::open(seg, "db", {.capacity = 2});
    }
    const std::string path = lim::test::segment_path(guard.name());
    const pid_t truncator = lim::test::fork_child([&] {
        ::usleep(300'000);  // a few frames in (or before the first: an error either way)
        return ::truncate(path.c_str(), 4096) == 0 ? 0 : 1;
    });
    const auto r = bounded("watch -i 50ms -n 200 " + guard.name());
    CHECK(lim::test::wait_child(truncator) == 0);
    CHECK(r.code == 1);  // exited with an error: not killed by a signal (-1), not hung (124)
    CHECK(r.err.find(guard.name()) != std::string::npos);
}

TEST_CASE("watch -i takes huge intervals without wrapping") {
    SegmentGuard guard(unique_name("limctl-interval"));
    Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 4});
    // One frame, then a sleep that `timeout` ends: had the interval wrapped to 100 ms, all 40
    // frames would have been printed in 4 s. (10 s, not 4: limctl started late on a loaded
    // machine would print no frame at all before the timeout.)
    const auto r = limctl("watch -i 4294967.396s -n 40 " + guard.name(), "timeout -s INT 10 ");
    std::size_t frames = 0;
    for (std::size_t at = 0; (at = r.out.find("lim watch:", at)) != std::string::npos; ++at)
        ++frames;
    CHECK(frames == 1);
}

TEST_CASE("another user's world-writable segment: limctl's repair commands refuse to trust it") {
    if (::geteuid() != 0) {
        MESSAGE("not root: cannot switch users, skipping");
        return;
    }
    SegmentGuard guard(unique_name("limctl-other"));
    const pid_t child = lim::test::fork_child([&] {
        if (::setgid(65534) != 0 || ::setuid(65534) != 0) return 40;
        Segment::open_or_create(guard.name(),
                                {.max_limiters = 4, .max_processes = 4, .mode = 0666});
        return 0;
    });
    REQUIRE(lim::test::wait_child(child) == 0);
    const auto reap = bounded("reap " + guard.name());
    CHECK(reap.code == 1);
    CHECK(reap.err.find("writable by every user") != std::string::npos);
    // Reading it is safe (a validated private copy), and says whose it is not.
    CHECK(bounded("show " + guard.name()).code == 0);
}

// ---- limctl create: all or nothing, and strict ------------------------------------------------

namespace {

std::string write_toml(const std::string& text) {
    static int n = 0;
    const std::string path =
        "/tmp/limctl-hostile-" + std::to_string(::getpid()) + "-" + std::to_string(n++) + ".toml";
    FILE* f = std::fopen(path.c_str(), "w");
    REQUIRE(f != nullptr);
    std::fputs(text.c_str(), f);
    std::fclose(f);
    return path;
}

bool exists(const std::string& name) {
    struct stat st {};
    return ::lstat(lim::test::segment_path(name).c_str(), &st) == 0;
}

}  // namespace

TEST_CASE("create: a bad value late in the file creates nothing, new segment or existing") {
    SegmentGuard guard(unique_name("limctl-atomic"));
    const std::string bad = write_toml(R"(
[segment]
max_limiters = 8
[limiter.a]
kind = "semaphore"
capacity = 2
[limiter.b]
kind = "token_bucket"
burst_size = -1
sustained_rate_per_sec = 2
)");
    const auto r = bounded("create " + guard.name() + " --config " + bad);
    CHECK(r.code == 1);
    CHECK(r.err.find("'b'") != std::string::npos);
    CHECK_FALSE(exists(guard.name()));  // the segment was not left behind

    // On an existing segment: limiter a is not created either.
    Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 4});
    CHECK(bounded("create " + guard.name() + " --config " + bad).code == 1);
    CHECK(Segment::open(guard.name()).info().limiters == 0);
}

TEST_CASE("create: integers that do not fit, loose modes, non-tables and missing options") {
    SegmentGuard guard(unique_name("limctl-strict"));
    struct Case {
        const char* toml;
        const char* message;
    };
    const Case cases[] = {
        {"[segment]\nmax_limiters = 4294967299\n", "segment.max_limiters: is 4294967299"},
        {"[segment]\nmax_limiters = 100000\n", "max_limiters is 100000"},
        {"[segment]\nmode = \"0600junk\"\n", "segment.mode: must be octal"},
        {"[segment]\nmode = \"0o600\"\n", "segment.mode: must be octal"},
        {"[segment]\nmode = \"0400\"\n", "mode is 0400"},
        {"[segment]\nmode = 660\n", "segment.mode: 660 is a decimal integer"},
        {"[segment]\nmode = 0o17777\n", "segment.mode: must be octal"},
        {"[segment]\nmode = 1.5\n", "segment.mode: must be octal"},
        {"segment = 5\n", "'segment' must be a table"},
        {"limiter = \"x\"\n", "'limiter' must be a table"},
        {"[limiter]\nx = 5\n", "limiter.x must be a table"},
        {"[limiter.\"bad key!\"]\nkind = \"semaphore\"\ncapacity = 1\n", "bad key!"},
        {"[limiter.t]\nkind = \"token_bucket\"\nsustained_rate_per_sec = 2\n",
         "limiter.t.burst_size: missing"},
        {"[limiter.s]\nkind = \"semaphore\"\ncapacity = -3\n", "limiter.s.capacity: is -3"},
        {"[limiter.d]\nkind = \"dispatch\"\nlimiter = \"no spaces\"\n", "limiter.d.limiter"},
    };
    for (const Case& c : cases) {
        CAPTURE(c.toml);
        const auto r = bounded("create " + guard.name() + " --config " + write_toml(c.toml));
        CHECK(r.code == 2);
        CHECK_MESSAGE(r.err.find(c.message) != std::string::npos, r.err);
        CHECK_FALSE(exists(guard.name()));
    }
}

TEST_CASE("create: mode as a TOML octal integer (0o640), as TOML suggests for file modes") {
    SegmentGuard guard(unique_name("limctl-octal"));
    const auto r = bounded("create " + guard.name() + " --config " +
                           write_toml("[segment]\nmode = 0o640\n[limiter.db]\nkind = "
                                      "\"semaphore\"\ncapacity = 1\n"));
    CHECK(r.code == 0);
    struct stat st {};
    REQUIRE(::stat(("/dev/shm/lim." + guard.name()).c_str(), &st) == 0);
    CHECK((st.st_mode & 07777) == 0640);
    // The same mode written as a string is the same file: create is idempotent across spellings.
    const auto again = bounded("create " + guard.name() + " --config " +
                               write_toml("[segment]\nmode = \"0640\"\n"));
    CHECK(again.code == 0);
}

TEST_CASE("create: an existing segment of another geometry or mode is reported, not ignored") {
    SegmentGuard guard(unique_name("limctl-geometry"));
    const auto first =
        bounded("create " + guard.name() + " --config " +
                write_toml("[segment]\nmax_limiters = 8\nmax_processes = 8\nmode = \"0600\"\n"));
    REQUIRE(first.code == 0);
    const auto again = bounded("create " + guard.name() + " --config " +
                               write_toml("[segment]\nmax_limiters = 16\nmode = \"0660\"\n"));
    CHECK(again.code == 1);
    CHECK(again.err.find("max_limiters 8 (file: 16)") != std::string::npos);
    CHECK(again.err.find("mode 0600 (file: 0660)") != std::string::npos);
    CHECK(Segment::open(guard.name()).info().max_limiters == 8);
    CHECK(bounded("create " + guard.name() + " --config " +
                  write_toml("[segment]\nmax_limiters = 8\n"))
              .code == 0);
}
