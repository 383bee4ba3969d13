// lim/segment.hpp: a named shared-memory segment that holds every limiter processes share.
//
// A segment is one POSIX shared-memory object, /dev/shm/lim.<name>. It begins with a validated
// header, then a table of named limiter records, then a process table in which every thread that
// holds something from a limiter has a slot recording what it holds (so that what a dead process
// held can be given back). No daemon owns it: any process may create it, attach to it, and remove
// its name; the memory lives until the last process unmaps it.
//
// Handles are cheap to copy (they share one mapping per open call) and are usable from any
// thread. A Segment, and every limiter handle opened from it, survives fork(): the child keeps
// using them without reopening, and its first use registers the child's own process slot.
//
// Caveats
// - The segment's geometry (max_limiters, max_processes) and mode are fixed when it is created.
//   `open_or_create` on an existing segment attaches with the geometry the segment has, whatever
//   the options say; `info()` tells what it is.
// - A process takes one process-table slot per thread that holds permits or tokens (so that each
//   slot's ledger has a single writer and the hot path needs no extra atomic read-modify-write);
//   size max_processes for processes x threads that acquire, not just processes.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "lim/clock.hpp"

namespace lim {

namespace detail {
class SegmentState;
}

// Passed as the last argument of a limiter's `open`: when the key exists with another
// configuration, attach with the stored one instead of throwing Error(config_mismatch).
struct AdoptExisting {
    explicit AdoptExisting() = default;
};
inline constexpr AdoptExisting adopt_existing{};

struct SegmentOptions {
    // Records (named limiters) the segment can hold. 1..65536.
    std::uint32_t max_limiters = 256;
    // Process-table slots: one per thread of an attached process that holds something. 1..65536.
    std::uint32_t max_processes = 1024;
    // Permission bits of the shared-memory object (not masked by the umask). 0600 lets only the
    // creating user attach; 0660 a group. Applied whenever this call initialises the segment. On
    // attach it is also what the caller trusts: a segment writable by every user is refused
    // unless this mode grants that too, and one owned by a user other than the caller and root
    // only when this mode shares with group or others (docs/security.md).
    unsigned mode = 0600;
    // A blocking acquire that has waited this long reaps dead processes (and again each time it
    // has waited this long more). Zero turns automatic reaping in blocking calls off.
    Duration reap_after = std::chrono::seconds{1};
    // Reap dead processes when attaching (open_or_create, open).
    bool reap_on_attach = true;
};

struct SegmentInfo {
    std::string name;
    std::size_t size_bytes = 0;
    std::uint32_t layout_version = 0;
    std::uint32_t max_limiters = 0;
    std::uint32_t max_processes = 0;
    std::uint32_t limiters = 0;   // records in use
    std::uint32_t processes = 0;  // distinct live processes with a slot
    std::chrono::system_clock::time_point created;
};

// What a reap gave back for one dead process, in one layer of one record.
struct ReturnedHolding {
    std::string kind;  // "semaphore", "weighted_semaphore", "limiter", "dispatch"
    std::string key;
    std::string layer;  // "units", "tokens", "slots", "throttled", "bytes"
    double amount = 0;  // in the layer's unit (tokens for limiters)
};

struct ReapedProcess {
    int pid = 0;
    std::uint32_t slots = 0;  // process-table slots it had (one per thread that held something)
    std::vector<ReturnedHolding> returned;
};

struct ReapReport {
    // One entry per dead process found and cleared.
    std::vector<ReapedProcess> reaped;
    // Keys of records that could not be recounted now because a live process stayed in the
    // middle of an operation on them (stopped with SIGSTOP, say); the dead processes that held
    // them stay in the table and the next reap tries again.
    std::vector<std::string> deferred;
};

struct ResetOptions {
    // The record to reset; empty resets every record in the segment.
    std::string key = {};
    // Reset even though other live processes are attached. What they hold is forgotten: their
    // later releases find that they hold nothing and give back nothing (Semaphore::release and
    // WeightedSemaphore::release throw over_release, Limiter::return_to_hopper too; the guards
    // and Permit release nothing, without throwing), so the units they still use are over the
    // limit until they finish: restart them. Never overrides a live process that stays in the
    // middle of an operation on a record (stopped): that record is not reset (Error(busy)).
    bool force = false;
};

class Segment {
  public:
    // Attaches to the segment `name`, creating and initialising it with `options` if it does not
    // exist. Safe to race: when many processes call this at once, exactly one initialises the
    // segment and every caller attaches to the same one. Registers the calling thread's slot in
    // the process table.
    // Blocks only while another process is initialising the segment (microseconds; at most 5 s
    // before giving up with system_error if that process is stopped).
    // Throws Error with: invalid_name (bad name), invalid_argument (options out of range, or a
    // segment over 1 GiB), corrupt_segment (an existing object that is not a valid lim segment),
    // version_mismatch (a segment of another layout), permission_denied (also: the name is a
    // symbolic link, FIFO or other non-regular file; another user's file that `options.mode`
    // does not share; a file writable by all that it does not ask for), table_full (no free
    // process slot even after reaping the dead: a full table reaps before it refuses),
    // system_error (the kernel refused memory: /dev/shm full; no descriptor left to open the
    // process's lock description).
    static Segment open_or_create(std::string_view name, const SegmentOptions& options = {});

