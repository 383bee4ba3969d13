// lim-demo: forked workers attached to one segment. (The Dispatch issue replaces this with the
// real demo: workers sharing a Dispatch against a fake API.)
#include <fmt/format.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <vector>

#include "lim/lim.hpp"
#include "shm/process_table.hpp"
#include "shm/segment_state.hpp"

int main(int argc, char** argv) {
    const int workers = argc > 1 ? std::atoi(argv[1]) : 4;
    const std::string name = fmt::format("lim-demo-{}", ::getpid());
    auto seg = lim::Segment::open_or_create(name, {.max_limiters = 16, .max_processes = 64});
    int pipefd[2];
    if (::pipe(pipefd) != 0) return 1;
    std::vector<pid_t> children;
    for (int i = 0; i < workers; ++i) {
        const pid_t pid = ::fork();
        if (pid == 0) {
            ::close(pipefd[1]);
            lim::detail::holder(*seg.state());  // first use in the child: its own slot
            char c;
            while (::read(pipefd[0], &c, 1) > 0) {
            }
            ::_exit(0);
        }
        children.push_back(pid);
    }
    ::close(pipefd[0]);
    // Wait until every worker has registered, then show the segment.
    while (seg.info().processes < static_cast<std::uint32_t>(workers + 1))
        ::usleep(1000);
    const auto info = seg.info();
    fmt::print("segment {} ({} bytes, layout {}): {} processes attached\n", info.name,
               info.size_bytes, info.layout_version, info.processes);
    const auto& s = *seg.state();
    fmt::print("{:>5}  {:>8}  {:>8}\n", "slot", "pid", "tid");
    for (std::uint32_t i = 0; i < s.geometry().max_processes; ++i) {
        const auto w = s.slot(i).owner.load();
        if (lim::detail::SlotOwner::state(w) != lim::detail::SlotState::live) continue;
        fmt::print("{:>5}  {:>8}  {:>8}\n", i, lim::detail::SlotOwner::pid(w),
                   s.slot(i).tid.load());
    }
    ::close(pipefd[1]);
    for (pid_t pid : children)
        ::waitpid(pid, nullptr, 0);
    lim::Segment::remove(name);
    return 0;
}
