// What stalls around lim-feeder do to it. First, docs/global.md's failure row "Redis slow": a
// Redis whose every answer comes later than the
// feeder's first timeout (a refresh, 100 ms by default) still feeds the host. A relay between the
// feeder and a real redis-server holds each answer 150 ms (it forwards bytes, it does not speak
// RESP). With the fixed timeout of the first version every call was given up, so a loaded host,
// or one far from its Redis, was never fed; the feeder now doubles its timeout after a call Redis
// did not answer in time (up to half a lease's life) and halves it back after answers.
// Second, a process stopped while it holds the segment's config lock: the feeder's writes of the
// target are refused busy (after 3 s) while it is stopped; the feeder skips the tick and goes on
// (it exited before, ending every lease of the host).
// Third, a segment lock held by another process when the feeder starts: start-up retries the busy
// with backoff until --busy-timeout, then starts (or exits 1 with a message naming the lock); it
// exited on the first busy before.
#include <arpa/inet.h>
#include <doctest/doctest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "global/feeder_harness.hpp"
#include "shm/file_lock.hpp"
#include "shm/segment_state.hpp"

namespace {

using namespace std::chrono_literals;
using namespace lim::test::multihost;

// A TCP relay on 127.0.0.1: each accepted connection is forwarded to `target_port`, requests at
// once, answers `delay` after they arrive. One thread per connection (the feeder opens one at a
// time, and a new one after each timeout); all stop when the relay is destroyed.
class DelayingRelay {
  public:
    DelayingRelay(int target_port, std::chrono::milliseconds delay)
        : target_port_(target_port), delay_(delay) {
        listener_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        REQUIRE(listener_ >= 0);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        a.sin_port = 0;
        REQUIRE(::bind(listener_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
        REQUIRE(::listen(listener_, 16) == 0);
        socklen_t len = sizeof a;
        REQUIRE(::getsockname(listener_, reinterpret_cast<sockaddr*>(&a), &len) == 0);
        port_ = ntohs(a.sin_port);
        acceptor_ = std::thread([this] { accept_loop(); });
    }
    ~DelayingRelay() {
        stop_ = true;
        acceptor_.join();
        for (auto& t : pipes_)
            t.join();
        ::close(listener_);
    }
    int port() const { return port_; }
    int connections() const { return connections_.load(); }

  private:
    void accept_loop() {
        while (!stop_) {
            pollfd p{listener_, POLLIN, 0};
            if (::poll(&p, 1, 20) <= 0) continue;
            const int client = ::accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC);
            if (client < 0) continue;
            const int server = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            sockaddr_in a{};
            a.sin_family = AF_INET;
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            a.sin_port = htons(static_cast<std::uint16_t>(target_port_));
            if (server < 0 || ::connect(server, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
                ::close(client);
                if (server >= 0) ::close(server);
                continue;
            }
            ++connections_;
            pipes_.emplace_back([this, client, server] { relay(client, server); });
        }
    }

    // Requests go through at once; each chunk of an answer is sent `delay_` after it arrived.
    void relay(int client, int server) {
        char buf[65536];
        while (!stop_) {
            pollfd p[2] = {{client, POLLIN, 0}, {server, POLLIN, 0}};
            if (::poll(p, 2, 20) <= 0) continue;
            if (p[0].revents != 0) {
                const ssize_t n = ::read(client, buf, sizeof buf);
                if (n <= 0 || ::write(server, buf, static_cast<std::size_t>(n)) != n) break;
            }
            if (p[1].revents != 0) {
                const ssize_t n = ::read(server, buf, sizeof buf);
                if (n <= 0) break;
                std::this_thread::sleep_for(delay_);
                if (::write(client, buf, static_cast<std::size_t>(n)) != n) break;
            }
        }
        ::close(client);
        ::close(server);
    }

    int target_port_;
    std::chrono::milliseconds delay_;
    int listener_ = -1;
    int port_ = 0;
    std::atomic<bool> stop_{false};
    std::atomic<int> connections_{0};
    std::thread acceptor_;
    std::vector<std::thread> pipes_;
};

}  // namespace

TEST_CASE("a Redis that answers later than a refresh still feeds the host") {
    std::string dir;
    auto redis = start_redis("slow", dir);
    if (!redis) return;
    // Every answer 150 ms late: beyond the first timeout (the refresh, 100 ms), within half a
    // lease (lease_ttl 500 ms in the harness's config: 250 ms).
    DelayingRelay relay(redis->port(), 150ms);
    lim::test::SegmentGuard guard(lim::test::unique_name("slow-redis"));
    Host host;
    host.segment = guard.name();
    host.config = write_config(dir, 0, host.segment, relay.port(), kBurst, kRate, "100ms");
    host.log = dir + "/feeder0.log";
    start_feeder(host);
    std::optional<lim::Segment> seg;
    std::optional<lim::TokenBucket> tb = adopt_global_rate(host.segment, seg);
    REQUIRE(tb.has_value());
    // Fed: a take is admitted (the first version gave every call up, and none ever was).
    const bool fed =
        lim::test::eventually([&] { return tb->try_take(1) == lim::TryTake::taken; }, 60s);
    CHECK(fed);
    if (!fed) MESSAGE(lim::test::read_file(host.log));
    CHECK(relay.connections() >= 1);
    host.feeder.stop(SIGTERM);
}

TEST_CASE("a process stopped holding the config lock: the feeder skips its ticks, then feeds") {
    std::string dir;
    auto redis = start_redis("stalled-lock", dir);
    if (!redis) return;
    lim::test::SegmentGuard guard(lim::test::unique_name("stalled-lock"));
    Host host;
    host.segment = guard.name();
    host.config = write_config(dir, 0, host.segment, redis->port(), kBurst, kRate, "50ms");
    host.log = dir + "/feeder0.log";
    start_feeder(host);
    std::optional<lim::Segment> seg;
    std::optional<lim::TokenBucket> tb = adopt_global_rate(host.segment, seg);
    REQUIRE(tb.has_value());
    REQUIRE(lim::test::eventually([&] { return tb->try_take(1) == lim::TryTake::taken; }, 60s));

    // A neighbour takes the config lock and stops holding it.
    const int fd = seg->state()->fd();
    const pid_t holder = lim::test::fork_child([fd] {
        const lim::detail::FileLock lock =
            lim::detail::FileLock::lock_exclusive(fd, lim::detail::LockByte::config);
        ::raise(SIGSTOP);
        return 0;
    });
    int st = 0;
    REQUIRE(::waitpid(holder, &st, WUNTRACED) == holder);
    REQUIRE(WIFSTOPPED(st));
    // Spend, so that every tick has a target to write, until the feeder says it skipped one.
    const bool skipped = lim::test::eventually(
        [&] {
            (void)tb->try_take(1);
            return lim::test::read_file(host.log).find("skipped this tick") != std::string::npos;
        },
        60s);
    CHECK(skipped);
    CHECK(!host.feeder.wait_for(0ms).has_value());  // still running
    ::kill(holder, SIGKILL);
    ::kill(holder, SIGCONT);
    CHECK(lim::test::wait_child(holder) == 128 + SIGKILL);
    // Fed again once the lock is free: takes are admitted (the bucket refills at 100/s).
    const auto admitted_since = [&] {
        int n = 0;
        const auto until = std::chrono::steady_clock::now() + 60s;
        while (n < 20 && std::chrono::steady_clock::now() < until) {
            if (tb->try_take(1) == lim::TryTake::taken) ++n;
            std::this_thread::sleep_for(1ms);
        }
        return n;
    };
    CHECK(admitted_since() == 20);
    CHECK(!host.feeder.wait_for(0ms).has_value());
    if (!skipped) MESSAGE(lim::test::read_file(host.log));
    host.feeder.stop(SIGTERM);
}

namespace {

// A neighbour (a forked process) takes the segment's records lock, as limctl or a worker creating
// a record does for a moment, and stops holding it until killed: a feeder starting meanwhile
// cannot make its records (lim waits 3 s for the lock, then says busy). Its pid; killing it (and
// only that) frees the lock, whenever the test says so.
pid_t hold_records_lock(const lim::Segment& seg) {
    const int fd = seg.state()->fd();
    const pid_t holder = lim::test::fork_child([fd] {
        const lim::detail::FileLock lock =
            lim::detail::FileLock::lock_exclusive(fd, lim::detail::LockByte::records);
        ::raise(SIGSTOP);
        return 0;
    });
    int st = 0;
    REQUIRE(::waitpid(holder, &st, WUNTRACED) == holder);
    REQUIRE(WIFSTOPPED(st));
    return holder;
}

void release(pid_t holder) {
    ::kill(holder, SIGKILL);
    ::kill(holder, SIGCONT);
    CHECK(lim::test::wait_child(holder) == 128 + SIGKILL);
}

}  // namespace

// Start-up against a segment lock held by another process: it used to exit 1 on the first busy
// (lim's 3 s wait for a lock), so a limctl or a reaper holding a lock for a moment killed a
// systemd-run feeder. It now retries with backoff until --busy-timeout (30 s by default), saying
// so, and starts once the lock is free. The lock is freed when the feeder has said it retries,
// never after a sleep; --busy-timeout is long here so that no load can run it out first.
TEST_CASE("start-up while a neighbour holds a segment lock: the feeder retries, then feeds") {
    std::string dir;
    auto redis = start_redis("busy-start", dir);
    if (!redis) return;
    lim::test::SegmentGuard guard(lim::test::unique_name("busy-start"));
    const lim::Segment seg = lim::Segment::open_or_create(guard.name());
    const pid_t holder = hold_records_lock(seg);
    Host host;
    host.segment = guard.name();
    host.config = write_config(dir, 0, host.segment, redis->port(), kBurst, kRate, "50ms");
    host.log = dir + "/feeder0.log";
    host.feeder.start({FEEDER_PATH, "--config", host.config, "--busy-timeout", "600s"}, host.log);
    // (A feeder that exits on the busy, as before, says "(busy)" and ends the wait at once.)
    const bool said = lim::test::eventually(
        [&] {
            const std::string log = lim::test::read_file(host.log);
            return log.find("retrying in") != std::string::npos ||
                   log.find("(busy)") != std::string::npos;
        },
        120s);
    const bool retried =
        said && lim::test::read_file(host.log).find("retrying in") != std::string::npos;
    REQUIRE_MESSAGE(retried, lim::test::read_file(host.log));
    CHECK(!host.feeder.wait_for(0ms).has_value());  // still running, not exited on busy
    CHECK(seg.info().limiters == 0);                // nothing made while the lock was held
    release(holder);
    // It starts: its records appear, and the global rate is fed.
    std::optional<lim::Segment> s;
    std::optional<lim::TokenBucket> tb = adopt_global_rate(host.segment, s);
    REQUIRE(tb.has_value());
    CHECK(lim::test::eventually([&] { return tb->try_take(1) == lim::TryTake::taken; }, 60s));
    CHECK(!host.feeder.wait_for(0ms).has_value());
    const int status = host.feeder.stop(SIGTERM);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
}

// The same lock held for longer than --busy-timeout: the feeder gives up with a clear error
// (exit 1, naming the lock and the bound), having made nothing. The lock is freed only after the
// feeder has exited, so the order does not depend on timing.
TEST_CASE("start-up while a segment lock stays held past --busy-timeout: exit 1, saying why") {
    std::string dir;
    auto redis = start_redis("busy-giveup", dir);
    if (!redis) return;
    lim::test::SegmentGuard guard(lim::test::unique_name("busy-giveup"));
    const lim::Segment seg = lim::Segment::open_or_create(guard.name());
    const pid_t holder = hold_records_lock(seg);
    Host host;
    host.segment = guard.name();
    host.config = write_config(dir, 0, host.segment, redis->port(), kBurst, kRate, "50ms");
    host.log = dir + "/feeder0.log";
    host.feeder.start({FEEDER_PATH, "--config", host.config, "--busy-timeout", "1s"}, host.log);
    const std::optional<int> status = host.feeder.wait_for(120s);
    REQUIRE(status.has_value());
    CHECK(WIFEXITED(*status));
    CHECK(WEXITSTATUS(*status) == 1);
    const std::string log = lim::test::read_file(host.log);
    CAPTURE(log);
    CHECK(log.find("start-up gave up: the segment stayed busy") != std::string::npos);
    CHECK(log.find("--busy-timeout 1s") != std::string::npos);
    CHECK(log.find("records lock") != std::string::npos);
    CHECK(seg.info().limiters == 0);
    release(holder);
    // A bad bound is a usage error (exit 2), as a bad configuration is.
    Host bad;
    bad.log = dir + "/bad.log";
    bad.feeder.start({FEEDER_PATH, "--config", host.config, "--busy-timeout", "soon"}, bad.log);
    const std::optional<int> bad_status = bad.feeder.wait_for(120s);
    REQUIRE(bad_status.has_value());
    CHECK(WEXITSTATUS(*bad_status) == 2);
    CHECK(lim::test::read_file(bad.log).find("--busy-timeout") != std::string::npos);
}
