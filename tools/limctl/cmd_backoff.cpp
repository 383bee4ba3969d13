// limctl set-backoff <segment> <key> <duration>: make a BackoffWindow (and so every Dispatch that
// uses it) back off now, as a worker does on a 429; --clear ends a backoff early.
#include <fmt/format.h>

#include <memory>
#include <optional>
#include <string>

#include "../feeder/status.hpp"
#include "commands.hpp"
#include "common.hpp"
#include "inspect/snapshot.hpp"
#include "lim/backoff_window.hpp"
#include "lim/error.hpp"
#include "shm/records.hpp"

namespace limctl {
namespace {

// Whether `key` is one of lim-feeder's status records (status.hpp) of a record `K` that exists:
// feeder.K.lease or feeder.K.contact. They are BackoffWindows only as a carrier; a deadline set on
// one would make `limctl leases` show a lease that is not there.
bool is_feeder_status(const lim::detail::SegmentState& state, const std::string& key) {
    constexpr std::string_view kPrefix = "feeder.";
    if (key.rfind(kPrefix, 0) != 0) return false;
    for (const std::string_view suffix : {".lease", ".contact"}) {
        if (key.size() <= kPrefix.size() + suffix.size() ||
            key.compare(key.size() - suffix.size(), suffix.size(), suffix) != 0) {
            continue;
        }
        const std::string rate =
            key.substr(kPrefix.size(), key.size() - kPrefix.size() - suffix.size());
        if (lim::detail::find_record(state, lim::detail::RecordKind::limiter, rate)) return true;
    }
    return false;
}

// The key of the BackoffWindow that the Dispatch `key` uses, if there is such a Dispatch.
std::optional<std::string> dispatch_window(const lim::detail::SegmentState& state,
                                           const std::string& key) {
    if (!lim::detail::find_record(state, lim::detail::RecordKind::dispatch, key)) {
        return std::nullopt;
    }
    const auto s = lim::detail::snapshot_segment(state, lim::Clock::now());
    for (const auto& r : s.records) {
        if (r.kind != "dispatch" || r.key != key) continue;
        for (const auto& [name, value] : r.config) {
            if (name == "limiter" &&
                lim::detail::find_record(state, lim::detail::RecordKind::backoff_window, value)) {
                return value;
            }
        }
    }
    return std::nullopt;
}

int run_set_backoff(const std::string& segment, const std::string& asked,
                    const std::string& duration, bool clear) {
    if (!clear && duration.empty()) throw UsageError("set-backoff needs a duration (or --clear)");
    const auto d = clear ? std::chrono::nanoseconds{0} : parse_duration(duration);
    lim::Segment seg = open_read_write(segment);
    std::string key = asked;
    // for_key would create a window that nobody uses: an operator's typo must not. A Dispatch's
    // key names the window that Dispatch backs off with (`limiter`), whatever that one's key.
    if (!lim::detail::find_record(*seg.state(), lim::detail::RecordKind::backoff_window, key)) {
        const auto window = dispatch_window(*seg.state(), key);
        if (!window) {
            throw lim::Error(lim::Errc::not_found,
                             fmt::format("segment '{}' has no backoff window or dispatch '{}' "
                                         "(limctl show {} lists them)",
                                         segment, key, segment));
        }
        key = *window;
    }
    const std::string via = key == asked ? "" : fmt::format(" (dispatch '{}')", asked);
    if (is_feeder_status(*seg.state(), key)) {
        throw lim::Error(lim::Errc::invalid_argument,
                         fmt::format("'{}' in segment '{}' is lim-feeder's status record, not a "
                                     "backoff: set the global backoff's own key (limctl leases {} "
                                     "shows the leases)",
                                     key, segment, segment));
    }
    auto window = lim::BackoffWindow::for_key(seg, key);
    if (clear) {
        window.clear();
        fmt::print("segment {}: backoff '{}'{} cleared\n", segment, key, via);
        return kExitOk;
    }
    window.set(d);
    const auto remaining = window.remaining();
    fmt::print("segment {}: backoff '{}'{} active for {}{}\n", segment, key, via,
               format_duration(remaining),
               remaining > d + std::chrono::milliseconds{1}
                   ? " (an existing, later deadline was kept: set never shortens a backoff)"
                   : "");
    return kExitOk;
}

}  // namespace

void add_backoff_command(CLI::App& app, Action& action) {
    struct Args {
        std::string segment;
        std::string key;
        std::string duration;
        bool clear = false;
    };
    auto a = std::make_shared<Args>();
    auto* cmd = app.add_subcommand(
        "set-backoff",
        "Make a backoff window active for a duration, as a 429 would (or --clear it)");
    cmd->add_option("segment", a->segment, "Segment name")->required();
    cmd->add_option("key", a->key, "Backoff window key (a Dispatch's limiter)")->required();
    cmd->add_option("duration", a->duration, "How long: 500ms, 10s, 2m");
    cmd->add_flag("--clear", a->clear, "End the backoff now instead");
    cmd->callback([&action, a] {
        action = [a] { return run_set_backoff(a->segment, a->key, a->duration, a->clear); };
    });
}

}  // namespace limctl