    // Attaches to an existing segment. Throws Error(not_found) if there is none; otherwise as
    // open_or_create.
    static Segment open(std::string_view name);

    // As open(name), with this handle's own reaping policy (`reap_after`, `reap_on_attach`);
    // the geometry in `options` is ignored (it is the segment's), and `mode` only says what the
    // caller trusts (see SegmentOptions::mode).
    static Segment open(std::string_view name, const SegmentOptions& options);

    // Unlinks the segment's name. Processes already attached keep using the memory; the next
    // open_or_create makes a new segment. Returns false if there was no such segment.
    // Throws Error(invalid_name) or Error(permission_denied).
    static bool remove(std::string_view name);

    // A consistent-enough view for people: counts are read without stopping anyone.
    SegmentInfo info() const;

    const std::string& name() const;

    // True when this call created and initialised the segment (exactly one of many racing
    // open_or_create calls sees true).
    bool is_creator() const;

    // Finds processes in the table that are dead and gives back exactly what each held to every
    // limiter: afterwards every shared counter equals what the live processes hold, including
    // when a process died between changing a shared counter and recording it in its ledger.
    // Frees their slots. A process is dead when the kernel has dropped the lock it holds on each
    // of its slots (it holds them for as long as it runs, whatever its threads do); a check that
    // fails counts as alive, so a reap never reclaims from a live process (docs/design.md,
    // "Liveness"). Needs no process slot of its own: works on a table full of the dead.
    // Blocks while another reap or reset runs, and briefly (microseconds) stalls acquisitions on
    // the records it recounts. Throws Error(busy) if another reap, reset or hand-off keeps the
    // recovery lock for over 3 s (a process stopped holding it: Ctrl-Z on limctl reap, a
    // debugger), and Error(system_error) if it cannot open a description of the segment file for
    // the recovery lock (out of descriptors); either way it reclaims nothing.
    ReapReport reap();

    // Re-initialises one record (options.key) or every record to its configured state: nothing
    // held, nothing queued, backoff cleared, bucket and hopper as created; frees the slots of
    // dead processes. Refused with Error(busy) while another live process is attached, unless
    // options.force. Throws Error(not_found) for an unknown key, Error(busy) also if another
    // reap, reset or hand-off keeps the recovery lock, or a configuration change the config lock,
    // for over 3 s (a process stopped holding it; nothing is reset then), and Error(busy) after
    // resetting the other records when a live process stayed in the middle of an operation on a
    // record for over a second (stopped or starved, forced or not): that record is left
    // unchanged, since resetting under an unfinished operation could later admit over the limit.
    // Retrying once that process is continued or killed is safe.
    void reset(const ResetOptions& options = {});

    // For the library's own handles; not part of the stable API.
    const std::shared_ptr<detail::SegmentState>& state() const noexcept { return state_; }

  private:
    explicit Segment(std::shared_ptr<detail::SegmentState> state);
    std::shared_ptr<detail::SegmentState> state_;
};

}  // namespace lim
