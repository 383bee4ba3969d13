// Byte-range locks on the segment's file, for the few rare paths that must exclude each other
// across processes: initialising the segment, creating a record, changing a limiter's
// configuration. Hot paths never take one.
//
// They are Linux open-file-description locks (F_OFD_SETLK): the kernel drops them when the last
// descriptor of the description closes, which includes the death of the process that held one,
// so a creator killed while holding a lock never blocks anyone else. Unlike flock() and classic
// fcntl locks, an OFD lock taken through a description of its own excludes other threads of the
// same process and a forked child too, which is why lock_until() opens a fresh description
// (through /proc/thread-self/fd) for each acquisition.
//
// fork() while another thread holds a lock: the description opened for the lock is a *private*
// one (open_private_fd): the fork hook closes the child's copy before the child runs, so the lock
// is released when this process releases it, not when the child exits. Every release is an
// explicit F_UNLCK before the close, which also covers a lock taken through a shared descriptor
// (try_lock on the segment's own fd).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string_view>

#include "lim/clock.hpp"

namespace lim::detail {

// Which byte of the file a lock covers. Different bytes are independent locks.
enum class LockByte : off_t {
    init = 0,      // segment initialisation
    records = 1,   // record creation
    config = 2,    // limiter reconfiguration
    recovery = 3,  // reaping and reset
};

// How long a call waits for a lock another process holds before it gives up with Error(busy).
// Every holder keeps a lock for microseconds (a creation, a configuration switch, a hand-off), or
// for at most about a second (a reap or reset: its quiescence budget). A lock held longer is held
// by a process that is stopped (SIGSTOP, a debugger, Ctrl-Z) or starved, and the kernel drops
// OFD locks when a process dies, never when it stops: waiting on (F_OFD_SETLKW) would hang the
// caller for as long as the neighbour stays stopped (docs/design.md, "Stopped lock holders").
inline constexpr std::chrono::milliseconds kLockWaitTimeout{3000};

// How long a try_* call that cannot go on without a lock (a re-anchor of a limiter's drip past
// kRebaseHard) waits for it: a legitimate holder keeps it for microseconds, except at a
// generation checkpoint, where the switch holds the config lock through a fence and a wait
// (limiter/generation_checkpoint.hpp: kCheckpointWait at most), which that call then waits out
// too (LimiterCore::rebase_hard); a try_* never waits longer (Error(busy) then).
inline constexpr std::chrono::milliseconds kTryLockGrace{1};

// A short name for the lock on `byte` and what holds it, for messages ("the config lock (held
// while a limiter is reconfigured)").
std::string_view lock_description(LockByte byte) noexcept;

// Throws Error(Errc::busy): "segment '<segment>': cannot <what>: the <lock> has been held by
// another process for <waited>; ... stopped or slow ...".
[[noreturn]] void throw_lock_busy(std::string_view segment, LockByte byte, std::string_view what,
                                  std::chrono::milliseconds waited);

class FileLock {
  public:
    // Tries to lock `byte` through `fd`'s own open file description, without blocking.
    // nullopt if another description holds it. Throws Error(system_error) on other failures.
    static std::optional<FileLock> try_lock(int fd, LockByte byte);

    // Whether any open file description holds `byte` (F_OFD_GETLK). Works on a read-only
    // descriptor, so read-only attaches can tell "being initialised" from "abandoned".
    static bool is_locked(int fd, LockByte byte);

    // Like lock_until, but gives up at once (nullopt) if another description holds `byte`.
    static std::optional<FileLock> try_lock_fresh(int fd, LockByte byte);

    // Locks `byte` through a new open file description of the file `fd` refers to, waiting while
    // another description holds it, but not past `deadline` (CLOCK_MONOTONIC): nullopt then. It
    // polls (F_OFD_SETLK, sleeping 1 ms doubling to 16 ms between tries) rather than blocking in
    // F_OFD_SETLKW, which nothing could interrupt at a deadline. A `deadline` already past tries
    // once. Throws Error(system_error) if the file cannot be reopened or locked.
    static std::optional<FileLock> lock_until(int fd, LockByte byte, TimePoint deadline);

    // Locks `byte` like lock_until, but waits without bound (F_OFD_SETLKW). A stopped holder hangs
    // the caller: no path a user calls uses it (they use lock_or_busy or lock_until); tests use it
    // to stand in for a holder. Throws Error(system_error) if the file cannot be locked.
    static FileLock lock_exclusive(int fd, LockByte byte);

    // lock_until(now + kLockWaitTimeout), or Error(busy) (throw_lock_busy) naming `segment` and
    // `what` the caller was about to do. Nothing is changed by a call that throws.
    static FileLock lock_or_busy(int fd, LockByte byte, std::string_view segment,
                                 std::string_view what);

    FileLock(FileLock&& other) noexcept;
    FileLock& operator=(FileLock&&) = delete;
    FileLock(const FileLock&) = delete;
    ~FileLock();

  private:
    FileLock(int fd, bool owns_fd, LockByte byte) noexcept;
    int fd_;
    bool owns_fd_;
    LockByte byte_;
    std::uint32_t fork_gen_;  // fork_generation() when taken
};

}  // namespace lim::detail
