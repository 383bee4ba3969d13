// lim-feeder's configuration as a new user writes it (docs/global.md, "Quick start"): the real
// binary, run on config files. A misspelt key or a value of the wrong type is a bad
// configuration (exit 2, a message naming the key, nothing created), never a default taken in
// silence; the documented file is accepted, and the start-up line shows what is in force. No
// Redis is needed: the feeder is pointed at a port where nothing listens.
#include <doctest/doctest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "global/redis_fixture.hpp"
#include "lim/lim.hpp"
#include "support/process.hpp"

#ifdef FEEDER_PATH

namespace {

using namespace std::chrono_literals;

bool exists(const std::string& path) {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0;
}

struct Scratch {
    std::string dir;
    Scratch() {
        char tmpl[] = "/tmp/lim-feeder-config.XXXXXX";
        const char* d = ::mkdtemp(tmpl);
        REQUIRE(d != nullptr);
        dir = d;
    }
    ~Scratch() {
        const std::string cmd = "rm -rf '" + dir + "'";
        if (std::system(cmd.c_str()) != 0) {
        }
    }
};

// A config file with `feeder_lines` under [feeder] (after segment and redis) and `tail` after it.
std::string write(const std::string& dir, const std::string& name, const std::string& segment,
                  int port, const std::string& feeder_lines, const std::string& tail) {
    const std::string path = dir + "/" + name + ".toml";
    std::ofstream out(path);
    out << "[feeder]\nsegment = \"" << segment << "\"\nredis = \"redis://127.0.0.1:" << port
        << "\"\n"
        << feeder_lines << tail;
    return path;
}

const std::string kRate =
    "[global.api]\nkind = \"rate\"\nburst_size = 100\nsustained_rate_per_sec = 50\n";
const std::string kBackoff = "[global.api_backoff]\nkind = \"backoff\"\n";

}  // namespace

TEST_CASE(
    "lim-feeder: a misspelt or wrong-typed key is a bad configuration (exit 2), not a default") {
    struct Case {
        const char* what;
        std::string feeder_lines;
        std::string tail;
        const char* message;
    };
    const std::vector<Case> cases{
        {"a misspelt feeder key", "refesh = \"250ms\"\n", kRate,
         "feeder.refesh is not a known key"},
        {"refresh as a number", "refresh = 100\n", kRate, "feeder.refresh must be a string"},
        {"lease_ttl as a number", "lease_ttl = 5\n", kRate, "feeder.lease_ttl must be a string"},
        {"on_redis_down as a boolean", "on_redis_down = true\n", kRate,
         "feeder.on_redis_down must be a string"},
        {"host as a number", "host = 7\n", kRate, "feeder.host must be a string"},
        {"a duration with a space", "refresh = \"100 ms\"\n", kRate, "is not a duration"},
        {"a misspelt rate key", "",
         "[global.api]\nkind = \"rate\"\nburst = 100\nburst_size = 100\n"
         "sustained_rate_per_sec = 50\n",
         "global.api.burst is not a known key"},
        {"a rate key on a backoff", "",
         "[global.api_backoff]\nkind = \"backoff\"\nburst_size = 5\n",
         "global.api_backoff.burst_size is not a known key"},
        {"kind as a number", "", "[global.api]\nkind = 1\n", "global.api.kind must be a string"},
        {"a misspelt table", "", "[globals.api]\nkind = \"rate\"\n", "globals is not a known key"},
        {"a key under the wrong table", "", "global = 5\n", "feeder.global is not a known key"},
        // Issue 12's "a `fail_open` option": a boolean, and the same choice as on_redis_down.
        {"fail_open as a string", "fail_open = \"yes\"\n", kRate,
         "feeder.fail_open must be true or false"},
        {"fail_open against on_redis_down", "fail_open = true\non_redis_down = \"closed\"\n", kRate,
         "feeder.fail_open = true contradicts feeder.on_redis_down = \"closed\""},
    };
    Scratch scratch;
    const int port = lim::test::free_port();  // nothing listens: a bad config never gets there
    int n = 0;
    for (const Case& c : cases) {
        const std::string what = c.what;
        CAPTURE(what);
        const std::string segment = lim::test::unique_name("fcfg");
        const std::string name = "bad" + std::to_string(n++);
        const std::string config = write(scratch.dir, name, segment, port, c.feeder_lines, c.tail);
        const std::string log = scratch.dir + "/" + name + ".log";
        lim::test::ChildProcess feeder;
        feeder.start({FEEDER_PATH, "--config", config}, log);
        const auto status = feeder.wait_for(60s);
        REQUIRE_MESSAGE(status.has_value(), "the feeder ran on: " << lim::test::read_file(log));
        CHECK(WIFEXITED(*status));
        CHECK(WEXITSTATUS(*status) == 2);
        const std::string text = lim::test::read_file(log);
        CHECK_MESSAGE(text.find(c.message) != std::string::npos, text);
        // Refused before anything was made: no segment, no lock file.
        CHECK_FALSE(exists(lim::test::segment_path(segment)));
        CHECK_FALSE(exists("/dev/shm/lim-feeder." + segment + ".lock"));
        if (exists(lim::test::segment_path(segment))) lim::Segment::remove(segment);
        ::unlink(("/dev/shm/lim-feeder." + segment + ".lock").c_str());
    }
}

