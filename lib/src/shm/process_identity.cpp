#include "shm/process_identity.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <mutex>

#include "lim/error.hpp"
#include "shm/process_table.hpp"

namespace lim::detail {
namespace {

// The registry of private descriptors. A plain array (no allocation: the child handler must not
// allocate) guarded by a mutex that is held only across open+register, close+unregister, and
// fork() itself (prepare to parent/child). It is a lock on a rare path (opening a lock's
// description), never on a hot one.
std::mutex g_private_mutex;
int g_private_fds[kMaxPrivateFds];
int g_private_count = 0;

void on_fork_prepare() {
    g_private_mutex.lock();
}

void on_fork_parent() {
    g_private_mutex.unlock();
}

void on_fork_child() {
    // Close the child's copies of the parent's private descriptions without unlocking anything
    // through them: an F_UNLCK here would release the parent's lock, since the description is
    // shared. close() only drops the child's reference; the parent's locks stay the parent's.
    for (int i = 0; i < g_private_count; ++i)
        ::close(g_private_fds[i]);
    g_private_count = 0;
    g_fork_generation.fetch_add(1, std::memory_order_relaxed);
    // The parent's slots are not the child's: the forking thread's cache of them (the only
    // thread the child has) is emptied, so the child's first holding operation on a mapping
    // claims its own slot (process_table.hpp, holder()).
    forget_cached_holders();
    g_private_mutex.unlock();
}

}  // namespace

void install_fork_hook() {
    static std::once_flag once;
    std::call_once(once,
                   [] { ::pthread_atfork(&on_fork_prepare, &on_fork_parent, &on_fork_child); });
}

std::unique_lock<std::mutex> lock_private_registry() {
    install_fork_hook();
    return std::unique_lock<std::mutex>(g_private_mutex);
}

int open_private_fd(int fd) {
    auto lock = lock_private_registry();
    return open_private_fd_locked(fd);
}

int open_private_fd_locked(int fd) {
    if (g_private_count == kMaxPrivateFds) {
        throw Error(Errc::system_error,
                    "too many lock descriptions open on lim segments in this process");
    }
    // /proc/thread-self, not /proc/self: once the main thread has called pthread_exit(),
    // /proc/self names a zombie thread-group leader whose fd directory cannot be opened, while
    // the process's other threads still need their own descriptions.
    char path[64];
    std::snprintf(path, sizeof path, "/proc/thread-self/fd/%d", fd);
    int own = ::open(path, O_RDWR | O_CLOEXEC);
    if (own < 0 && errno == ENOENT) {  // kernels before 3.17 have no /proc/thread-self
        std::snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        own = ::open(path, O_RDWR | O_CLOEXEC);
    }
    if (own < 0) throw_errno(errno, "cannot open a private description of the segment file");
    g_private_fds[g_private_count++] = own;
    return own;
}

bool close_private_fd(int fd) noexcept {
    std::lock_guard lock(g_private_mutex);
    return close_private_fd_locked(fd);
}

bool close_private_fd_locked(int fd) noexcept {
    for (int i = 0; i < g_private_count; ++i) {
        if (g_private_fds[i] != fd) continue;
        g_private_fds[i] = g_private_fds[--g_private_count];
        ::close(fd);
        return true;
    }
    return false;
}

bool is_private_fd(int fd) noexcept {
    std::lock_guard lock(g_private_mutex);
    for (int i = 0; i < g_private_count; ++i) {
        if (g_private_fds[i] == fd) return true;
    }
    return false;
}

const ProcessIdentity& this_process() {
    // Per thread and per fork generation, like this_thread_id: no lock that a fork could leave
    // held in the child.
    thread_local std::uint32_t cached_generation = 0;
    thread_local ProcessIdentity cached;
    const std::uint32_t gen = fork_generation();
    if (cached_generation != gen) {
        cached.pid = ::getpid();
        cached_generation = gen;
    }
    return cached;
}

pid_t this_thread_id() {
    thread_local std::uint32_t cached_generation = 0;
    thread_local pid_t cached_tid = 0;
    const std::uint32_t gen = fork_generation();
    if (cached_generation != gen) {
        cached_tid = ::gettid();
        cached_generation = gen;
    }
    return cached_tid;
}

}  // namespace lim::detail
