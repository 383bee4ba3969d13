// A read-only picture of a segment for tools (limctl): the header, the process table and, per
// record, its configuration, every layer's use against its capacity, its other state (bucket,
// hopper, backoff), its sleepers and who holds what. Built from loads alone, so it works on a
// read-only mapping and never writes; values are read without stopping anyone, so a picture of a
// busy segment is consistent per word, not across words.
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lim/clock.hpp"
#include "shm/segment_state.hpp"
#include "sync/saturating.hpp"

namespace lim::detail {

// One number a record exposes. `name` is snake_case and, with `unit`, makes the Prometheus metric
// name (lim_<name>[_<unit>]). A layer also has a capacity, with its own name.
struct Quantity {
    std::string name;  // "in_use", "in_flight", "in_bucket", ...
    std::string unit;  // "", "bytes", "tokens", "seconds", "bool"
    double value = 0;
    std::optional<double> capacity;  // for layers: the limit it is held against
    std::string capacity_name;       // "capacity", "concurrency", "budget", ...
    std::string label;               // for people, when `name` alone is ambiguous

    // A layer: `value` in use against `capacity`.
    static Quantity layer(std::string name, double value, double capacity,
                          std::string capacity_name, std::string unit = {},
                          std::string label = {}) {
        Quantity q;
        q.name = std::move(name);
        q.unit = std::move(unit);
        q.value = value;
        q.capacity = capacity;
        q.capacity_name = std::move(capacity_name);
        q.label = std::move(label);
        return q;
    }
    // Any other state: a level, a flag, a remaining time, a count.
    static Quantity state(std::string name, double value, std::string unit = {}) {
        Quantity q;
        q.name = std::move(name);
        q.unit = std::move(unit);
        q.value = value;
        return q;
    }
};

struct HolderRow {
    int pid = 0;
    int tid = 0;
    std::string state;         // "live", "retired", "claiming"
    bool alive = true;         // false: dead, waiting to be reaped
    std::vector<double> held;  // per layer, in the layer's unit
};

struct RecordSnapshot {
    std::uint32_t index = 0;
    std::string kind;  // "semaphore", "weighted_semaphore", "limiter", "backoff_window", "dispatch"
    std::string flavor;  // for limiters: "limiter", "token_bucket", "throttle", ...
    std::string key;
    std::int64_t created_wall_ns = 0;
    int creator_pid = 0;
    std::vector<std::pair<std::string, std::string>> config;  // as created, for display
    std::vector<std::string> layer_names;                     // what held[] means
    std::vector<double> layer_scale;  // held[] units -> the layer's unit (1e-4 for token pieces)
    std::vector<Quantity> layers;     // in use vs capacity
    std::vector<Quantity> values;     // other state
    std::uint32_t waiters = 0;
    std::uint64_t admitted_total = 0;
    bool frozen = false;  // a reaper is recounting it right now
    std::vector<HolderRow> holders;
};

struct ProcessRow {
    std::uint32_t slot = 0;
    int pid = 0;
    int tid = 0;
    std::string state;
    bool alive = true;
    std::int64_t attached_wall_ns = 0;
    std::string pending_key;  // the record it is mid-operation on, if any
    std::string waiting_key;  // the record it sleeps on, if any
};

struct SegmentSnapshot {
    SegmentInfo info;
    std::uint64_t reaps_total = 0;
    std::vector<RecordSnapshot> records;
    std::vector<ProcessRow> processes;
};

// Fills the family-specific parts of `out` (config, layer_names, layers, values, waiters, frozen)
// for one record. Each family provides one; unknown kinds get none.
using InspectFn = void (*)(const SegmentState& state, std::uint32_t record, TimePoint now,
                           RecordSnapshot& out);
InspectFn kind_inspector(std::uint16_t kind) noexcept;

RecordSnapshot snapshot_record(const SegmentState& state, std::uint32_t record, TimePoint now);
SegmentSnapshot snapshot_segment(const SegmentState& state, TimePoint now);

// The CLOCK_MONOTONIC time as seen in a snapshot, for families that read deadlines.
// In double, so that no pair of values read from a damaged segment can overflow.
inline double seconds_between(std::int64_t from_ns, std::int64_t to_ns) {
    return to_ns > from_ns ? (static_cast<double>(to_ns) - static_cast<double>(from_ns)) / 1e9
                           : 0.0;
}

// Formats a number as people read it: integers without a fraction, others to 4 decimals.
std::string format_amount(double value);

}  // namespace lim::detail
