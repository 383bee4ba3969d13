// The record table: named limiter records, found without a lock and created under one.
//
// Lookup hashes (kind, key) into the index and probes linearly; entries are written once and
// never removed, so a reader needs only acquire loads. Creation takes the segment's record lock
// (an OFD lock: released by the kernel if the creator dies), re-checks, fills the next free
// record, publishes it, and only then links it into the index.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string_view>

#include "shm/layout.hpp"
#include "shm/segment_state.hpp"

namespace lim::detail {

struct RecordSpec {
    RecordKind kind = RecordKind::none;
    std::uint16_t flavor = 0;
    std::string_view key;
    const void* config = nullptr;  // the family's config struct, copied into Record::config
    std::size_t config_size = 0;   // <= kRecordConfigSize
};

struct OpenedRecord {
    std::uint32_t index = 0;
    Record* record = nullptr;
    bool created = false;  // true when this call created it
};

// FNV-1a over the kind and the key: the record's identity.
std::uint64_t record_hash(RecordKind kind, std::string_view key) noexcept;

// Finds the ready record (kind, key). Lock-free; never blocks. Validates every index entry it
// follows (a corrupt entry is skipped, never dereferenced out of bounds).
std::optional<std::uint32_t> find_record(const SegmentState& state, RecordKind kind,
                                         std::string_view key) noexcept;

// Finds (kind, key) or creates it from `spec`, running `init_body` on the new record's body
// before anyone can see it. Validates the key. Throws Error(invalid_name), Error(table_full)
// when every record is in use (the segment is left unchanged), Error(permission_denied) on a
// read-only mapping.
OpenedRecord find_or_create_record(SegmentState& state, const RecordSpec& spec,
                                   const std::function<void(Record&)>& init_body);

// Whether `record` was created with exactly the configuration bytes `config`.
bool same_config(const Record& record, const void* config, std::size_t size) noexcept;

// "semaphore", "weighted_semaphore", "limiter", "backoff_window", "dispatch": what reports,
// limctl and errors call a kind ("unknown" for anything else, as a corrupt record may hold).
std::string_view kind_name(RecordKind kind) noexcept;

// The key of a ready record, clamped to the key field.
std::string_view record_key(const Record& record) noexcept;

}  // namespace lim::detail
