// limctl watch: a live view of a segment, refreshed in place, until 'q' or Ctrl-C.
#include <poll.h>
#include <termios.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <map>
#include <memory>
#include <string>

#include "commands.hpp"
#include "common.hpp"
#include "feeder_view.hpp"
#include "inspect/snapshot.hpp"
#include "render.hpp"

namespace limctl {
namespace {

std::atomic<bool> g_quit{false};
void on_signal(int) {
    g_quit.store(true);
}

// Puts the terminal in the state a full-screen view needs and puts it back, whatever way the view
// ends (q, Ctrl-C, SIGTERM, an exception).
class Screen {
  public:
    explicit Screen(bool tty) : tty_(tty) {
        if (!tty_) return;
        if (::tcgetattr(STDIN_FILENO, &saved_) == 0) {
            termios raw = saved_;
            raw.c_lflag &= ~static_cast<tcflag_t>(ICANON | ECHO);
            raw.c_cc[VMIN] = 0;
            raw.c_cc[VTIME] = 0;
            restore_termios_ = ::tcsetattr(STDIN_FILENO, TCSANOW, &raw) == 0;
        }
        fmt::print("\x1b[?1049h\x1b[?25l");  // alternate screen, hide cursor
        std::fflush(stdout);
    }
    ~Screen() {
        if (!tty_) return;
        fmt::print("\x1b[?25h\x1b[?1049l");  // show cursor, leave alternate screen
        std::fflush(stdout);
        if (restore_termios_) ::tcsetattr(STDIN_FILENO, TCSANOW, &saved_);
    }
    Screen(const Screen&) = delete;
    Screen& operator=(const Screen&) = delete;

