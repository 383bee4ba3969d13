#include "render.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <map>

#include "common.hpp"

namespace limctl {

using lim::detail::format_amount;
using lim::detail::Quantity;
using lim::detail::RecordSnapshot;
using lim::detail::SegmentSnapshot;

namespace {

std::string format_value(const Quantity& q, double v) {
    if (q.unit == "bool") return v != 0 ? "yes" : "no";
    if (q.unit == "bytes") return format_bytes(v);
    if (q.unit == "seconds")
        return format_duration(std::chrono::nanoseconds{static_cast<std::int64_t>(v * 1e9)});
    return format_amount(v) + (q.unit.empty() ? "" : " " + q.unit);
}

std::string kind_label(const RecordSnapshot& r) {
    return r.flavor.empty() || r.flavor == r.kind ? r.kind : r.flavor;
}

// A number as JSON: an integer when it is one (8, not 8.0), else a double.
nlohmann::json json_number(double v) {
    if (std::isfinite(v) && v == std::floor(v) && std::abs(v) < 9e15)
        return static_cast<std::int64_t>(v);
    if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
    return v;
}

// A config value as JSON: a number when the text is one, else the text.
nlohmann::json config_value(const std::string& text) {
    double v = 0;
    const auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (ec == std::errc{} && p == text.data() + text.size()) return json_number(v);
    if (text == "true") return true;
    if (text == "false") return false;
    return text;
}

std::string holder_cells(const RecordSnapshot& r, const lim::detail::HolderRow& h) {
    std::string cells;
    for (std::size_t l = 0; l < h.held.size() && l < r.layer_names.size(); ++l) {
        if (h.held[l] == 0) continue;
        if (!cells.empty()) cells += ", ";
        cells += format_amount(h.held[l]) + " " + r.layer_names[l];
    }
    return cells;
}

}  // namespace

std::string format_layer(const Quantity& q) {
    if (!q.capacity) return format_value(q, q.value);
    return format_value(q, q.value) + " / " + format_value(q, *q.capacity);
}

std::string render_overview(const SegmentSnapshot& s) {
    std::string out = fmt::format(
        "segment {}: {} limiters (max {}), {} live processes, {} process slots, {}, layout {}, "
        "created {} UTC, {} processes reaped\n\n",
        s.info.name, s.info.limiters, s.info.max_limiters, s.info.processes, s.info.max_processes,
        format_bytes(static_cast<double>(s.info.size_bytes)), s.info.layout_version,
        format_wall_time(
            std::chrono::duration_cast<std::chrono::nanoseconds>(s.info.created.time_since_epoch())
                .count()),
        s.reaps_total);
    // Records counted in the header but not shown: being created right now, left half-made by a
    // creator that died, or with a damaged state word. Said, so a damaged table is not silent.
    if (s.info.limiters > s.records.size()) {
        out += fmt::format("{} of {} records not shown: being created, abandoned or damaged\n\n",
                           s.info.limiters - s.records.size(), s.info.limiters);
    }
    if (s.records.empty()) return out + "no limiters\n";
    Table t({"KEY", "KIND", "LAYER", "IN USE>", "", "WAITERS>", "ADMITTED>", "STATE"});
    for (const RecordSnapshot& r : s.records) {
        std::string state;
        for (const Quantity& v : r.values) {
            if (!state.empty()) state += ", ";
            state += v.name + " " + format_value(v, v.value);
        }
        if (r.frozen) state += state.empty() ? "recounting" : ", recounting";
        bool first = true;
        for (const Quantity& q : r.layers) {
            t.add({first ? r.key : "", first ? kind_label(r) : "",
                   q.label.empty() ? q.name : q.label, format_layer(q),
                   q.capacity ? bar(q.value, *q.capacity, 10) : "",
                   first ? std::to_string(r.waiters) : "",
                   first ? std::to_string(r.admitted_total) : "", first ? state : ""});
            first = false;
        }
        if (first) {
            t.add({r.key, kind_label(r), "-", "", "", std::to_string(r.waiters),
                   std::to_string(r.admitted_total), state});
        }
    }
    return out + t.render();
}

std::string render_record_detail(const SegmentSnapshot& s, const std::string& key) {
    std::string out;
    for (const RecordSnapshot& r : s.records) {
        if (r.key != key) continue;
        out += fmt::format("{} '{}' (record {}, created {} UTC by pid {})\n", kind_label(r), r.key,
                           r.index, format_wall_time(r.created_wall_ns), r.creator_pid);
        Table config({"CONFIG", "VALUE"});
        for (const auto& [k, v] : r.config)
            config.add({k, v});
        out += config.render();
        Table layers({"LAYER", "IN USE>", "CAPACITY>", ""});
        for (const Quantity& q : r.layers) {
            layers.add({q.label.empty() ? q.name : q.label, format_value(q, q.value),
                        q.capacity ? format_value(q, *q.capacity) : "-",
                        q.capacity ? bar(q.value, *q.capacity, 20) : ""});
        }
        for (const Quantity& v : r.values)
            layers.add({v.name, format_value(v, v.value), "", ""});
        out += "\n" + layers.render();
        out += fmt::format("\nwaiters {}, admitted {}{}\n", r.waiters, r.admitted_total,
                           r.frozen ? ", being recounted by a reaper" : "");
        Table holders({"PID>", "TID>", "SLOT", "ALIVE", "HOLDS"});
        for (const auto& h : r.holders) {
            holders.add({std::to_string(h.pid), std::to_string(h.tid), h.state,
                         h.alive ? "yes" : "DEAD (reap to recover)", holder_cells(r, h)});
        }
        out += holders.empty() ? "nobody holds anything\n" : "\n" + holders.render();
        out += "\n";
    }
    return out;
}

std::string render_processes(const SegmentSnapshot& s) {
    if (s.processes.empty()) return "no processes attached\n";
    Table t(
        {"SLOT>", "PID>", "TID>", "STATE", "ALIVE", "ATTACHED", "IN OPERATION ON", "SLEEPING ON"});
    for (const auto& p : s.processes) {
        t.add({std::to_string(p.slot), std::to_string(p.pid), std::to_string(p.tid), p.state,
               p.alive ? "yes" : "DEAD", format_wall_time(p.attached_wall_ns), p.pending_key,
               p.waiting_key});
    }
    return t.render();
}

nlohmann::json to_json(const lim::SegmentInfo& info) {
    return {{"name", info.name},
            {"size_bytes", info.size_bytes},
            {"layout_version", info.layout_version},
            {"max_limiters", info.max_limiters},
            {"max_processes", info.max_processes},
            {"limiters", info.limiters},
            {"processes", info.processes},
            {"created", format_wall_time_iso(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                                 info.created.time_since_epoch())
                                                 .count())}};
}

