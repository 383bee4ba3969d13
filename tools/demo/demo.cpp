// lim-demo: forked API-client workers sharing one Dispatch against a fake API that answers 429.
//
// The parent creates a segment, a BackoffWindow and a Dispatch, and a fake API whose state lives
// in shared memory (so every worker talks to the same "server"). It forks N workers; each sends
// requests through the Dispatch. The API tolerates only so many requests at once: beyond that it
// answers 429 with a Retry-After header (delta-seconds or an HTTP-date, alternately). A worker
// that gets a 429 parses the header with lim::parse_retry_after and calls set_backoff, which
// throttles every worker of every process at once: concurrency drops to throttled_concurrency
// and bytes cost byte_penalty_multiplier times more, until backoff_window after the deadline.
//
// While it runs the parent prints the Dispatch's live snapshot; at the end, a summary table.
// The segment is removed at the end (and on Ctrl-C).
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <ctime>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "lim/backoff_window.hpp"
#include "lim/dispatch.hpp"
#include "lim/error.hpp"
#include "lim/retry_after.hpp"
#include "lim/segment.hpp"

namespace {

using namespace std::chrono_literals;
using Headers = std::vector<std::pair<std::string, std::string>>;

struct Response {
    int status = 200;
    Headers headers;
};

// Per-worker counters, in shared memory.
struct WorkerStats {
    std::atomic<long> requests;
    std::atomic<long> ok;
    std::atomic<long> too_many;
    std::atomic<long> throttled;  // requests sent under backoff
    std::atomic<int> pid;
};

// The fake API's state and the demo's independent counters, in MAP_SHARED memory so that every
// forked worker sees one server. Plain atomics: the demo does not trust lim to count for it.
struct Shared {
    std::int64_t start_ns;           // steady_clock, when the workers were started
    std::atomic<int> stop;           // set by Ctrl-C or when the work is done
    std::atomic<long> next_request;  // requests handed out
    std::atomic<long> completed;
    std::atomic<int> active;  // requests the API is serving now
    std::atomic<int> peak_active;
    std::atomic<long> bytes;  // bytes in flight, as charged by the Dispatch
    std::atomic<long> peak_bytes;
    std::atomic<long> date_headers;  // 429s answered with an HTTP-date
    WorkerStats workers[256];
};

Shared* g_shared = nullptr;

void on_signal(int) {
    if (g_shared) g_shared->stop.store(1);
}

void raise_peak(std::atomic<long>& peak, long v) {
    long p = peak.load();
    while (v > p && !peak.compare_exchange_weak(p, v)) {
    }
}

void raise_peak(std::atomic<int>& peak, int v) {
    int p = peak.load();
    while (v > p && !peak.compare_exchange_weak(p, v)) {
    }
}

std::string http_date(std::chrono::system_clock::time_point t) {
    const std::time_t tt = std::chrono::system_clock::to_time_t(t);
    std::tm tm{};
    ::gmtime_r(&tt, &tm);
    char buf[64];
    std::strftime(buf, sizeof buf, "%a, %d %b %Y %H:%M:%S GMT", &tm);
    return buf;
}

struct Config {
    int workers = 8;
    int threads = 4;
    long requests = 4000;
    double seconds = 30;
    std::uint64_t concurrency = 16;
    std::uint64_t throttled_concurrency = 3;
    std::uint64_t byte_budget = 2'000'000;
    double backoff_window = 2.0;
    std::uint64_t penalty = 20;
    int api_capacity = 24;
    int overload_capacity = 6;
    double overload_at = 1.5;
    double overload_for = 3.0;
    int retry_after = 1;
    std::string segment;
};

// How many requests the fake API serves at once now: `api_capacity`, except during its incident
// (from overload_at, for overload_for seconds), when it can take only `overload_capacity`.
int api_capacity_now(const Shared& s, const Config& cfg) {
    const double t =
        std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch() -
                                      std::chrono::nanoseconds{s.start_ns})
            .count();
    const bool incident = t >= cfg.overload_at && t < cfg.overload_at + cfg.overload_for;
    return incident ? cfg.overload_capacity : cfg.api_capacity;
}

