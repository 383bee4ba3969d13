// lim-feeder: feeds a host's lim segment from a global budget in Redis. See docs/global.md.
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <thread>

#include "config.hpp"
#include "feeder.hpp"
#include "lim/error.hpp"

namespace {

constexpr int kExitOk = 0;
constexpr int kExitError = 1;
constexpr int kExitUsage = 2;

std::atomic<bool> g_stop{false};

extern "C" void on_signal(int) {
    g_stop.store(true, std::memory_order_relaxed);
}

// One feeder per segment: an flock the kernel drops when the process dies, however it dies.
int lock_segment(const std::string& segment) {
    const std::string path = "/dev/shm/lim-feeder." + segment + ".lock";
    // /dev/shm is world-writable: never follow a planted link, never block on a planted FIFO,
    // and refuse a file someone else owns (the feeder writes its instance id into it).
    const int fd =
        ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK, 0600);
    if (fd < 0) throw std::runtime_error("cannot open " + path + ": " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != ::geteuid()) {
        ::close(fd);
        throw std::runtime_error(path + " is not a regular file of this user: remove it");
    }
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
        ::close(fd);
        throw std::runtime_error("another lim-feeder feeds segment '" + segment + "' (" + path +
                                 " is locked)");
    }
    return fd;
}

// The feeder's instance id, kept in its lock file (held, so no other feeder writes it): made
// once at random, then the same for every feeder of this segment on this machine.
std::string instance_id(int lock_fd) {
    char buf[17] = {};
    const ssize_t n = ::pread(lock_fd, buf, 16, 0);
    bool ok = n == 16;
    for (int i = 0; ok && i < 16; ++i)
        ok = (buf[i] >= '0' && buf[i] <= '9') || (buf[i] >= 'a' && buf[i] <= 'f');
    if (ok) return std::string(buf, 16);
    std::random_device rd;
    const std::uint64_t v = (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
    const std::string id = fmt::format("{:016x}", v);
    if (::ftruncate(lock_fd, 0) != 0 || ::pwrite(lock_fd, id.data(), id.size(), 0) != 16) {
        throw std::runtime_error("cannot write the feeder's instance id to its lock file");
    }
    return id;
}

// A configured duration as the config file writes it: 100ms, 1s, 250us.
std::string show_duration(std::chrono::microseconds d) {
    const long long us = d.count();
    if (us % 1'000'000 == 0) return fmt::format("{}s", us / 1'000'000);
    if (us % 1'000 == 0) return fmt::format("{}ms", us / 1'000);
    return fmt::format("{}us", us);
}

// Redis learns what a host spent only at its next call, so the refill between two of a host's
// lease calls is capped by the leases that stood during it (docs/global.md, protocol step 2, and
// "Known limits"): a host that spends each grant as it lands is granted at most about burst / (2 x
// the time between its calls) a second. A starving rate calls every refresh / 4, so that is about
// 2 x burst / refresh (global.early_call measures it). Below the rate, say so at start-up, where an
// operator reads it, rather than let the shortfall look like Redis or the workers stalling. Not an
// error: a small burst is a valid, if slow, choice.
void warn_of_small_bursts(const lim::feeder::Config& config) {
    const double refresh_s = std::chrono::duration<double>(config.refresh).count();
    for (const lim::feeder::GlobalRate& r : config.rates) {
        const double ceiling = 2 * r.burst_size / refresh_s;
        if (ceiling >= r.sustained_rate_per_sec) continue;
        fmt::print(stderr,
                   "lim-feeder: warning: global rate '{}': burst_size {:g} is below "
                   "sustained_rate_per_sec x refresh / 2 ({:g}), so this feeder is granted at most "
                   "about {:g} of the {:g} tokens a second; raise burst_size or lower refresh "
                   "(docs/global.md, \"Known limits\")\n",
                   r.key, r.burst_size, r.sustained_rate_per_sec * refresh_s / 2, ceiling,
                   r.sustained_rate_per_sec);
    }
}

// Start-up retries a segment lock held by another process. lim's calls wait kLockWaitTimeout (3 s)
// for a lock of the segment (records, config, recovery) and then throw Error(busy): limctl, a
// reaper or a worker creating a record can hold one for a moment, a stopped process for longer. A
// daemon that systemd runs should not die of the first (Restart= would only try again blindly), so
// the whole start-up (open the segment, make or adopt and reconcile each record: every step of it
// leaves the records fail-closed, so starting again from the top is safe) is retried, with a
// backoff from 100 ms to 2 s, until `busy_timeout` has passed since the first try; then busy is an
// error (exit 1) that says what stayed held. Null when asked to stop (SIGTERM) meanwhile.
std::unique_ptr<lim::feeder::Feeder> start_feeder(const lim::feeder::Config& config,
                                                  std::chrono::microseconds busy_timeout) {
    using Steady = std::chrono::steady_clock;
    const Steady::time_point first = Steady::now();
    std::chrono::milliseconds pause{100};
    for (;;) {
        try {
            return std::make_unique<lim::feeder::Feeder>(config);
        } catch (const lim::Error& e) {
            if (e.code() != lim::Errc::busy) throw;
            const auto waited = Steady::now() - first;
            if (waited + pause > busy_timeout) {
                throw lim::Error(
                    lim::Errc::busy,
                    fmt::format("start-up gave up: the segment stayed busy for {:.1f} s "
                                "(--busy-timeout {}): {}",
                                std::chrono::duration<double>(waited).count(),
                                show_duration(busy_timeout), e.what()));
            }
            fmt::print(stderr,
                       "lim-feeder: start-up: {}; retrying in {} ms (until --busy-timeout {})\n",
                       e.what(), pause.count(), show_duration(busy_timeout));
            std::fflush(stderr);
        }
        const Steady::time_point until = Steady::now() + pause;
        while (Steady::now() < until) {
            if (g_stop.load(std::memory_order_relaxed)) return nullptr;
            std::this_thread::sleep_for(std::chrono::milliseconds{10});
        }
        pause = std::min(2 * pause, std::chrono::milliseconds{2000});
    }
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"lim-feeder: feed a host's lim segment from a global budget kept in Redis"};
    std::string config_path;
    app.add_option("--config", config_path, "the feeder's TOML configuration")->required();
    std::string busy_timeout_text = "30s";
    app.add_option("--busy-timeout", busy_timeout_text,
                   "how long start-up retries while another process holds a lock of the segment "
                   "(busy), before exiting 1; a duration as in the config (default 30s)");
    app.set_version_flag("--version", "lim-feeder " LIM_VERSION);
    app.footer(
        "Runs in the foreground until SIGTERM or SIGINT. The config's keys, the workers' side and\n"
        "the unit file: docs/global.md. Exit status: 0 stopped, 1 error (another lim-feeder on\n"
        "the segment, a record it cannot adopt, the segment busy past --busy-timeout),\n"
        "2 usage or a bad configuration. An unreachable Redis is no exit: it runs on,\n"
        "fail-closed (or open), and retries every refresh.");
    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForVersion& e) {
        return app.exit(e);
    } catch (const CLI::ParseError& e) {
        app.exit(e);
        return kExitUsage;
    }
    try {
        lim::feeder::Config config = lim::feeder::load_config(config_path);
        std::chrono::microseconds busy_timeout{};
        try {
            busy_timeout = lim::feeder::parse_duration(busy_timeout_text);
        } catch (const std::invalid_argument& e) {
            throw std::invalid_argument(std::string("--busy-timeout: ") + e.what());
        }
        const int lock_fd = lock_segment(config.segment);
        config.instance = instance_id(lock_fd);
        struct sigaction sa {};
        sa.sa_handler = on_signal;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGTERM, &sa, nullptr);
        sigaction(SIGINT, &sa, nullptr);
        fmt::print(stderr,
                   "lim-feeder: host {} feeds segment {} from redis {}:{} ({} rates, {} backoffs; "
                   "refresh {}, lease_ttl {}, on_redis_down {})\n",
                   config.host, config.segment, config.redis.host, config.redis.port,
                   config.rates.size(), config.backoffs.size(), show_duration(config.refresh),
                   show_duration(config.lease_ttl), config.fail_open ? "open" : "closed");
        warn_of_small_bursts(config);
        std::fflush(stderr);
        const std::unique_ptr<lim::feeder::Feeder> feeder = start_feeder(config, busy_timeout);
        if (feeder) feeder->run(g_stop);
        ::close(lock_fd);
        return kExitOk;
    } catch (const std::invalid_argument& e) {
        fmt::print(stderr, "lim-feeder: {}\n", e.what());
        return kExitUsage;
    } catch (const lim::Error& e) {
        fmt::print(stderr, "lim-feeder: {} ({})\n", e.what(), lim::to_string(e.code()));
        return kExitError;
    } catch (const std::exception& e) {
        fmt::print(stderr, "lim-feeder: {}\n", e.what());
        return kExitError;
    }
}
