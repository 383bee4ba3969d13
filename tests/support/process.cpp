#include "support/process.hpp"

#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <iterator>
#include <stdexcept>

#include "lim/segment.hpp"

namespace lim::test {

std::string unique_name(std::string_view stem) {
    static std::atomic<int> counter{0};
    return "t-" + std::string(stem) + "-" + std::to_string(::getpid()) + "-" +
           std::to_string(counter.fetch_add(1));
}

SegmentGuard::SegmentGuard(std::string name) : name_(std::move(name)) {
    try {
        Segment::remove(name_);
    } catch (...) {
    }
}

SegmentGuard::~SegmentGuard() {
    try {
        Segment::remove(name_);
    } catch (...) {
    }
    // A lim-feeder started on this segment leaves its lock file (which keeps its instance id
    // across restarts, so the feeder never removes it): the test's segment is gone, so is it.
    ::unlink(("/dev/shm/lim-feeder." + name_ + ".lock").c_str());
}

pid_t fork_child(const std::function<int()>& body) {
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork failed");
    if (pid == 0) {
        int rc = 3;
        try {
            rc = body();
        } catch (const std::exception& e) {
            std::fprintf(stderr, "child %d threw: %s\n", ::getpid(), e.what());
        } catch (...) {
            std::fprintf(stderr, "child %d threw a non-exception\n", ::getpid());
        }
        std::fflush(nullptr);
        ::_exit(rc);
    }
    return pid;
}

void kill_and_wait(pid_t pid) {
    ::kill(pid, SIGKILL);
    ::kill(pid, SIGCONT);
    CHECK(wait_child(pid) == 128 + SIGKILL);
}

pid_t child_holding(const std::function<void()>& body) {
    Flag* ready = make_flag();
    const pid_t pid = fork_child([&] {
        body();
        ready->set();
        for (;;)
            ::pause();
        return 0;
    });
    ready->wait();
    return pid;
}

int wait_child(pid_t pid) {
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) {
            std::fprintf(stderr, "waitpid(%d): %s\n", pid, std::strerror(errno));
            return -1;
        }
    }
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return -1;
}

void* shared_bytes(std::size_t n) {
    void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("mmap failed");
    return p;
}

std::string segment_path(std::string_view name) {
    return "/dev/shm/lim." + std::string(name);
}

std::vector<unsigned char> segment_file_bytes(std::string_view name) {
    std::ifstream in(segment_path(name), std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace lim::test
