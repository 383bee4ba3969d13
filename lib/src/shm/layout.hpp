// The mapped layout of a lim segment: plain structs of integers and lock-free atomics that live
// *in* shared memory. Nothing here is a handle; nothing here holds a pointer. Every reference
// from one part of the segment to another is an index or a byte offset from the segment base,
// because each process maps the segment at its own address.
//
//   offset 0                 SegmentHeader        (3 cache lines)
//   header.index_offset      record index         (index_capacity x 8 bytes, power of two)
//   header.records_offset    records              (max_limiters x kRecordSize)
//   header.slots_offset      process table        (max_processes x slot_size)
//
// docs/design.md has the same table with the reasoning behind each word's place. Any change to a
// struct here, to a constant, or to the meaning of a word must bump kLayoutVersion; the layout
// hash below catches the changes that forget to.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace lim::detail {

inline constexpr std::size_t kCacheLine = 64;

// "LIMSEGMT" read as a little-endian integer: a hexdump of the segment shows the name.
inline constexpr std::uint64_t kMagic = 0x544d4745534d494cULL;
inline constexpr std::uint32_t kLayoutVersion = 5;
// The value of SegmentHeader::ready once the header and tables are initialised. Not 1, so that a
// stray write or a foreign file is unlikely to look initialised.
inline constexpr std::uint32_t kReady = 0x59444552;  // "REDY"

inline constexpr std::size_t kMaxKeyLength = 64;
inline constexpr std::size_t kMaxSegmentNameLength = 200;

// Bounds on SegmentOptions, chosen so that the segment stays a few megabytes at the defaults and
// never exceeds kMaxSegmentBytes.
inline constexpr std::uint32_t kMaxLimitersLimit = 65'536;
inline constexpr std::uint32_t kMaxProcessesLimit = 65'536;
inline constexpr std::uint64_t kMaxSegmentBytes = 1ULL << 30;

static_assert(std::atomic<std::uint32_t>::is_always_lock_free);
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);
static_assert(std::atomic<std::int64_t>::is_always_lock_free);
static_assert(sizeof(std::atomic<std::uint32_t>) == 4, "futex words must be plain 32-bit words");
static_assert(sizeof(std::atomic<std::uint64_t>) == 8);

// ---------------------------------------------------------------------------------------------
// Header
// ---------------------------------------------------------------------------------------------

// The first 24 bytes keep this shape in every layout version, so any version of lim can tell a
// segment of another version (version_mismatch) from a foreign or corrupt file (corrupt_segment).
struct HeaderPrefix {
    std::uint64_t magic;
    std::uint32_t layout_version;
    std::uint32_t ready;  // std::atomic<uint32_t> in SegmentHeader; read with pread before mapping
    std::uint64_t size_bytes;
};

struct alignas(kCacheLine) SegmentHeader {
    // Line 0: identity and geometry. Written once by the initialiser before `ready` is published
    // (release); read-only afterwards, so it is shared by every core without coherence traffic.
    std::uint64_t magic;
    std::uint32_t layout_version;
    std::atomic<std::uint32_t> ready;  // 0 while initialising, kReady once published
    std::uint64_t size_bytes;          // the whole mapping, as ftruncate'd
    std::uint64_t layout_hash;         // kLayoutHash of the build that initialised the segment
    std::uint32_t max_limiters;
    std::uint32_t max_processes;
    std::uint32_t index_capacity;  // power of two, >= 2 * max_limiters
    std::uint32_t record_size;     // kRecordSize
    std::uint32_t slot_size;       // slot_size_for(max_limiters)
    std::uint32_t mode;            // permission bits the segment was created with
    std::uint64_t index_offset;

    // Line 1: more geometry and provenance, also immutable after initialisation.
    std::uint64_t records_offset;
    std::uint64_t slots_offset;
    std::int64_t created_wall_ns;  // system_clock, for people (SegmentInfo::created)
    std::int64_t created_mono_ns;  // CLOCK_MONOTONIC, for limiters' time bases
    std::int32_t creator_pid;
    std::uint32_t reserved1[7];

