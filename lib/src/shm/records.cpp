#include "shm/records.hpp"

#include <unistd.h>

#include <fmt/format.h>

#include <chrono>
#include <cstring>

#include "lim/detail/record_ref.hpp"
#include "lim/error.hpp"
#include "shm/file_lock.hpp"
#include "shm/names.hpp"

namespace lim::detail {
namespace {

bool matches(const Record& r, RecordKind kind, std::string_view key) noexcept {
    return r.header.state.load(std::memory_order_acquire) == kRecordReady &&
           r.header.kind == static_cast<std::uint16_t>(kind) && record_key(r) == key;
}

void link_into_index(SegmentState& state, std::uint64_t hash, std::uint32_t record) {
    const std::uint32_t mask = state.geometry().index_capacity - 1;
    for (std::uint32_t probe = 0; probe <= mask; ++probe) {
        auto& slot = state.index_entry((static_cast<std::uint32_t>(hash) + probe) & mask);
        if (slot.load(std::memory_order_relaxed) == 0) {
            slot.store(IndexEntry::make(hash, record), std::memory_order_release);
            return;
        }
    }
    // Unreachable while index_capacity >= 2 * max_limiters; a corrupt index could get here.
    throw Error(Errc::corrupt_segment,
                fmt::format("segment '{}': the record index has no free entry", state.name()));
}

bool is_linked(const SegmentState& state, std::uint32_t record) noexcept {
    const std::uint32_t cap = state.geometry().index_capacity;
    for (std::uint32_t i = 0; i < cap; ++i) {
        const std::uint64_t e = state.index_entry(i).load(std::memory_order_acquire);
        if (e != 0 && IndexEntry::record(e) == record) return true;
    }
    return false;
}

}  // namespace

std::uint64_t record_hash(RecordKind kind, std::string_view key) noexcept {
    std::uint64_t h = 0xcbf29ce484222325ULL;
    const auto k = static_cast<std::uint16_t>(kind);
    for (unsigned char c :
         {static_cast<unsigned char>(k & 0xFF), static_cast<unsigned char>(k >> 8)}) {
        h = (h ^ c) * 0x100000001b3ULL;
    }
    for (unsigned char c : key)
        h = (h ^ c) * 0x100000001b3ULL;
    return h;
}

std::string_view kind_name(RecordKind kind) noexcept {
    switch (kind) {
        case RecordKind::limiter:
            return "limiter";
        case RecordKind::semaphore:
            return "semaphore";
        case RecordKind::weighted_semaphore:
            return "weighted_semaphore";
        case RecordKind::backoff_window:
            return "backoff_window";
        case RecordKind::dispatch:
            return "dispatch";
        case RecordKind::none:
            break;
    }
    return "unknown";
}

std::string_view RecordRef::key() const noexcept {
    return record_key(*record);
}

std::string_view record_key(const Record& record) noexcept {
    const std::size_t n = std::min<std::size_t>(record.header.key_length, kMaxKeyLength);
    return std::string_view(record.header.key, n);
}

bool same_config(const Record& record, const void* config, std::size_t size) noexcept {
    if (size > kRecordConfigSize) return false;
    if (std::memcmp(record.config, config, size) != 0) return false;
    for (std::size_t i = size; i < kRecordConfigSize; ++i) {
        if (record.config[i] != std::byte{0}) return false;
    }
    return true;
}

std::optional<std::uint32_t> find_record(const SegmentState& state, RecordKind kind,
                                         std::string_view key) noexcept {
    const std::uint64_t hash = record_hash(kind, key);
    const std::uint32_t mask = state.geometry().index_capacity - 1;
    const std::uint32_t max = state.geometry().max_limiters;
    for (std::uint32_t probe = 0; probe <= mask; ++probe) {
        const std::uint64_t e = state.index_entry((static_cast<std::uint32_t>(hash) + probe) & mask)
                                    .load(std::memory_order_acquire);
        if (e == 0) return std::nullopt;
        if (IndexEntry::tag(e) != static_cast<std::uint32_t>(hash >> 32)) continue;
        const std::uint32_t r = IndexEntry::record(e);
        if (r >= max) continue;  // corrupt entry: never follow it
        if (matches(state.record(r), kind, key)) return r;
    }
    return std::nullopt;
}

OpenedRecord find_or_create_record(SegmentState& state, const RecordSpec& spec,
                                   const std::function<void(Record&)>& init_body) {
    validate_key(spec.key);
    if (auto found = find_record(state, spec.kind, spec.key)) {
        return {*found, &state.record(*found), false};
    }
    if (state.read_only()) {
        throw Error(Errc::permission_denied,
                    fmt::format("segment '{}' is open read-only; cannot create '{}'", state.name(),
                                spec.key));
    }
    // Creation is rare and must be exclusive (two creators of one key must not both succeed),
    // so it takes a lock; the kernel drops it if the creator dies. A creator that is stopped
    // keeps it: we wait kLockWaitTimeout at most, then refuse with Error(busy), nothing created.
    FileLock lock = FileLock::lock_or_busy(state.fd(), LockByte::records, state.name(),
                                           fmt::format("create '{}'", spec.key));
    if (auto found = find_record(state, spec.kind, spec.key)) {
        return {*found, &state.record(*found), false};
    }
    SegmentHeader& h = state.header();
    std::uint32_t used = state.records_used();
    // Creations are serialised by the lock, so only the last record can be one that a creator
    // left unfinished when it died: finish linking it, or take its place.
    if (used > 0) {
        Record& last = state.record(used - 1);
        if (last.header.state.load(std::memory_order_acquire) != kRecordReady) {
            --used;
        } else if (!is_linked(state, used - 1)) {
            link_into_index(state, last.header.key_hash, used - 1);
        }
    }
    if (used >= state.geometry().max_limiters) {
        throw Error(Errc::table_full,
                    fmt::format("segment '{}' holds {} limiters, its maximum; cannot create '{}' "
                                "(create the segment with a larger max_limiters)",
                                state.name(), used, spec.key));
    }
    const std::uint32_t index = used;
    Record& r = state.record(index);
    std::memset(static_cast<void*>(&r), 0, sizeof(Record));
    h.records_used.store(index + 1, std::memory_order_release);

    r.header.kind = static_cast<std::uint16_t>(spec.kind);
    r.header.flavor = spec.flavor;
    r.header.key_length = static_cast<std::uint32_t>(spec.key.size());
    r.header.key_hash = record_hash(spec.kind, spec.key);
    r.header.created_wall_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count();
    r.header.created_mono_ns = to_nanos(Clock::now());
    r.header.creator_pid = ::getpid();
    std::memcpy(r.header.key, spec.key.data(), spec.key.size());
    if (spec.config_size > 0) std::memcpy(r.config, spec.config, spec.config_size);
    if (init_body) init_body(r);
    r.header.state.store(kRecordReady, std::memory_order_release);
    link_into_index(state, r.header.key_hash, index);
    return {index, &r, true};
}

}  // namespace lim::detail
