// Helpers for tests that use real processes: unique segment names, segment cleanup, forked
// children that report through their exit status, and memory shared with them.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <functional>
#include <new>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace lim::test {

// A segment name no other test (or concurrent ctest run) uses: "t-<stem>-<pid>-<n>".
std::string unique_name(std::string_view stem);

// Removes the segment `name` when it goes out of scope (and ignores whether it existed).
class SegmentGuard {
  public:
    explicit SegmentGuard(std::string name);
    ~SegmentGuard();
    SegmentGuard(const SegmentGuard&) = delete;
    SegmentGuard& operator=(const SegmentGuard&) = delete;
    const std::string& name() const { return name_; }

  private:
    std::string name_;
};

// Runs `body` in a forked child, which exits with body's return value (3 if it throws, after
// printing the exception). The child never returns into the test framework.
pid_t fork_child(const std::function<int()>& body);

// Waits for `pid`; returns its exit status, or 128 + the signal that killed it.
int wait_child(pid_t pid);

// Anonymous MAP_SHARED memory, inherited by forked children: a place for barriers and counters
// that test code outside lim shares with its children.
template <class T>
T* shared_array(std::size_t n);
void* shared_bytes(std::size_t n);

template <class T>
T* shared_array(std::size_t n) {
    return static_cast<T*>(shared_bytes(n * sizeof(T)));
}

// A one-shot flag in MAP_SHARED memory: a child sets it, the test waits for it (a child "has
// reached this point"). Never the assertion itself.
struct Flag {
    std::atomic<int> value{0};
    void set() { value.store(1); }
    void wait() const {
        while (value.load() == 0)
            std::this_thread::sleep_for(std::chrono::microseconds{100});
    }
};

inline Flag* make_flag() {
    return new (shared_array<Flag>(1)) Flag{};
}

// Forks a child that runs `body` (which takes and keeps something), then waits, holding it,
// until killed; returns once `body` has run. The child never returns into the test framework.
pid_t child_holding(const std::function<void()>& body);

// SIGKILLs `pid` (a child of this process; continued too, in case it is stopped) and reaps it,
// checking that SIGKILL ended it.
void kill_and_wait(pid_t pid);

// Polls `pred` every 100 us until it holds (true) or `timeout` passes (false): for waiting on
// another process or thread to reach a state, never as the assertion itself. The default is long
// (30 s) because a wait that must succeed fails CI whenever a loaded 2-core machine running
// sanitizers is slower than it: only for predicates that, once true, stay true until looked at.
template <class Pred>
bool eventually(Pred pred, std::chrono::milliseconds timeout = std::chrono::seconds{30}) {
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (!pred()) {
        if (std::chrono::steady_clock::now() > until) return false;
        std::this_thread::sleep_for(std::chrono::microseconds{100});
    }
    return true;
}

// The bytes of /dev/shm/lim.<name>, to show that a refused call changed nothing.
std::vector<unsigned char> segment_file_bytes(std::string_view name);
std::string segment_path(std::string_view name);

}  // namespace lim::test
