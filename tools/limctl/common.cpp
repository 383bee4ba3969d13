#include "common.hpp"

#include <fmt/chrono.h>
#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>

#include "lim/error.hpp"

namespace limctl {

std::shared_ptr<lim::detail::SegmentState> open_read_only(std::string_view name) {
    return lim::detail::SegmentState::attach(name, lim::SegmentOptions{.reap_on_attach = false},
                                             false, lim::detail::Access::read_only);
}

lim::Segment open_read_write(std::string_view name) {
    // Segment has no public constructor from a state; open() with reap_on_attach off is what we
    // need, through the same path the library uses.
    // An operator repairs segments that services own: a group mode here accepts a segment owned
    // by another user (the operator named it), while one writable by every user is still refused
    // (docs/security.md).
    return lim::Segment::open(name, lim::SegmentOptions{.mode = 0660, .reap_on_attach = false});
}

std::chrono::nanoseconds parse_duration(std::string_view text) {
    std::size_t i = 0;
    while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.'))
        ++i;
    const std::string number(text.substr(0, i));
    const std::string_view unit = text.substr(i);
    double value = 0;
    try {
        std::size_t used = 0;
        value = std::stod(number, &used);
        if (used != number.size()) throw std::invalid_argument("trailing");
    } catch (const std::exception&) {
        throw UsageError(fmt::format("'{}' is not a duration (try 500ms, 10s, 2m)", text));
    }
    double scale = 1e9;
    if (unit == "ns") {
        scale = 1;
    } else if (unit == "us") {
        scale = 1e3;
    } else if (unit == "ms") {
        scale = 1e6;
    } else if (unit.empty() || unit == "s") {
        scale = 1e9;
    } else if (unit == "m" || unit == "min") {
        scale = 60e9;
    } else if (unit == "h") {
        scale = 3600e9;
    } else {
        throw UsageError(fmt::format("'{}': unknown unit '{}' (ns, us, ms, s, m, h)", text, unit));
    }
    const double ns = value * scale;
    if (!std::isfinite(ns) || ns < 0 || ns > 9e18) {
        throw UsageError(fmt::format("'{}' is out of range", text));
    }
    return std::chrono::nanoseconds{static_cast<std::int64_t>(ns)};
}

std::string format_duration(std::chrono::nanoseconds d) {
    const double ns = static_cast<double>(d.count());
    if (ns >= 1e9) return fmt::format("{:.1f} s", ns / 1e9);
    if (ns >= 1e6) return fmt::format("{:.0f} ms", ns / 1e6);
    if (ns >= 1e3) return fmt::format("{:.0f} us", ns / 1e3);
    return fmt::format("{:.0f} ns", ns);
}

namespace {
std::tm utc(std::int64_t ns) {
    const std::time_t secs = static_cast<std::time_t>(ns / 1'000'000'000);
    std::tm tm{};
    ::gmtime_r(&secs, &tm);
    return tm;
}
}  // namespace

std::string format_wall_time(std::int64_t ns) {
    return fmt::format("{:%Y-%m-%d %H:%M:%S}", utc(ns));
}

std::string format_wall_time_iso(std::int64_t ns) {
    return fmt::format("{:%Y-%m-%dT%H:%M:%SZ}", utc(ns));
}

std::string format_bytes(double bytes) {
    const char* units[] = {"B", "KiB", "MiB", "GiB"};
    int u = 0;
    while (bytes >= 1024 && u < 3) {
        bytes /= 1024;
        ++u;
    }
    return u == 0 ? fmt::format("{:.0f} B", bytes) : fmt::format("{:.1f} {}", bytes, units[u]);
}

Table::Table(std::vector<std::string> headers) {
    for (std::string& h : headers) {
        const bool right = !h.empty() && h.back() == '>';
        if (right) h.pop_back();
        right_.push_back(right);
        headers_.push_back(std::move(h));
    }
}

void Table::add(std::vector<std::string> row) {
    row.resize(headers_.size());
    rows_.push_back(std::move(row));
}

std::string Table::render() const {
    std::vector<std::size_t> width(headers_.size());
    for (std::size_t c = 0; c < headers_.size(); ++c)
        width[c] = headers_[c].size();
    for (const auto& row : rows_) {
        for (std::size_t c = 0; c < row.size(); ++c)
            width[c] = std::max(width[c], row[c].size());
    }
    std::string out;
    auto line = [&](const std::vector<std::string>& cells) {
        std::string text;
        for (std::size_t c = 0; c < cells.size(); ++c) {
            if (c > 0) text += "  ";
            text += right_[c] ? fmt::format("{:>{}}", cells[c], width[c])
                              : fmt::format("{:<{}}", cells[c], width[c]);
        }
        while (!text.empty() && text.back() == ' ')
            text.pop_back();
        out += text + "\n";
    };
    line(headers_);
    for (const auto& row : rows_)
        line(row);
    return out;
}

std::string bar(double value, double capacity, int width) {
    const double fraction = capacity > 0 ? std::clamp(value / capacity, 0.0, 1.0) : 0.0;
    const int filled = static_cast<int>(std::lround(fraction * width));
    return "[" + std::string(static_cast<std::size_t>(filled), '#') +
           std::string(static_cast<std::size_t>(width - filled), '.') + "]";
}

}  // namespace limctl