// The fake API: serves a request in 10-30 ms (plus 1 ms per 64 KB), unless it is already serving
// as many as it can, in which case it answers 429 at once.
Response call_api(Shared& s, const Config& cfg, std::uint64_t bytes, std::mt19937& rng) {
    const int now_active = s.active.fetch_add(1) + 1;
    if (now_active > api_capacity_now(s, cfg)) {
        s.active.fetch_sub(1);
        Response r{429, {{"Content-Type", "application/json"}}};
        // Alternate the two forms RFC 9110 allows, so the demo exercises both parsers.
        if (s.date_headers.fetch_add(1) % 2 == 0) {
            r.headers.emplace_back("Retry-After", std::to_string(cfg.retry_after));
        } else {
            r.headers.emplace_back("Retry-After",
                                   http_date(std::chrono::system_clock::now() +
                                             std::chrono::seconds{cfg.retry_after + 1}));
        }
        return r;
    }
    raise_peak(s.peak_active, now_active);
    std::uniform_int_distribution<int> service_us(10'000, 30'000);
    std::this_thread::sleep_for(std::chrono::microseconds{service_us(rng)} +
                                std::chrono::microseconds{bytes / 64});
    s.active.fetch_sub(1);
    return {};
}

int run_worker(int index, const Config& cfg, lim::Dispatch& d) {
    Shared& s = *g_shared;
    WorkerStats& me = s.workers[index];
    std::mt19937 rng(static_cast<unsigned>(std::random_device{}()));
    std::uniform_int_distribution<std::uint64_t> body(1'000, 64'000);
    while (s.stop.load() == 0 && s.next_request.fetch_add(1) < cfg.requests) {
        const std::uint64_t bytes = body(rng);
        for (;;) {  // until the API accepts this request
            if (s.stop.load() != 0) return 0;
            Response r;
            {
                lim::Permit permit = d.acquire(bytes);
                const auto charged = static_cast<long>(permit.bytes());
                raise_peak(s.peak_bytes, s.bytes.fetch_add(charged) + charged);
                me.requests.fetch_add(1);
                if (permit.throttled()) me.throttled.fetch_add(1);
                r = call_api(s, cfg, bytes, rng);
                s.bytes.fetch_sub(charged);
            }
            if (r.status != 429) break;
            me.too_many.fetch_add(1);
            // Tell every worker of every process, then let this request wait as the server
            // asked (the shared window may have been extended meanwhile: wait honours that).
            // Other requests go on meanwhile, throttled and penalised.
            const lim::Duration retry = lim::parse_retry_after(r.headers).value_or(1s);
            d.set_backoff(retry);
            d.limiter().wait_until(lim::Clock::now() + retry);
        }
        me.ok.fetch_add(1);
        s.completed.fetch_add(1);
    }
    return 0;
}

std::string human_bytes(double b) {
    if (b >= 1e6) return fmt::format("{:.1f}M", b / 1e6);
    if (b >= 1e3) return fmt::format("{:.0f}k", b / 1e3);
    return fmt::format("{:.0f}", b);
}

}  // namespace

