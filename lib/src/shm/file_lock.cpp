#include "shm/file_lock.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <string>

#include "lim/error.hpp"

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
int reopen(int fd) {
    char path[64];
    std::snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    const int own = ::open(path, O_RDWR | O_CLOEXEC);
    if (own < 0) throw_errno(errno, "cannot reopen the segment file to lock it");
    return own;
}
}  // namespace

FileLock FileLock::lock_exclusive(int fd, LockByte byte) {
    const int own = reopen(fd);
    const int err = set_lock(own, byte, F_WRLCK, true);
    if (err != 0) {
        ::close(own);
        throw_errno(err, "cannot lock the segment file");
    }
    return FileLock(own, true, byte);
}

std::optional<FileLock> FileLock::try_lock_fresh(int fd, LockByte byte) {
    const int own = reopen(fd);
    const int err = set_lock(own, byte, F_WRLCK, false);
    if (err == 0) return FileLock(own, true, byte);
    ::close(own);
    if (err == EAGAIN || err == EACCES) return std::nullopt;
    throw_errno(err, "cannot lock the segment file");
}

FileLock::FileLock(FileLock&& other) noexcept
    : fd_(other.fd_), owns_fd_(other.owns_fd_), byte_(other.byte_) {
    other.fd_ = -1;
    other.owns_fd_ = false;
}

FileLock::~FileLock() {
    if (fd_ < 0) return;
    if (owns_fd_) {
        ::close(fd_);  // closing the only descriptor of the description drops the lock
    } else {
        set_lock(fd_, byte_, F_UNLCK, false);
    }
}

}  // namespace lim::detail