TEST_CASE(
    "lim-feeder: the documented config is accepted; the start-up line shows what is in force") {
    struct Case {
        const char* what;
        std::string feeder_lines;
        const char* in_force;
        std::string rate = kRate;
        bool warns = false;  // of a burst too small for the rate at this refresh
    };
    const std::vector<Case> cases{
        // docs/global.md "Quick start", every key (the redis address is ours).
        {"the Quick start's keys",
         "host = \"web-1\"\nrefresh = \"100ms\"\nlease_ttl = \"1s\"\non_redis_down = \"closed\"\n",
         "refresh 100ms, lease_ttl 1s, on_redis_down closed"},
        {"other values",
         "host = \"web-2\"\nrefresh = \"250ms\"\nlease_ttl = \"2s\"\n"
         "on_redis_down = \"open\"\n",
         "refresh 250ms, lease_ttl 2s, on_redis_down open"},
        {"the defaults", "", "refresh 100ms, lease_ttl 1s, on_redis_down closed"},
        // Issue 12 names the choice "a `fail_open` option": the same switch as on_redis_down.
        {"fail_open = true", "fail_open = true\n", "on_redis_down open"},
        {"fail_open = false", "fail_open = false\n", "on_redis_down closed"},
        {"fail_open agreeing with on_redis_down", "fail_open = true\non_redis_down = \"open\"\n",
         "on_redis_down open"},
        // burst 10 < 1000/s x 100 ms / 2: at most ~2 x 10 / 100 ms = 200 of the 1000 tokens a
        // second (a warning, not an error); at 5 ms the same rate fits (4000/s).
        {"a burst too small for its rate", "", "refresh 100ms",
         "[global.api]\nkind = \"rate\"\nburst_size = 10\nsustained_rate_per_sec = 1000\n", true},
        {"the same rate with a short refresh", "refresh = \"5ms\"\n", "refresh 5ms",
         "[global.api]\nkind = \"rate\"\nburst_size = 10\nsustained_rate_per_sec = 1000\n"},
    };
    Scratch scratch;
    const int port = lim::test::free_port();
    int n = 0;
    for (const Case& c : cases) {
        const std::string what = c.what;
        CAPTURE(what);
        const std::string segment = lim::test::unique_name("fcfg");
        const std::string name = "good" + std::to_string(n++);
        const std::string config =
            write(scratch.dir, name, segment, port, c.feeder_lines, c.rate + kBackoff);
        const std::string log = scratch.dir + "/" + name + ".log";
        lim::test::ChildProcess feeder;
        feeder.start({FEEDER_PATH, "--config", config}, log);
        // An unreachable Redis is no reason to exit: the feeder runs on, fail-closed, retrying.
        const bool retrying = lim::test::eventually(
            [&] { return lim::test::read_file(log).find("does not answer") != std::string::npos; },
            60s);
        const std::string text = lim::test::read_file(log);
        CHECK_MESSAGE(retrying, text);
        CHECK_MESSAGE(text.find("feeds segment " + segment) != std::string::npos, text);
        CHECK_MESSAGE(text.find(c.in_force) != std::string::npos, text);
        const bool warned = text.find(
                                "warning: global rate 'api': burst_size 10 is below "
                                "sustained_rate_per_sec x refresh / 2 (50), so this feeder is "
                                "granted at most about 200 of the 1000") != std::string::npos;
        CHECK_MESSAGE(warned == c.warns, text);
        const bool any_warning = text.find("warning") != std::string::npos;
        CHECK_MESSAGE(any_warning == c.warns, text);
        CHECK_FALSE(feeder.wait_for(0ms).has_value());  // still running
        const int status = feeder.stop(SIGTERM);
        CHECK(WIFEXITED(status));
        CHECK(WEXITSTATUS(status) == 0);
        if (exists(lim::test::segment_path(segment))) lim::Segment::remove(segment);
        ::unlink(("/dev/shm/lim-feeder." + segment + ".lock").c_str());
    }
}

TEST_CASE("lim-feeder --help names the docs and the exit statuses") {
    const std::string cmd = std::string(FEEDER_PATH) + " --help";
    FILE* p = ::popen(cmd.c_str(), "r");
    REQUIRE(p != nullptr);
    std::string out;
    char buf[512];
    while (std::fgets(buf, sizeof buf, p) != nullptr)
        out += buf;
    const int status = ::pclose(p);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
    CHECK_MESSAGE(out.find("--config") != std::string::npos, out);
    CHECK_MESSAGE(out.find("docs/global.md") != std::string::npos, out);
    CHECK_MESSAGE(out.find("2 usage or a bad configuration") != std::string::npos, out);
    CHECK_MESSAGE(out.find("--busy-timeout") != std::string::npos, out);
}

#else

TEST_CASE("lim-feeder config: not built (no hiredis)") {
    MESSAGE("SKIPPED: lim-feeder is not built");
}

#endif
