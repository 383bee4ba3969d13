// Byte-range locks on the segment's file, for the few rare paths that must exclude each other
// across processes: initialising the segment, creating a record, changing a limiter's
// configuration. Hot paths never take one.
//
// They are Linux open-file-description locks (F_OFD_SETLK): the kernel drops them when the last
// descriptor of the description closes, which includes the death of the process that held one,
// so a creator killed while holding a lock never blocks anyone else. Unlike flock() and classic
// fcntl locks, an OFD lock taken through a description of its own excludes other threads of the
// same process and a forked child too, which is why lock_exclusive() opens a fresh description
// (through /proc/thread-self/fd) for each acquisition.
//
// fork() while another thread holds a lock: the description opened for the lock is a *private*
// one (open_private_fd): the fork hook closes the child's copy before the child runs, so the lock
// is released when this process releases it, not when the child exits. Every release is an
// explicit F_UNLCK before the close, which also covers a lock taken through a shared descriptor
// (try_lock on the segment's own fd).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>

namespace lim::detail {

// Which byte of the file a lock covers. Different bytes are independent locks.
enum class LockByte : off_t {
    init = 0,      // segment initialisation
    records = 1,   // record creation
    config = 2,    // limiter reconfiguration
    recovery = 3,  // reaping and reset
};

class FileLock {
  public:
    // Tries to lock `byte` through `fd`'s own open file description, without blocking.
    // nullopt if another description holds it. Throws Error(system_error) on other failures.
    static std::optional<FileLock> try_lock(int fd, LockByte byte);

    // Whether any open file description holds `byte` (F_OFD_GETLK). Works on a read-only
    // descriptor, so read-only attaches can tell "being initialised" from "abandoned".
    static bool is_locked(int fd, LockByte byte);

    // Like lock_exclusive, but gives up at once (nullopt) if another description holds `byte`.
    static std::optional<FileLock> try_lock_fresh(int fd, LockByte byte);

    // Locks `byte` through a new open file description of the file `fd` refers to, blocking until
    // it is free. Throws Error(system_error) if the file cannot be reopened or locked.
    static FileLock lock_exclusive(int fd, LockByte byte);

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
