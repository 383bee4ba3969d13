#include "shm/file_lock.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <string>
#include <thread>

#include "lim/error.hpp"
#include "shm/process_identity.hpp"

namespace lim::detail {
namespace {

int set_lock(int fd, LockByte byte, short type, bool wait) {
    struct flock fl {};
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = static_cast<off_t>(byte);
    fl.l_len = 1;
    fl.l_pid = 0;  // required for OFD locks
    for (;;) {
        if (::fcntl(fd, wait ? F_OFD_SETLKW : F_OFD_SETLK, &fl) == 0) return 0;
        if (errno != EINTR) return errno;
    }
}

}  // namespace

FileLock::FileLock(int fd, bool owns_fd, LockByte byte) noexcept
    : fd_(fd), owns_fd_(owns_fd), byte_(byte), fork_gen_(fork_generation()) {}

std::optional<FileLock> FileLock::try_lock(int fd, LockByte byte) {
    const int err = set_lock(fd, byte, F_WRLCK, false);
    if (err == 0) return FileLock(fd, false, byte);
    if (err == EAGAIN || err == EACCES) return std::nullopt;
    throw_errno(err, "cannot lock the segment file");
}

bool FileLock::is_locked(int fd, LockByte byte) {
    struct flock fl {};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = static_cast<off_t>(byte);
    fl.l_len = 1;
    fl.l_pid = 0;
    if (::fcntl(fd, F_OFD_GETLK, &fl) != 0) throw_errno(errno, "cannot query the segment's locks");
    return fl.l_type != F_UNLCK;
}

namespace {
// A description of our own, registered so that a fork() in another thread while we hold the lock
// leaves the child without a copy (shm/process_identity.hpp, open_private_fd).
int reopen(int fd) {
    return open_private_fd(fd);
}
}  // namespace

FileLock FileLock::lock_exclusive(int fd, LockByte byte) {
    const int own = reopen(fd);
    const int err = set_lock(own, byte, F_WRLCK, true);
    if (err != 0) {
        close_private_fd(own);
        throw_errno(err, "cannot lock the segment file");
    }
    return FileLock(own, true, byte);
}

std::optional<FileLock> FileLock::lock_until(int fd, LockByte byte, TimePoint deadline) {
    const int own = reopen(fd);
    std::chrono::microseconds pause{1000};
    for (;;) {
        const int err = set_lock(own, byte, F_WRLCK, false);
        if (err == 0) return FileLock(own, true, byte);
        if (err != EAGAIN && err != EACCES) {
            close_private_fd(own);
            throw_errno(err, "cannot lock the segment file");
        }
        const TimePoint now = Clock::now();
        if (now >= deadline) break;
        // Sleeping is what a waiter did in F_OFD_SETLKW too; the holder is another process.
        std::this_thread::sleep_for(
            std::min<Clock::duration>(pause, std::chrono::ceil<Clock::duration>(deadline - now)));
        pause = std::min(pause * 2, std::chrono::microseconds{16000});
    }
    close_private_fd(own);
    return std::nullopt;
}

FileLock FileLock::lock_or_busy(int fd, LockByte byte, std::string_view segment,
                                std::string_view what) {
    if (auto lock = lock_until(fd, byte, Clock::now() + kLockWaitTimeout)) return std::move(*lock);
    throw_lock_busy(segment, byte, what, kLockWaitTimeout);
}

std::string_view lock_description(LockByte byte) noexcept {
    switch (byte) {
        case LockByte::init:
            return "init lock (held while the segment is initialised)";
        case LockByte::records:
            return "records lock (held while a limiter is created)";
        case LockByte::config:
            return "config lock (held while a limiter's configuration changes)";
        case LockByte::recovery:
            return "recovery lock (held by a reap, a reset or a hand-off)";
    }
    return "lock";
}

void throw_lock_busy(std::string_view segment, LockByte byte, std::string_view what,
                     std::chrono::milliseconds waited) {
    const std::string held =
        waited > kTryLockGrace
            ? fmt::format("has been held by another process for over {} ms", waited.count())
            : std::string("is held by another process, and this call does not wait for locks");
    throw Error(Errc::busy,
                fmt::format("segment '{}': cannot {}: the {} {}; it is held by a process that is "
                            "stopped (SIGSTOP, a debugger, Ctrl-Z) or slow (limctl show {} lists "
                            "the attached processes); nothing was changed, try again",
                            segment, what, lock_description(byte), held, segment));
}

std::optional<FileLock> FileLock::try_lock_fresh(int fd, LockByte byte) {
    const int own = reopen(fd);
    const int err = set_lock(own, byte, F_WRLCK, false);
    if (err == 0) return FileLock(own, true, byte);
    close_private_fd(own);
    if (err == EAGAIN || err == EACCES) return std::nullopt;
    throw_errno(err, "cannot lock the segment file");
}

FileLock::FileLock(FileLock&& other) noexcept
    : fd_(other.fd_), owns_fd_(other.owns_fd_), byte_(other.byte_), fork_gen_(other.fork_gen_) {
    other.fd_ = -1;
    other.owns_fd_ = false;
}

FileLock::~FileLock() {
    if (fd_ < 0) return;
    // In a forked child (a lock object that crossed fork() on the forking thread's stack) the
    // description is the parent's: unlocking it would release the parent's lock, and our own
    // descriptor number was closed by the fork hook and may name another file now. Leave both.
    if (fork_gen_ != fork_generation()) return;
    // Unlock explicitly before closing: a child forked before the hook could close its copy (or
    // a description shared with a child for any other reason) must not keep the lock held.
    set_lock(fd_, byte_, F_UNLCK, false);
    if (owns_fd_) close_private_fd(fd_);
}

}  // namespace lim::detail