int main(int argc, char** argv) {
    Config cfg;
    CLI::App app{
        "lim-demo: forked workers share one lim::Dispatch (concurrency, byte budget, backoff)\n"
        "against a fake API that answers 429 with Retry-After when overloaded."};
    app.add_option("-w,--workers", cfg.workers, "forked worker processes")
        ->check(CLI::Range(1, 256))
        ->capture_default_str();
    app.add_option("-t,--threads", cfg.threads, "threads per worker, each sending requests")
        ->check(CLI::Range(1, 64))
        ->capture_default_str();
    app.add_option("-n,--requests", cfg.requests, "requests to complete, in all")
        ->check(CLI::Range(1L, 100'000'000L))
        ->capture_default_str();
    app.add_option("-s,--seconds", cfg.seconds, "stop after this long even if requests remain")
        ->check(CLI::Range(0.1, 3600.0))
        ->capture_default_str();
    app.add_option("--concurrency", cfg.concurrency, "Dispatch concurrency")
        ->check(CLI::Range(1, 100'000))
        ->capture_default_str();
    app.add_option("--throttled", cfg.throttled_concurrency, "Dispatch throttled_concurrency")
        ->check(CLI::Range(1, 100'000))
        ->capture_default_str();
    app.add_option("--budget", cfg.byte_budget, "Dispatch byte_budget")
        ->check(CLI::Range(1'000, 1'000'000'000))
        ->capture_default_str();
    app.add_option("--backoff-window", cfg.backoff_window,
                   "Dispatch backoff_window, seconds (the seed's default is 10)")
        ->check(CLI::Range(0.0, 600.0))
        ->capture_default_str();
    app.add_option("--penalty", cfg.penalty, "Dispatch byte_penalty_multiplier")
        ->check(CLI::Range(1, 1000))
        ->capture_default_str();
    app.add_option("--api-capacity", cfg.api_capacity,
                   "requests the fake API serves at once before it answers 429")
        ->check(CLI::Range(1, 100'000))
        ->capture_default_str();
    app.add_option("--overload-capacity", cfg.overload_capacity,
                   "what the API can take during its incident")
        ->check(CLI::Range(1, 100'000))
        ->capture_default_str();
    app.add_option("--overload-at", cfg.overload_at, "when the API's incident begins, seconds")
        ->check(CLI::Range(0.0, 3600.0))
        ->capture_default_str();
    app.add_option("--overload-for", cfg.overload_for, "how long it lasts, seconds")
        ->check(CLI::Range(0.0, 3600.0))
        ->capture_default_str();
    app.add_option("--retry-after", cfg.retry_after, "seconds the API asks for in Retry-After")
        ->check(CLI::Range(0, 60))
        ->capture_default_str();
    app.add_option("--segment", cfg.segment, "segment name (default: lim-demo-<pid>)");
    CLI11_PARSE(app, argc, argv);
    if (cfg.segment.empty()) cfg.segment = fmt::format("lim-demo-{}", ::getpid());

    void* mem =
        ::mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        std::perror("mmap");
        return 1;
    }
    g_shared = new (mem) Shared{};
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);

    try {
        auto seg = lim::Segment::open_or_create(
            cfg.segment,
            {.max_limiters = 16,
             .max_processes = static_cast<std::uint32_t>(cfg.workers * (cfg.threads + 1) + 16)});
        auto window = lim::BackoffWindow::for_key(seg, "api");
        auto d =
            lim::Dispatch::open(seg, {.limiter = window,
                                      .key = "api",
                                      .concurrency = cfg.concurrency,
                                      .throttled_concurrency = cfg.throttled_concurrency,
                                      .byte_budget = cfg.byte_budget,
                                      .backoff_window = std::chrono::duration_cast<lim::Duration>(
                                          std::chrono::duration<double>{cfg.backoff_window}),
                                      .byte_penalty_multiplier = cfg.penalty});
        fmt::print("segment '{}' (/dev/shm/lim.{}): {} workers x {} threads, {} requests\n",
                   cfg.segment, cfg.segment, cfg.workers, cfg.threads, cfg.requests);
        fmt::print("  look at it from another terminal while this runs: limctl show {}\n",
                   cfg.segment);
        fmt::print(
            "  Dispatch 'api': concurrency {}, throttled {}, byte budget {}, penalty x{}, "
            "backoff window {}s\n",
            cfg.concurrency, cfg.throttled_concurrency,
            human_bytes(static_cast<double>(cfg.byte_budget)), cfg.penalty, cfg.backoff_window);
        fmt::print(
            "  the fake API serves {} at once, only {} from {}s to {}s (its incident), and "
            "answers 429 + Retry-After beyond that\n\n",
            cfg.api_capacity, cfg.overload_capacity, cfg.overload_at,
            cfg.overload_at + cfg.overload_for);
        std::fflush(stdout);

        g_shared->start_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                 std::chrono::steady_clock::now().time_since_epoch())
                                 .count();
        std::vector<pid_t> kids;
        for (int w = 0; w < cfg.workers; ++w) {
            const pid_t pid = ::fork();
            if (pid < 0) {
                std::perror("fork");
                g_shared->stop = 1;
                break;
            }
            if (pid == 0) {
                int rc = 1;
                try {
                    g_shared->workers[w].pid = static_cast<int>(::getpid());
                    std::vector<std::thread> threads;
                    for (int t = 1; t < cfg.threads; ++t)
                        threads.emplace_back([&] { run_worker(w, cfg, d); });
                    rc = run_worker(w, cfg, d);
                    for (auto& t : threads)
                        t.join();
                } catch (const std::exception& e) {
                    std::fprintf(stderr, "worker %d: %s\n", w, e.what());
                }
                std::fflush(nullptr);
                ::_exit(rc);
            }
            kids.push_back(pid);
        }

        // Watch: sample the snapshot every 10 ms (time in backoff), print it every 500 ms.
        const auto start = std::chrono::steady_clock::now();
        const auto limit = start + std::chrono::duration<double>{cfg.seconds};
        std::chrono::steady_clock::duration in_backoff{};
        auto last_sample = start;
        auto next_print = start;
        fmt::print("{:>6}  {:>11}  {:>9}  {:>13}  {:>7}  {:<22}  {:>8}  {:>5}\n", "time",
                   "in flight", "throttled", "bytes", "waiters", "backoff", "done", "429s");
        int alive = static_cast<int>(kids.size());
        while (alive > 0) {
            std::this_thread::sleep_for(10ms);
            const auto now = std::chrono::steady_clock::now();
            const lim::DispatchSnapshot s = d.snapshot();
            if (s.backoff_active) in_backoff += now - last_sample;
            last_sample = now;
            if (now >= limit) g_shared->stop = 1;
            while (alive > 0 && ::waitpid(-1, nullptr, WNOHANG) > 0)
                --alive;
            if (now < next_print && alive > 0) continue;
            next_print += 500ms;
            long too_many = 0;
            for (int w = 0; w < cfg.workers; ++w)
                too_many += g_shared->workers[w].too_many.load();
            const std::string backoff =
                s.backoff_active
                    ? fmt::format(
                          "ACTIVE {:.1f}s+{:.1f}s",
                          std::chrono::duration<double>(s.backoff_remaining).count(),
                          std::chrono::duration<double>(s.throttle_remaining - s.backoff_remaining)
                              .count())
                    : std::string("-");
            fmt::print(
                "{:>5.1f}s  {:>5}/{:<5}  {:>4}/{:<4}  {:>6}/{:<6}  {:>7}  {:<22}  {:>8}  {:>5}\n",
                std::chrono::duration<double>(now - start).count(), s.in_flight, s.concurrency,
                s.throttled_in_flight, s.throttled_concurrency,
                human_bytes(static_cast<double>(s.bytes_in_flight)),
                human_bytes(static_cast<double>(s.byte_budget)), s.waiters, backoff,
                g_shared->completed.load(), too_many);
            std::fflush(stdout);
        }
        const double elapsed =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

        // Summary.
        fmt::print("\n{:>6}  {:>8}  {:>9}  {:>7}  {:>6}  {:>15}\n", "worker", "pid", "requests",
                   "ok", "429s", "under backoff");
        long requests = 0, ok = 0, too_many = 0, throttled = 0;
        for (int w = 0; w < cfg.workers; ++w) {
            const WorkerStats& ws = g_shared->workers[w];
            fmt::print("{:>6}  {:>8}  {:>9}  {:>7}  {:>6}  {:>15}\n", w, ws.pid.load(),
                       ws.requests.load(), ws.ok.load(), ws.too_many.load(), ws.throttled.load());
            requests += ws.requests.load();
            ok += ws.ok.load();
            too_many += ws.too_many.load();
            throttled += ws.throttled.load();
        }
        fmt::print("{:>6}  {:>8}  {:>9}  {:>7}  {:>6}  {:>15}\n\n", "total", "", requests, ok,
                   too_many, throttled);
        const lim::DispatchSnapshot end = d.snapshot();
        fmt::print("  requests sent        {} ({} answered 429, {} sent under backoff)\n", requests,
                   too_many, throttled);
        fmt::print("  peak concurrency     {} at the API (Dispatch concurrency {}, throttled {})\n",
                   g_shared->peak_active.load(), cfg.concurrency, cfg.throttled_concurrency);
        fmt::print("  peak bytes           {} in flight as charged (budget {})\n",
                   human_bytes(static_cast<double>(g_shared->peak_bytes.load())),
                   human_bytes(static_cast<double>(cfg.byte_budget)));
        fmt::print("  time in backoff      {:.1f} s of {:.1f} s\n",
                   std::chrono::duration<double>(in_backoff).count(), elapsed);
        fmt::print("  at the end           {} in flight, {} bytes, {} waiting\n", end.in_flight,
                   end.bytes_in_flight, end.waiters);
        const bool removed = lim::Segment::remove(cfg.segment);
        fmt::print("  segment '{}' {}\n", cfg.segment, removed ? "removed" : "was already gone");
        return g_shared->stop.load() != 0 && ok < cfg.requests ? 130 : 0;
    } catch (const lim::Error& e) {
        fmt::print(stderr, "lim-demo: {}\n", e.what());
        try {
            lim::Segment::remove(cfg.segment);
        } catch (...) {
        }
        return 1;
    }
}
