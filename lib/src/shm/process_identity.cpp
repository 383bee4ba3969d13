#include "shm/process_identity.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <csignal>
#include <cstring>
#include <mutex>
#include <string_view>

#include "lim/error.hpp"

namespace lim::detail {
namespace {

void on_fork_child() {
    g_fork_generation.fetch_add(1, std::memory_order_relaxed);
}

std::uint64_t read_pidns_inode(const char* path) {
    struct stat st {};
    if (::stat(path, &st) != 0) return 0;
    return static_cast<std::uint64_t>(st.st_ino);
}

// Reads a whole small /proc file without allocating. Returns the byte count, or -1.
long read_small_file(const char* path, char* buf, std::size_t size) {
    const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    long total = 0;
    while (static_cast<std::size_t>(total) < size) {
        const ssize_t n = ::read(fd, buf + total, size - static_cast<std::size_t>(total));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        total += n;
    }
    ::close(fd);
    return total;
}

}  // namespace

void install_fork_hook() {
    static std::once_flag once;
    std::call_once(once, [] { ::pthread_atfork(nullptr, nullptr, &on_fork_child); });
}

std::optional<ProcStat> read_proc_stat(pid_t pid) {
    char path[64];
    std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
    std::array<char, 1024> buf{};
    const long n = read_small_file(path, buf.data(), buf.size() - 1);
    if (n <= 0) return std::nullopt;
    std::string_view text(buf.data(), static_cast<std::size_t>(n));
    // Field 2 (comm) is parenthesised and may itself contain spaces and ')': fields are counted
    // from the last ')'. After it come field 3 (state) ... field 22 (starttime).
    const auto close = text.rfind(')');
    if (close == std::string_view::npos) return std::nullopt;
    text.remove_prefix(close + 1);
    ProcStat stat;
    int field = 2;
    std::size_t pos = 0;
    while (pos < text.size()) {
        while (pos < text.size() && text[pos] == ' ')
            ++pos;
        const std::size_t end = text.find(' ', pos);
        ++field;
        const std::string_view token =
            text.substr(pos, end == std::string_view::npos ? text.size() - pos : end - pos);
        if (field == 3 && !token.empty()) stat.state = token[0];
        if (field == 22) {
            const auto [p, ec] =
                std::from_chars(token.data(), token.data() + token.size(), stat.start_time);
            if (ec != std::errc{}) return std::nullopt;
            return stat;
        }
        if (end == std::string_view::npos) break;
        pos = end + 1;
    }
    return std::nullopt;
}

const ProcessIdentity& this_process() {
    struct Cache {
        std::uint32_t generation = 0;
        ProcessIdentity identity;
    };
    static Cache cache;
    static std::mutex mutex;
    const std::uint32_t gen = fork_generation();
    // The mutex is taken only to fill the cache (once per process and once more in each forked
    // child); the hot paths never call this.
    std::lock_guard lock(mutex);
    if (cache.generation != gen) {
        ProcessIdentity id;
        id.pid = ::getpid();
        const auto stat = read_proc_stat(id.pid);
        if (!stat) throw Error(Errc::system_error, "cannot read /proc/self/stat");
        id.start_time = stat->start_time;
        id.pidns_inode = read_pidns_inode("/proc/self/ns/pid");
        cache.identity = id;
        cache.generation = gen;
    }
    return cache.identity;
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

Liveness check_alive(pid_t pid, std::uint64_t start_time, std::uint64_t pidns_inode) {
    if (pid <= 0) return Liveness::dead;
    const ProcessIdentity& self = this_process();
    if (pidns_inode != 0 && self.pidns_inode != 0 && pidns_inode != self.pidns_inode) {
        return Liveness::unknown;
    }
    if (::kill(pid, 0) != 0 && errno == ESRCH) return Liveness::dead;
    const auto stat = read_proc_stat(pid);
    if (!stat) return Liveness::dead;  // exited between kill() and the read
    // A zombie holds nothing and will never act again: its permits are as good as returned.
    if (stat->state == 'Z' || stat->state == 'X') return Liveness::dead;
    return stat->start_time == start_time ? Liveness::alive : Liveness::dead;
}

}  // namespace lim::detail