nlohmann::json to_json(const RecordSnapshot& r) {
    nlohmann::json config = nlohmann::json::object();
    for (const auto& [k, v] : r.config)
        config[k] = config_value(v);
    auto quantity = [](const Quantity& q) {
        nlohmann::json j{{"name", q.name}, {"unit", q.unit}, {"value", json_number(q.value)}};
        if (q.capacity) {
            j["capacity"] = json_number(*q.capacity);
            j["capacity_name"] = q.capacity_name;
        }
        return j;
    };
    nlohmann::json layers = nlohmann::json::array();
    for (const Quantity& q : r.layers)
        layers.push_back(quantity(q));
    nlohmann::json values = nlohmann::json::array();
    for (const Quantity& q : r.values)
        values.push_back(quantity(q));
    nlohmann::json holders = nlohmann::json::array();
    for (const auto& h : r.holders) {
        nlohmann::json held = nlohmann::json::object();
        for (std::size_t l = 0; l < h.held.size() && l < r.layer_names.size(); ++l)
            held[r.layer_names[l]] = json_number(h.held[l]);
        holders.push_back({{"pid", h.pid},
                           {"tid", h.tid},
                           {"state", h.state},
                           {"alive", h.alive},
                           {"held", held}});
    }
    return {{"key", r.key},
            {"kind", r.kind},
            {"flavor", r.flavor.empty() ? r.kind : r.flavor},
            {"index", r.index},
            {"created", format_wall_time_iso(r.created_wall_ns)},
            {"creator_pid", r.creator_pid},
            {"config", config},
            {"layers", layers},
            {"values", values},
            {"waiters", r.waiters},
            {"admitted_total", r.admitted_total},
            {"frozen", r.frozen},
            {"holders", holders}};
}

