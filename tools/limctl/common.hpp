// Pieces every limctl subcommand uses: opening a segment the way a command needs it, parsing
// durations, aligned tables, and the exit codes.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "lim/segment.hpp"
#include "shm/segment_state.hpp"

namespace limctl {

// Exit codes: 0 ok, 1 error (the operation failed), 2 usage (the command line was wrong).
inline constexpr int kExitOk = 0;
inline constexpr int kExitError = 1;
inline constexpr int kExitUsage = 2;

// A usage error detected after parsing (a bad duration, an unknown format): exit code 2.
struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Maps the segment read-only, without registering a process slot and without reaping: read
// commands can never change what they look at.
std::shared_ptr<lim::detail::SegmentState> open_read_only(std::string_view name);

// Attaches read-write without reaping on attach (repair commands decide what to change).
lim::Segment open_read_write(std::string_view name);

// "250ms", "10s", "1.5s", "2m", "1h", or a bare number of seconds. Throws UsageError.
std::chrono::nanoseconds parse_duration(std::string_view text);

// "1.5 s", "250 ms", "12 us": a duration as people read it.
std::string format_duration(std::chrono::nanoseconds d);

// "2026-11-23 10:04:05" in UTC, from nanoseconds since the epoch.
std::string format_wall_time(std::int64_t ns_since_epoch);
// "2026-11-23T10:04:05Z", for JSON.
std::string format_wall_time_iso(std::int64_t ns_since_epoch);

// "4.5 MiB"
std::string format_bytes(double bytes);

// A table printed with aligned columns. Columns whose header ends with '>' are right-aligned
// (the '>' is not printed).
class Table {
  public:
    explicit Table(std::vector<std::string> headers);
    void add(std::vector<std::string> row);
    std::string render() const;
    bool empty() const { return rows_.empty(); }

  private:
    std::vector<std::string> headers_;
    std::vector<bool> right_;
    std::vector<std::vector<std::string>> rows_;
};

// "[#####.....]" of `width` cells for value / capacity.
std::string bar(double value, double capacity, int width);

}  // namespace limctl