    // Line 2: the few segment-wide words that change, away from the immutable lines.
    alignas(kCacheLine) std::atomic<std::uint32_t> records_used;  // records [0, used) exist
    std::atomic<std::uint32_t> reserved2;
    std::atomic<std::uint64_t> reaps_total;     // processes reaped over the segment's life
    std::atomic<std::uint64_t> recovery_epoch;  // bumped by every reap and reset
    std::uint64_t reserved3[5];
};
static_assert(sizeof(SegmentHeader) == 3 * kCacheLine);
static_assert(offsetof(SegmentHeader, magic) == offsetof(HeaderPrefix, magic));
static_assert(offsetof(SegmentHeader, layout_version) == offsetof(HeaderPrefix, layout_version));
static_assert(offsetof(SegmentHeader, ready) == offsetof(HeaderPrefix, ready));
static_assert(offsetof(SegmentHeader, size_bytes) == offsetof(HeaderPrefix, size_bytes));

// ---------------------------------------------------------------------------------------------
// Record index: open addressing over 64-bit entries, lock-free to read.
// ---------------------------------------------------------------------------------------------

// An index entry is 0 (empty: probing stops here) or (hash_tag << 32) | (record_index + 1).
// Entries are written once, under the creation lock, with release ordering, after the record
// they name is complete; records are never deleted, so there are no tombstones and a lookup
// never sees an entry change under it.
struct IndexEntry {
    static constexpr std::uint64_t make(std::uint64_t hash, std::uint32_t record) noexcept {
        return (hash & 0xFFFF'FFFF'0000'0000ULL) | (static_cast<std::uint64_t>(record) + 1);
    }
    static constexpr std::uint32_t tag(std::uint64_t entry) noexcept {
        return static_cast<std::uint32_t>(entry >> 32);
    }
    static constexpr std::uint32_t record(std::uint64_t entry) noexcept {
        return static_cast<std::uint32_t>(entry & 0xFFFF'FFFFULL) - 1;
    }
};

// ---------------------------------------------------------------------------------------------
// Records: one per named limiter, fixed size, cache-line aligned.
// ---------------------------------------------------------------------------------------------

// What a record holds. Together with the key this is the record's identity: a Dispatch and a
// BackoffWindow may share a key (Foundation names both after the API they guard).
enum class RecordKind : std::uint16_t {
    none = 0,
    limiter = 1,  // Jane Street's Limiter and its facades (the facade is RecordHeader::flavor)
    semaphore = 2,
    weighted_semaphore = 3,
    backoff_window = 4,
    dispatch = 5,
};

inline constexpr std::size_t kRecordSize = 2048;
inline constexpr std::size_t kRecordConfigSize = 128;

struct alignas(kCacheLine) RecordHeader {
    // Line 0. `state` is published (release) last, after key, config and body are written.
    std::atomic<std::uint32_t> state;  // kRecordEmpty or kRecordReady
    std::uint16_t kind;                // RecordKind
    std::uint16_t flavor;              // family-specific sub-kind (e.g. the Limiter facade)
    std::uint32_t key_length;
    std::uint32_t reserved0;
    std::uint64_t key_hash;
    std::int64_t created_wall_ns;
    std::int64_t created_mono_ns;
    std::int32_t creator_pid;
    std::uint32_t reserved1;
    // Successful acquisitions recorded by process slots that have since been freed (a freed
    // slot folds its LedgerEntry::admitted in here, so totals survive threads and processes).
    std::atomic<std::uint64_t> admitted_retired;
    std::uint64_t reserved2;
    // Line 1.
    char key[kMaxKeyLength];  // not NUL-terminated; key_length bytes are meaningful
};
static_assert(sizeof(RecordHeader) == 2 * kCacheLine);

// RecordHeader::flavor, read atomically: written before the record is published, and rewritten
// once afterwards by lim::convert_to_consumed (an atomic store), which handles and tools may read
// concurrently. Relaxed: what a flavor decides is validated against the record's configuration
// generation, or is a statistic.
inline std::uint16_t load_flavor(const RecordHeader& h) noexcept {
    return std::atomic_ref<std::uint16_t>(const_cast<std::uint16_t&>(h.flavor))
        .load(std::memory_order_relaxed);
}

inline constexpr std::uint32_t kRecordEmpty = 0;
inline constexpr std::uint32_t kRecordReady = 0x4C494D52;  // "RMIL"

// The body is the family's: its shared state, one hot word per cache line. Families define a
// struct for it and static_assert that it fits kRecordBodySize.
inline constexpr std::size_t kRecordBodySize =
    kRecordSize - sizeof(RecordHeader) - kRecordConfigSize;

struct alignas(kCacheLine) Record {
    RecordHeader header;
    // Lines 2-3: the configuration the record was created with, as the family's plain struct,
    // zero-padded. Immutable: it is what `config_mismatch` compares and what `reset` restores.
    // (One exception, with `header.flavor`: lim::convert_to_consumed rewrites both once, under
    // the config lock, to what open_consumed_limiter creates; docs/design.md.)
    alignas(kCacheLine) std::byte config[kRecordConfigSize];
    alignas(kCacheLine) std::byte body[kRecordBodySize];
};
static_assert(sizeof(Record) == kRecordSize);
static_assert(kRecordSize % kCacheLine == 0);

// ---------------------------------------------------------------------------------------------
// Process table: one slot per holder (a thread of an attached process), each with its ledger.
// ---------------------------------------------------------------------------------------------

// A slot's owner word packs who owns it and in which state, so that claiming is one CAS and a
// claimer that dies half-way is still identifiable by pid:
//   bits  0..7   state (SlotState)
//   bits  8..31  generation (bumped on every claim, so stale references notice reuse)
//   bits 32..63  pid of the owning process (0 when free)
// Liveness: while a slot is in any state but `free`, its owning process holds an OFD write lock on
// byte kSlotLockBase + slot index of the segment file, through an open file description private
// to that process. The lock is taken before the CAS that claims the slot and released after the
// CAS that frees it, and the kernel drops it when the process is gone. A slot that is not free and
// whose byte nobody holds (with its owner word unchanged across the check) belongs to a dead
// process. Any other state byte than the four below is judged the same way. (docs/design.md,
// "Liveness".) The bytes lie beyond the end of the file, which POSIX locks allow.
inline constexpr std::uint64_t kSlotLockBase = 1ULL << 40;

enum class SlotState : std::uint8_t {
    free = 0,
    claiming = 1,  // owner is filling in identity; readers skip it
    live = 2,      // owned by a running thread of `pid`
    retired = 3,   // the owning thread exited while its ledger was not empty; the process still
                   // owns what it records, and another thread of the same process may adopt it
    parcel = 4,    // a holding offered to another process (hand_off); locked by the giver
    taken = 5,     // a parcel the receiver has taken; the giver frees it once its row is empty
};

struct SlotOwner {
    static constexpr std::uint64_t make(std::uint32_t pid, std::uint32_t generation,
                                        SlotState state) noexcept {
        return (static_cast<std::uint64_t>(pid) << 32) |
               (static_cast<std::uint64_t>(generation & 0xFF'FFFF) << 8) |
               static_cast<std::uint64_t>(state);
    }
    static constexpr SlotState state(std::uint64_t w) noexcept {
        return static_cast<SlotState>(w & 0xFF);
    }
    static constexpr std::uint32_t generation(std::uint64_t w) noexcept {
        return static_cast<std::uint32_t>((w >> 8) & 0xFF'FFFF);
    }
    static constexpr std::uint32_t pid(std::uint64_t w) noexcept {
        return static_cast<std::uint32_t>(w >> 32);
    }
};

// What one holder holds in one record: per layer, `held[l] - forgotten[l]` (holding(), below).
// The two words have one writer each, so that neither is ever written by two parties:
// - `held` (and `admitted`) by the holder's own thread (single writer: plain relaxed stores, no
//   read-modify-write on the hot path), which adds each change it makes to the shared word;
// - `forgotten` only under the recovery lock, by Segment::reset, which forgets what a slot holds
//   by setting `forgotten` to `held` (and puts it back, if the record is then refused, by
//   restoring `forgotten`), and by whoever frees the slot (a reaper, or its owner under the lock),
//   which zeroes both.
// A reset therefore never writes a word a live holder writes: a resetter stopped while clearing
// or restoring, its freeze broken meanwhile, cannot lose a holder's store (layout 3 cleared and
// restored `held` itself; docs/design.md, "Reset"). A free slot's entries are all zero.
// The meaning of each layer is the record family's (RecordKind):
//   semaphore, weighted_semaphore: layer 0 = units held
//   limiter:                       layer 0 = token units in flight
//   dispatch:                      layer 0 = concurrency slots, layer 1 = throttled slots,
//                                  layer 2 = bytes as charged (penalty included)
// `admitted` counts successful acquisitions, which limctl turns into rates and Prometheus into a
// _total counter. One entry per cache line: a holder's check and store touch one line.
struct alignas(kCacheLine) LedgerEntry {
    std::atomic<std::int64_t> held[3];
    std::atomic<std::uint64_t> admitted;
    std::atomic<std::int64_t> forgotten[3];
    std::uint64_t reserved;
};
static_assert(sizeof(LedgerEntry) == kCacheLine);

// What the entry's holder holds in `layer`: held - forgotten, wrapping (no undefined behaviour
// on a damaged segment; the recount saturates what it sums). The hot paths' check.
inline std::int64_t holding(const LedgerEntry& e, int layer) noexcept {
    return static_cast<std::int64_t>(
        static_cast<std::uint64_t>(e.held[layer].load(std::memory_order_relaxed)) -
        static_cast<std::uint64_t>(e.forgotten[layer].load(std::memory_order_relaxed)));
}

// Zeroes an entry's holding words, held and forgotten (a slot being freed, its writers gone or
// excluded: the recovery lock held, and the owner dead or the caller).
inline void clear_holding(LedgerEntry& e) noexcept {
    for (int l = 0; l < 3; ++l) {
        e.held[l].store(0, std::memory_order_relaxed);
        e.forgotten[l].store(0, std::memory_order_relaxed);
    }
}

// See SlotHeader::pending.
inline constexpr std::uint32_t kBucketTakeTag = std::uint32_t{1} << 31;

struct alignas(kCacheLine) SlotHeader {
    // Line 0: identity, written while the slot is `claiming`, read by reapers and limctl.
    std::atomic<std::uint64_t> owner;  // SlotOwner
    std::atomic<std::int32_t> tid;     // the owning thread (0 when retired)
    std::atomic<std::uint32_t> reserved0;
    // Layout 1 kept the process's start time and pid namespace here for a /proc-based liveness
    // check; layout 2 judges liveness by the slot's lock byte alone (kSlotLockBase) and leaves
    // these zero.
    std::atomic<std::uint64_t> reserved_identity[2];
    std::atomic<std::int64_t> attached_wall_ns;
    std::atomic<std::uint64_t> attach_uid;  // which mapping of the process claimed it
    std::atomic<std::uint64_t> reserved1[2];

    // Line 1: written by the owner thread around every holding operation.
    // `pending` is the record index + 1 of the operation in progress, 0 when none: a reaper that
    // quiesces a record waits until no live slot has it pending, so that every live ledger is
    // exact when it recounts (docs/design.md, "Crash recovery").
    // A token bucket's own take announces (record + 1) | kBucketTakeTag instead: a generation
    // checkpoint waits for it (it reads the record's bucket word), but a reap or a reset's
    // quiescence wait does not (it changes no word they recount, and does not step aside from a
    // frozen one).
    alignas(kCacheLine) std::atomic<std::uint32_t> pending;
    // The record index + 1 this thread is registered as waiting on (0: none), and the amount it
    // waits for. Written under a Hold, so a reaper that recounts a record's waiter counts sees
    // them exactly.
    std::atomic<std::uint32_t> waiting_record;
    std::atomic<std::uint64_t> waiting_amount;
    std::atomic<std::uint32_t> waiting_layer;  // which layer of the record (Dispatch has several)
    std::atomic<std::uint32_t> reserved2;
    std::atomic<std::uint64_t> reserved3[5];
};
static_assert(sizeof(SlotHeader) == 2 * kCacheLine);

// A slot is its header followed by one LedgerEntry per record (indexed by record index), rounded
// up to whole cache lines so that no two slots share a line.
constexpr std::uint64_t slot_size_for(std::uint32_t max_limiters) noexcept {
    const std::uint64_t raw =
        sizeof(SlotHeader) + std::uint64_t{max_limiters} * sizeof(LedgerEntry);
    return (raw + kCacheLine - 1) / kCacheLine * kCacheLine;
}

// ---------------------------------------------------------------------------------------------
// Geometry
// ---------------------------------------------------------------------------------------------

constexpr std::uint32_t index_capacity_for(std::uint32_t max_limiters) noexcept {
    std::uint32_t cap = 16;
    while (cap < 2 * max_limiters)
        cap *= 2;
    return cap;
}

constexpr std::uint64_t align_up(std::uint64_t v, std::uint64_t a) noexcept {
    return (v + a - 1) / a * a;
}

struct Geometry {
    std::uint32_t max_limiters;
    std::uint32_t max_processes;
    std::uint32_t index_capacity;
    std::uint64_t index_offset;
    std::uint64_t records_offset;
    std::uint64_t slots_offset;
    std::uint64_t slot_size;
    std::uint64_t size_bytes;
};

constexpr Geometry geometry_for(std::uint32_t max_limiters, std::uint32_t max_processes) noexcept {
    Geometry g{};
    g.max_limiters = max_limiters;
    g.max_processes = max_processes;
    g.index_capacity = index_capacity_for(max_limiters);
    g.index_offset = sizeof(SegmentHeader);
    g.records_offset = align_up(g.index_offset + std::uint64_t{g.index_capacity} * 8, kCacheLine);
    g.slots_offset = g.records_offset + std::uint64_t{max_limiters} * kRecordSize;
    g.slot_size = slot_size_for(max_limiters);
    g.size_bytes = g.slots_offset + std::uint64_t{max_processes} * g.slot_size;
    return g;
}

// ---------------------------------------------------------------------------------------------
// Layout hash: FNV-1a over every size and offset above. Two builds that disagree about the
// layout (a changed struct, another ABI) disagree about this number, and the second one to
// attach refuses the segment instead of misreading it.
// ---------------------------------------------------------------------------------------------

constexpr std::uint64_t fnv1a_step(std::uint64_t h, std::uint64_t v) noexcept {
    for (int i = 0; i < 8; ++i) {
        h ^= (v >> (8 * i)) & 0xFF;
        h *= 0x100000001b3ULL;
    }
    return h;
}

constexpr std::uint64_t compute_layout_hash() noexcept {
    const std::uint64_t facts[] = {
        kLayoutVersion,
        kMagic,
        sizeof(SegmentHeader),
        offsetof(SegmentHeader, ready),
        offsetof(SegmentHeader, index_offset),
        offsetof(SegmentHeader, records_offset),
        offsetof(SegmentHeader, created_wall_ns),
        offsetof(SegmentHeader, records_used),
        offsetof(SegmentHeader, recovery_epoch),
        sizeof(RecordHeader),
        offsetof(RecordHeader, key_hash),
        offsetof(RecordHeader, key),
        kRecordSize,
        kRecordConfigSize,
        offsetof(Record, body),
        sizeof(SlotHeader),
        offsetof(SlotHeader, reserved_identity),
        kSlotLockBase,
        offsetof(SlotHeader, pending),
        offsetof(SlotHeader, waiting_amount),
        sizeof(LedgerEntry),
        offsetof(LedgerEntry, admitted),
        offsetof(LedgerEntry, forgotten),
        kMaxKeyLength,
    };
    std::uint64_t h = 0xcbf29ce484222325ULL;
    for (std::uint64_t f : facts)
        h = fnv1a_step(h, f);
    return h;
}

inline constexpr std::uint64_t kLayoutHash = compute_layout_hash();

}  // namespace lim::detail