nlohmann::json to_json(const SegmentSnapshot& s) {
    nlohmann::json segment = to_json(s.info);
    segment["reaps_total"] = s.reaps_total;
    nlohmann::json records = nlohmann::json::array();
    for (const RecordSnapshot& r : s.records)
        records.push_back(to_json(r));
    nlohmann::json processes = nlohmann::json::array();
    for (const auto& p : s.processes) {
        processes.push_back({{"slot", p.slot},
                             {"pid", p.pid},
                             {"tid", p.tid},
                             {"state", p.state},
                             {"alive", p.alive},
                             {"attached", format_wall_time_iso(p.attached_wall_ns)},
                             {"in_operation_on", p.pending_key},
                             {"sleeping_on", p.waiting_key}});
    }
    return {{"segment", segment}, {"records", records}, {"processes", processes}};
}

namespace {

// Label values escape backslash, double quote and newline.
std::string label_value(const std::string& v) {
    std::string out;
    for (char c : v) {
        if (c == '\\' || c == '"') out += '\\';
        if (c == '\n') {
            out += "\\n";
            continue;
        }
        out += c;
    }
    return out;
}

std::string metric_name(const std::string& name, const std::string& unit) {
    if (unit.empty() || unit == "tokens" || unit == "bool") return "lim_" + name;
    if (name.size() > unit.size() &&
        name.compare(name.size() - unit.size(), unit.size(), unit) == 0) {
        return "lim_" + name;
    }
    return "lim_" + name + "_" + unit;
}

struct Family {
    std::string type;
    std::string help;
    std::vector<std::string> samples;
};

}  // namespace

std::string prometheus_value(double value) {
    if (std::isnan(value)) return "NaN";
    if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
    return format_amount(value);
}

std::string render_prometheus(const SegmentSnapshot& s) {
    std::map<std::string, Family> families;
    const std::string seg = label_value(s.info.name);
    auto sample = [&](const std::string& name, const std::string& type, const std::string& help,
                      const std::string& labels, double value) {
        Family& f = families[name];
        f.type = type;
        f.help = help;
        f.samples.push_back(fmt::format("{}{{{}}} {}", name, labels, prometheus_value(value)));
    };
    const std::string sl = fmt::format("segment=\"{}\"", seg);
    sample("lim_segment_size_bytes", "gauge", "Size of the shared-memory segment.", sl,
           static_cast<double>(s.info.size_bytes));
    sample("lim_segment_processes", "gauge", "Live processes attached to the segment.", sl,
           s.info.processes);
    sample("lim_segment_limiters", "gauge", "Limiter records in the segment.", sl, s.info.limiters);
    sample("lim_segment_reaped_processes_total", "counter",
           "Dead processes reaped over the segment's life.", sl,
           static_cast<double>(s.reaps_total));
    for (const RecordSnapshot& r : s.records) {
        const std::string labels = fmt::format("segment=\"{}\",key=\"{}\",kind=\"{}\"", seg,
                                               label_value(r.key), label_value(kind_label(r)));
        for (const Quantity& q : r.layers) {
            sample(metric_name(q.name, q.unit), "gauge", "In use now, per layer.", labels, q.value);
            if (q.capacity) {
                sample(metric_name(q.capacity_name, q.unit), "gauge",
                       "The limit a layer is held against.", labels, *q.capacity);
            }
        }
        for (const Quantity& q : r.values) {
            const bool counter = q.name.size() > 6 && q.name.substr(q.name.size() - 6) == "_total";
            sample(metric_name(q.name, q.unit), counter ? "counter" : "gauge",
                   counter ? "Events since the limiter was created." : "Limiter state.", labels,
                   q.value);
        }
        sample("lim_waiters", "gauge", "Threads sleeping on the limiter, in all processes.", labels,
               r.waiters);
        sample("lim_admitted_total", "counter",
               "Successful acquisitions since the limiter was created.", labels,
               static_cast<double>(r.admitted_total));
    }
    std::string out;
    for (const auto& [name, f] : families) {
        out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, f.help, name, f.type);
        for (const std::string& line : f.samples)
            out += line + "\n";
    }
    return out;
}

}  // namespace limctl
