#include "inspect/snapshot.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "shm/layout.hpp"
#include "shm/names.hpp"
#include "shm/process_identity.hpp"
#include "shm/process_table.hpp"
#include "shm/records.hpp"

namespace lim::detail {

void inspect_semaphore(const SegmentState&, std::uint32_t, TimePoint, RecordSnapshot&);
void inspect_weighted_semaphore(const SegmentState&, std::uint32_t, TimePoint, RecordSnapshot&);
void inspect_backoff_window(const SegmentState&, std::uint32_t, TimePoint, RecordSnapshot&);
void inspect_dispatch(const SegmentState&, std::uint32_t, TimePoint, RecordSnapshot&);
void inspect_limiter(const SegmentState&, std::uint32_t, TimePoint, RecordSnapshot&);

namespace {

std::string slot_state_string(SlotState st) {
    switch (st) {
        case SlotState::free:
            return "free";
        case SlotState::claiming:
            return "claiming";
        case SlotState::live:
            return "live";
        case SlotState::retired:
            return "retired";
        case SlotState::parcel:
            return "parcel";
        case SlotState::taken:
            return "taken";
    }
    return "unknown";
}

std::string key_of(const SegmentState& state, std::uint32_t record1) {
    if (record1 == 0 || record1 - 1 >= state.records_used()) return {};
    return printable(record_key(state.record(record1 - 1)));
}

}  // namespace

InspectFn kind_inspector(std::uint16_t kind) noexcept {
    switch (static_cast<RecordKind>(kind)) {
        case RecordKind::semaphore:
            return inspect_semaphore;
        case RecordKind::weighted_semaphore:
            return inspect_weighted_semaphore;
        case RecordKind::backoff_window:
            return inspect_backoff_window;
        case RecordKind::dispatch:
            return inspect_dispatch;
        case RecordKind::limiter:
            return inspect_limiter;
        default:
            return nullptr;
    }
}

std::string format_amount(double value) {
    if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
    if (value == std::floor(value) && std::abs(value) < 1e15) return fmt::format("{:.0f}", value);
    return fmt::format("{:.4f}", value);
}

RecordSnapshot snapshot_record(const SegmentState& state, std::uint32_t record, TimePoint now) {
    const Record& r = state.record(record);
    RecordSnapshot out;
    out.index = record;
    out.kind = std::string(kind_name(static_cast<RecordKind>(r.header.kind)));
    // A valid key is printable ASCII; a damaged one is shown with its other bytes as \xNN, so
    // that no renderer can be made to print terminal escapes or invalid UTF-8.
    out.key = printable(record_key(r));
    out.created_wall_ns = r.header.created_wall_ns;
    out.creator_pid = r.header.creator_pid;
    out.admitted_total = r.header.admitted_retired.load(std::memory_order_relaxed);
    if (InspectFn fn = kind_inspector(r.header.kind)) fn(state, record, now, out);
    if (out.layer_scale.size() < out.layer_names.size())
        out.layer_scale.resize(out.layer_names.size(), 1.0);

    for (std::uint32_t i = 0; i < state.geometry().max_processes; ++i) {
        const SlotHeader& slot = state.slot(i);
        const std::uint64_t w = slot.owner.load(std::memory_order_acquire);
        const SlotState st = SlotOwner::state(w);
        if (st == SlotState::free) continue;
        const LedgerEntry& e = state.ledger(i, record);
        out.admitted_total += e.admitted.load(std::memory_order_relaxed);
        HolderRow row;
        bool holds = false;
        for (std::size_t l = 0; l < out.layer_names.size() && l < 3; ++l) {
            const std::int64_t h = holding(e, static_cast<int>(l));
            holds = holds || h != 0;
            row.held.push_back(static_cast<double>(h) * out.layer_scale[l]);
        }
        if (!holds) continue;
        row.pid = static_cast<int>(SlotOwner::pid(w));
        row.tid = slot.tid.load(std::memory_order_relaxed);
        row.state = slot_state_string(st);
        row.alive = slot_owner_alive(state, i, w);
        out.holders.push_back(std::move(row));
    }
    std::sort(out.holders.begin(), out.holders.end(), [](const HolderRow& a, const HolderRow& b) {
        return std::tie(a.pid, a.tid) < std::tie(b.pid, b.tid);
    });
    return out;
}

SegmentSnapshot snapshot_segment(const SegmentState& state, TimePoint now) {
    SegmentSnapshot out;
    out.info = state.info();
    out.reaps_total = state.header().reaps_total.load(std::memory_order_relaxed);
    const std::uint32_t used = state.records_used();
    for (std::uint32_t r = 0; r < used; ++r) {
        if (state.record(r).header.state.load(std::memory_order_acquire) != kRecordReady) continue;
        out.records.push_back(snapshot_record(state, r, now));
    }
    for (std::uint32_t i = 0; i < state.geometry().max_processes; ++i) {
        const SlotHeader& slot = state.slot(i);
        const std::uint64_t w = slot.owner.load(std::memory_order_acquire);
        const SlotState st = SlotOwner::state(w);
        if (st == SlotState::free) continue;
        ProcessRow row;
        row.slot = i;
        row.pid = static_cast<int>(SlotOwner::pid(w));
        row.tid = slot.tid.load(std::memory_order_relaxed);
        row.state = slot_state_string(st);
        row.alive = slot_owner_alive(state, i, w);
        row.attached_wall_ns = slot.attached_wall_ns.load(std::memory_order_relaxed);
        // A token bucket's take is tagged (layout.hpp, SlotHeader::pending): the same record.
        row.pending_key =
            key_of(state, slot.pending.load(std::memory_order_relaxed) & ~kBucketTakeTag);
        row.waiting_key = key_of(state, slot.waiting_record.load(std::memory_order_relaxed));
        out.processes.push_back(std::move(row));
    }
    std::sort(out.processes.begin(), out.processes.end(),
              [](const ProcessRow& a, const ProcessRow& b) {
                  return std::tie(a.pid, a.tid, a.slot) < std::tie(b.pid, b.tid, b.slot);
              });
    return out;
}

}  // namespace lim::detail
