// The process-local side of an attached segment: the mapping, the file it maps, and typed access
// to the header, the record table and the process table inside it. One SegmentState per open
// call; Segment and every limiter handle share it through a shared_ptr, so the mapping lives as
// long as anything uses it.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "lim/error.hpp"
#include "lim/segment.hpp"
#include "shm/layout.hpp"

namespace lim::detail {

enum class Access { read_write, read_only };

class SegmentState : public std::enable_shared_from_this<SegmentState> {
  public:
    // Attaches to `name`: creates and initialises it first with `options` when `create` is set
    // and the segment does not exist (or was abandoned half-initialised by a creator that died).
    // Validates every header field and every table offset against the mapping before returning.
    // A read-write attach registers the calling thread's slot and, if options.reap_on_attach,
    // reaps dead processes. A read_only attach copies the segment with pread into private memory,
    // validates the copy and registers nothing (limctl's read commands use it: they can never
    // write, a file that shrinks meanwhile is an error rather than SIGBUS, and they never wait:
    // an unready segment throws UnreadySegment at once).
    // Only regular files are opened (never through a symbolic link, never blocking on a FIFO);
    // the owner and mode checks are described in docs/security.md. Every failure, including the
    // operating system's, is thrown as lim::Error.
    static std::shared_ptr<SegmentState> attach(std::string_view name,
                                                const SegmentOptions& options, bool create,
                                                Access access);

    ~SegmentState();
    SegmentState(const SegmentState&) = delete;
    SegmentState& operator=(const SegmentState&) = delete;

    const std::string& name() const noexcept { return name_; }
    bool created() const noexcept { return created_; }
    bool read_only() const noexcept { return access_ == Access::read_only; }
    // Unique within this process for the life of the process: tells thread-local caches apart
    // even when a later mapping reuses an address.
    std::uint64_t uid() const noexcept { return uid_; }
    int fd() const noexcept;

    std::byte* base() const noexcept { return base_; }
    std::uint64_t size() const noexcept { return size_; }
    SegmentHeader& header() const noexcept { return *reinterpret_cast<SegmentHeader*>(base_); }
    const Geometry& geometry() const noexcept { return geometry_; }

    std::atomic<std::uint64_t>& index_entry(std::uint32_t i) const noexcept {
        return reinterpret_cast<std::atomic<std::uint64_t>*>(base_ + geometry_.index_offset)[i];
    }
    Record& record(std::uint32_t i) const noexcept {
        return *reinterpret_cast<Record*>(base_ + geometry_.records_offset +
                                          std::uint64_t{i} * kRecordSize);
    }
    SlotHeader& slot(std::uint32_t i) const noexcept {
        return *reinterpret_cast<SlotHeader*>(base_ + geometry_.slots_offset +
                                              std::uint64_t{i} * geometry_.slot_size);
    }
    // The index of a slot of this mapping (the inverse of slot()).
    std::uint32_t slot_index_of(const SlotHeader& s) const noexcept {
        return static_cast<std::uint32_t>(
            (reinterpret_cast<const std::byte*>(&s) - (base_ + geometry_.slots_offset)) /
            static_cast<std::ptrdiff_t>(geometry_.slot_size));
    }
    LedgerEntry& ledger(std::uint32_t slot_index, std::uint32_t record_index) const noexcept {
        auto* row = reinterpret_cast<std::byte*>(&slot(slot_index)) + sizeof(SlotHeader);
        return reinterpret_cast<LedgerEntry*>(row)[record_index];
    }

    // The process-private description through which this process locks the slots it claims in
    // this mapping (shm/process_table.cpp), and which slots it holds locked. Guarded by the
    // private-descriptor registry's mutex (lock_private_registry); `fork_gen` tells the
    // parent's (closed in a child by the fork hook) from this process's own.
    struct SlotLocks {
        std::uint32_t fork_gen = 0;
        int fd = -1;
        std::vector<std::uint8_t> mine;
    };
    SlotLocks& slot_locks() noexcept { return slot_locks_; }

    // Whether some thread of this process may have released (or handed off) units of `record`'s
    // `layer` that its own ledger entry did not show, leaving that entry negative. Until then a
    // thread's own entry covering a release proves the process holds the units (no entry of the
    // process is negative, so their sum is at least the thread's); afterwards it does not (A
    // acquires, B releases A's unit: A's entry still says 1, the process holds 0), and the
    // release checks the process's sum (Hold::require_held). Process-private, one bit per
    // (record, layer) hashed into 64, set for good: a false positive costs only the slow check.
    bool may_owe(std::uint32_t record, int layer) const noexcept {
        return (owing_.load(std::memory_order_relaxed) & owe_bit(record, layer)) != 0;
    }
    void note_owing(std::uint32_t record, int layer) noexcept {
        // Written once: a releasing thread that keeps releasing others' units does not keep
        // taking the line from the threads that read it.
        if (!may_owe(record, layer))
            owing_.fetch_or(owe_bit(record, layer), std::memory_order_relaxed);
    }

    // This handle's reaping policy (SegmentOptions::reap_after); zero: no automatic reaping.
    Duration reap_after() const noexcept { return reap_after_; }

    // Records in use, clamped to the table (a corrupt count never sends a reader off the end).
    std::uint32_t records_used() const noexcept;

    // SegmentInfo for Segment::info() and limctl.
    SegmentInfo info() const;

  private:
    SegmentState(std::string name, Access access);
    static std::shared_ptr<SegmentState> attach_file(std::string_view name,
                                                     const SegmentOptions& options, bool create,
                                                     Access access);
    void validate_and_map(int fd);
    void release_own_slots() noexcept;

    std::string name_;
    Access access_;
    bool created_ = false;
    std::uint64_t uid_;
    int fd_ = -1;
    std::byte* base_ = nullptr;  // MAP_SHARED of fd_ (read_write) or a private copy (read_only)
    std::uint64_t size_ = 0;
    Geometry geometry_{};
    Duration reap_after_{};
    SlotLocks slot_locks_;
    static constexpr std::uint64_t owe_bit(std::uint32_t record, int layer) noexcept {
        return std::uint64_t{1} << ((std::uint64_t{record} * 3 + static_cast<unsigned>(layer)) %
                                    64);
    }
    std::atomic<std::uint64_t> owing_{0};  // may_owe's bits
};

// What a read_only attach throws for a segment that is not initialised (being created, or
// abandoned by a creator that died): code corrupt_segment, so that `limctl ls` can say "unready".
class UnreadySegment : public Error {
  public:
    using Error::Error;
};

// Throws Error(invalid_argument) unless `options` describe a segment lim can create.
void validate_options(const SegmentOptions& options);

}  // namespace lim::detail
