// Turning snapshots into what limctl prints: aligned text for people, JSON for programs (its shape
// is documented in docs/limctl.md and kept stable), Prometheus text exposition for scrapers.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

#include "inspect/snapshot.hpp"

namespace limctl {

// The segment header line and one line per record, per layer (limctl show <segment>).
std::string render_overview(const lim::detail::SegmentSnapshot& s);
// Everything about the records named `key` (limctl show <segment> <key>).
std::string render_record_detail(const lim::detail::SegmentSnapshot& s, const std::string& key);
// The process table.
std::string render_processes(const lim::detail::SegmentSnapshot& s);

nlohmann::json to_json(const lim::SegmentInfo& info);
nlohmann::json to_json(const lim::detail::RecordSnapshot& r);
nlohmann::json to_json(const lim::detail::SegmentSnapshot& s);

// Prometheus text exposition format 0.0.4 of the whole segment.
std::string render_prometheus(const lim::detail::SegmentSnapshot& s);
// A sample's value as that format writes it: +Inf, -Inf and NaN spelt so, other values as
// format_amount (whole numbers bare, others to 4 decimals).
std::string prometheus_value(double value);

// "3 / 8" with units where they help ("1.2 MiB / 4.8 MiB" for bytes).
std::string format_layer(const lim::detail::Quantity& q);

}  // namespace limctl
