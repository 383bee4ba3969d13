// A redis-server whose clock the test steps: run under libfaketime with its offset read from a
// file (FAKETIME_TIMESTAMP_FILE, re-read at every call with FAKETIME_NO_CACHE=1), its monotonic
// clock left alone, as an NTP step leaves it. What the lease script reads with TIME then follows
// set_offset (docs/global.md, "The protocol clock"; tests/global/clock_step_test.cpp,
// tests/global/pclock_review.cpp P3).
//
// libfaketime 0.9.10 alone hangs Debian's redis-server at start: redis-server links jemalloc,
// whose initialisation calls clock_gettime while libfaketime is initialising ("libfaketime:
// Unexpected recursive calls to clock_gettime() without proper initialization"; libfaketime
// issues #130 and #327, open upstream). Preloading glibc's libc_malloc_debug.so.0 first routes
// Redis's malloc to glibc's allocator, so jemalloc never initialises its clock, and TIME (in
// scripts too) follows the offset. A test checks that it does before relying on it, and prints
// "SKIPPED: ..." (ctest reports it skipped) where it does not.
#pragma once

#include <glob.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "global/redis_fixture.hpp"
#include "support/process.hpp"

namespace lim::test {

// The first file matching one of `patterns`, or "".
inline std::string find_first_file(const std::vector<std::string>& patterns) {
    for (const auto& p : patterns) {
        glob_t g{};
        const bool found = ::glob(p.c_str(), 0, nullptr, &g) == 0 && g.gl_pathc > 0;
        std::string path = found ? g.gl_pathv[0] : "";
        ::globfree(&g);
        if (found) return path;
    }
    return "";
}

class SteppedRedis {
  public:
    // Starts a redis-server under libfaketime on a free port, logging to dir/redis.log, at
    // offset 0; null, with `why_not` set to a line starting "SKIPPED:", when that cannot be
    // (redis-server, libfaketime or glibc's libc_malloc_debug.so.0 missing; it did not start).
    static std::unique_ptr<SteppedRedis> start(const std::string& dir, std::string& why_not) {
        const std::string redis_bin = find_redis_server();
        if (redis_bin.empty()) {
            why_not = "SKIPPED: redis-server is not installed (apt-get install redis-server)";
            return nullptr;
        }
        const std::string faketime = find_first_file({"/usr/lib/*/faketime/libfaketime.so.1",
                                                      "/usr/lib/faketime/libfaketime.so.1",
                                                      "/usr/local/lib/faketime/libfaketime.so.1"});
        if (faketime.empty()) {
            why_not = "SKIPPED: libfaketime is not installed (apt-get install faketime)";
            return nullptr;
        }
        const std::string glibc_malloc =
            find_first_file({"/lib/*/libc_malloc_debug.so.0", "/usr/lib/*/libc_malloc_debug.so.0",
                             "/lib64/libc_malloc_debug.so.0", "/usr/lib64/libc_malloc_debug.so.0"});
        if (glibc_malloc.empty()) {
            why_not =
                "SKIPPED: glibc's libc_malloc_debug.so.0 (glibc >= 2.34) is not here: "
                "libfaketime alone hangs a redis-server that links jemalloc";
            return nullptr;
        }
        std::unique_ptr<SteppedRedis> out(new SteppedRedis(dir + "/faketime.rc"));
        out->set_offset(0);
        out->server_ = std::make_unique<RedisServer>(
            redis_bin, free_port(), dir + "/redis.log",
            std::vector<std::string>{"LD_PRELOAD=" + glibc_malloc + " " + faketime,
                                     "FAKETIME_TIMESTAMP_FILE=" + out->offset_file_,
                                     "FAKETIME_NO_CACHE=1", "FAKETIME_DONT_FAKE_MONOTONIC=1"});
        if (!out->server_->start()) {
            why_not =
                "SKIPPED: redis-server under libfaketime did not answer within 10 s; its "
                "log:\n" +
                read_file(dir + "/redis.log");
            return nullptr;
        }
        return out;
    }

    // Sets Redis's clock to real time + `seconds` ("+10", "-3", "+0"): written aside, then
    // renamed over the file, so that Redis never reads half a line.
    void set_offset(int seconds) const {
        const std::string tmp = offset_file_ + ".tmp";
        {
            std::ofstream out(tmp);
            out << (seconds >= 0 ? "+" : "") << seconds << "\n";
        }
        if (std::rename(tmp.c_str(), offset_file_.c_str()) != 0)
            throw std::runtime_error("cannot write " + offset_file_);
    }

    int port() const { return server_->port(); }
    RedisServer& server() { return *server_; }

  private:
    explicit SteppedRedis(std::string offset_file) : offset_file_(std::move(offset_file)) {}
    std::string offset_file_;
    std::unique_ptr<RedisServer> server_;
};

}  // namespace lim::test
