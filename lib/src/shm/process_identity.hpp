// Who a process is, in a way that pid reuse cannot fool: pid, the process's start time (ticks
// since boot, from /proc/<pid>/stat) and its pid namespace. A slot in the process table records
// all three; a reaper judges a slot's owner dead only when the pid is gone or now names a process
// that started at another time.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <optional>

namespace lim::detail {

struct ProcessIdentity {
    pid_t pid = 0;
    std::uint64_t start_time = 0;   // field 22 of /proc/<pid>/stat
    std::uint64_t pidns_inode = 0;  // st_ino of /proc/<pid>/ns/pid
};

// The calling process. Cached; re-read in a forked child (see fork_generation).
const ProcessIdentity& this_process();

// The calling thread's kernel thread id (gettid). Cached per thread and per fork generation.
pid_t this_thread_id();

// A process-local counter that a pthread_atfork child handler bumps. A handle compares it with
// the value it cached to learn, without a system call, that it now runs in a forked child.
// install_fork_hook() registers the handler (idempotent; attach calls it).
inline std::atomic<std::uint32_t> g_fork_generation{1};
inline std::uint32_t fork_generation() noexcept {
    return g_fork_generation.load(std::memory_order_relaxed);
}
void install_fork_hook();

// What /proc/<pid>/stat says of `pid` now: its state letter (field 3: 'R', 'S', 'Z', ...) and its
// start time (field 22). nullopt when there is no such process or /proc cannot be read.
struct ProcStat {
    char state = '?';
    std::uint64_t start_time = 0;
};
std::optional<ProcStat> read_proc_stat(pid_t pid);

enum class Liveness {
    alive,    // the same process still runs
    dead,     // the pid is gone, is a zombie, or names a process with another start time
    unknown,  // the slot belongs to another pid namespace: its pid means nothing here
};

// Judges whether the process that recorded (pid, start_time, pidns_inode) still runs, as seen
// from the calling process.
Liveness check_alive(pid_t pid, std::uint64_t start_time, std::uint64_t pidns_inode);

}  // namespace lim::detail
