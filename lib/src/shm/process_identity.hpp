// Who the calling process and thread are, and what a fork() changes about that.
//
// Liveness is not judged here any more: a slot's owner is alive exactly while it holds the
// slot's lock byte (shm/process_table.hpp, docs/design.md "Liveness"). The pid recorded in a slot
// is for people (reports, limctl) and nothing else, so pid reuse and pid namespaces cannot fool
// recovery. This file also owns the process's *private descriptions*: open file descriptions of
// the segment file that hold OFD locks and must never be shared with a forked child.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <mutex>

namespace lim::detail {

struct ProcessIdentity {
    pid_t pid = 0;
};

// The calling process. Cached; re-read in a forked child (see fork_generation).
const ProcessIdentity& this_process();

// The calling thread's kernel thread id (gettid). Cached per thread and per fork generation.
pid_t this_thread_id();

// A process-local counter that a pthread_atfork child handler bumps. A handle compares it with
// the value it cached to learn, without a system call, that it now runs in a forked child.
// install_fork_hook() registers the handlers (idempotent; attach calls it).
inline std::atomic<std::uint32_t> g_fork_generation{1};
inline std::uint32_t fork_generation() noexcept {
    return g_fork_generation.load(std::memory_order_relaxed);
}
void install_fork_hook();

// Opens a new open file description of the file `fd` refers to (read-write, close-on-exec) that
// belongs to this process alone: the fork hook closes the child's copy of every such descriptor
// before the child runs, so a lock taken through it is never held by a child (it would outlive
// this process while the child lives) and never released by one. Open and registration happen
// under one process-local mutex that the fork hook's prepare handler also takes, so no fork can
// duplicate a private descriptor that is not yet registered. Throws Error(system_error) if the
// file cannot be reopened (EMFILE, no /proc) or the registry (kMaxPrivateFds) is full.
int open_private_fd(int fd);

// Closes a descriptor from open_private_fd and forgets it. A descriptor that is not registered
// (the fork hook closed it in this child; its number may since name another file) is left alone.
// Returns whether it was closed.
bool close_private_fd(int fd) noexcept;

// Whether `fd` is a private descriptor of this process now (false in a child for the parent's).
bool is_private_fd(int fd) noexcept;

inline constexpr int kMaxPrivateFds = 1024;

// The registry's mutex, for a caller that must open or close a private descriptor together with
// other process-local state (the slot locks of a mapping) without a fork() splitting the two;
// the *_locked variants expect it held. Never held across anything that blocks for long.
std::unique_lock<std::mutex> lock_private_registry();
int open_private_fd_locked(int fd);
bool close_private_fd_locked(int fd) noexcept;

}  // namespace lim::detail