  private:
    bool tty_;
    bool restore_termios_ = false;
    termios saved_{};
};

std::string frame(const lim::detail::SegmentSnapshot& s, const std::map<std::string, double>& rates,
                  std::chrono::nanoseconds interval) {
    std::string out =
        fmt::format("lim watch: {}   {} live processes, {} limiters   every {}   (q to quit)\n\n",
                    s.info.name, s.info.processes, s.info.limiters, format_duration(interval));
    Table t({"KEY", "KIND", "LAYER", "", "IN USE>", "ADMITTED/S>", "WAITERS>", "STATE"});
    for (const auto& r : s.records) {
        std::string state;
        for (const auto& v : r.values) {
            if (!state.empty()) state += "  ";
            state += v.name + " " + format_layer(v);
        }
        const auto rate = rates.find(r.kind + "/" + r.key);
        const std::string rate_text =
            rate == rates.end() ? "-" : fmt::format("{:.1f}", rate->second);
        bool first = true;
        for (const auto& q : r.layers) {
            t.add({first ? r.key : "", first ? (r.flavor.empty() ? r.kind : r.flavor) : "",
                   q.label.empty() ? q.name : q.label,
                   q.capacity ? bar(q.value, *q.capacity, 20) : "", format_layer(q),
                   first ? rate_text : "", first ? std::to_string(r.waiters) : "",
                   first ? state : ""});
            first = false;
        }
        if (first) t.add({r.key, r.kind, "-", "", "", rate_text, std::to_string(r.waiters), state});
    }
    out += t.render();
    // A global rate's lease, as show ends with it (issue 12: held, expiry, last Redis contact).
    if (const auto leases = feeder_leases(s); !leases.empty()) {
        out += "\n" + render_feeder_leases(leases);
    }
    return out;
}

// One frame of `watch --json`: show --json's document on one line, each record with its
// admissions per second since the previous frame (absent in the first).
std::string json_frame(const lim::detail::SegmentSnapshot& s,
                       const std::map<std::string, double>& rates) {
    nlohmann::json j = segment_json(s);
    auto& records = j["records"];  // in the order of s.records; keys there are escaped
    for (std::size_t i = 0; i < s.records.size() && i < records.size(); ++i) {
        const auto rate = rates.find(s.records[i].kind + "/" + s.records[i].key);
        if (rate != rates.end()) records[i]["admitted_per_second"] = rate->second;
    }
    return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

int run_watch(const std::string& segment, std::chrono::nanoseconds interval, int iterations,
              bool json) {
    (void)open_read_only(segment);  // a segment that cannot be read fails before the screen opens
    // --json prints one JSON document per line (no screen handling), for scripts and pipes.
    const bool tty = !json && ::isatty(STDOUT_FILENO) && ::isatty(STDIN_FILENO);
    g_quit.store(false);
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
    Screen screen(tty);
    std::map<std::string, std::uint64_t> last_admitted;
    lim::TimePoint last = lim::Clock::now();
    for (int n = 0; !g_quit.load() && (iterations <= 0 || n < iterations); ++n) {
        const lim::TimePoint now = lim::Clock::now();
        // Each frame reads a fresh private copy of the segment: what it shows is current, and a
        // segment truncated or replaced meanwhile is an error, never SIGBUS.
        const auto s = lim::detail::snapshot_segment(*open_read_only(segment), now);
        std::map<std::string, double> rates;
        const double secs = std::chrono::duration<double>(now - last).count();
        for (const auto& r : s.records) {
            const std::string id = r.kind + "/" + r.key;
            if (auto it = last_admitted.find(id); it != last_admitted.end() && secs > 0) {
                rates[id] = static_cast<double>(r.admitted_total - it->second) / secs;
            }
            last_admitted[id] = r.admitted_total;
        }
        last = now;
        if (json) {
            fmt::print("{}", json_frame(s, rates));
        } else {
            fmt::print("{}{}", tty ? "\x1b[H\x1b[2J" : (n > 0 ? "\n" : ""),
                       frame(s, rates, interval));
        }
        std::fflush(stdout);
        if (iterations > 0 && n + 1 >= iterations) break;
        // Sleep until the next frame, waking for a key press (when there is a keyboard: a
        // redirected stdin at EOF would otherwise end every sleep at once) or a signal.
        // Polls in steps of at most a minute (an int of milliseconds cannot hold every
        // interval parse_duration accepts).
        bool quit = false;
        const auto until = std::chrono::steady_clock::now() + interval;
        for (auto left = interval; !quit && !g_quit.load() && left > decltype(left)::zero();
             left = until - std::chrono::steady_clock::now()) {
            pollfd in{STDIN_FILENO, POLLIN, 0};
            const auto step = std::min<std::chrono::nanoseconds>(left, std::chrono::minutes{1});
            const int ms =
                static_cast<int>(std::chrono::ceil<std::chrono::milliseconds>(step).count());
            if (::poll(&in, tty ? 1 : 0, ms) > 0 && (in.revents & POLLIN)) {
                char c = 0;
                if (::read(STDIN_FILENO, &c, 1) == 1 && (c == 'q' || c == 'Q' || c == 3)) {
                    quit = true;
                }
            }
        }
        if (quit) break;
    }
    std::signal(SIGINT, SIG_DFL);
    std::signal(SIGTERM, SIG_DFL);
    return kExitOk;
}

}  // namespace

void add_watch_command(CLI::App& app, Action& action) {
    struct Args {
        std::string segment;
        std::string interval = "1s";
        int iterations = 0;
        bool json = false;
    };
    auto a = std::make_shared<Args>();
    auto* watch = app.add_subcommand("watch", "Live view of a segment (q or Ctrl-C to quit)");
    watch->add_option("segment", a->segment, "Segment name")->required();
    watch->add_option("-i,--interval", a->interval, "Refresh interval (default 1s)");
    watch->add_option("-n,--iterations", a->iterations, "Stop after this many frames (0: until q)");
    watch->add_flag("--json", a->json,
                    "Print each frame as one line of JSON (show --json's shape)");
    watch->callback([&action, a] {
        action = [a] {
            const auto interval = parse_duration(a->interval);
            if (interval < std::chrono::milliseconds{50})
                throw UsageError("--interval must be at least 50ms");
            return run_watch(a->segment, interval, a->iterations, a->json);
        };
    });
}

}  // namespace limctl
