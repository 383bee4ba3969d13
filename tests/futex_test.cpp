// Shared futexes across processes: a wake in one process reaches a waiter in another, which
// mapped the word at another address; deadlines are absolute CLOCK_MONOTONIC times.
#include <sys/mman.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "support/process.hpp"
#include "sync/futex.hpp"

using namespace lim;
using namespace std::chrono_literals;
using detail::FutexResult;

TEST_CASE("a wait returns at once when the word no longer holds the expected value") {
    std::atomic<std::uint32_t> word{5};
    CHECK(detail::futex_wait(word, 4, Clock::now() + 10s) == FutexResult::value_changed);
}

TEST_CASE("a wait with a deadline times out at the deadline, not before") {
    std::atomic<std::uint32_t> word{0};
    const TimePoint deadline = Clock::now() + 20ms;
    CHECK(detail::futex_wait(word, 0, deadline) == FutexResult::timed_out);
    CHECK(Clock::now() >= deadline);
    CHECK(detail::futex_wait(word, 0, from_nanos(0)) == FutexResult::timed_out);  // already past
}

TEST_CASE("a waiter in another process is woken by a wake on the same shared word") {
    // Map the word twice: the child waits through one address, the parent wakes through another.
    auto* a = static_cast<std::atomic<std::uint32_t>*>(lim::test::shared_bytes(4096));
    new (a) std::atomic<std::uint32_t>{0};
    auto* ready = lim::test::shared_array<std::atomic<int>>(1);
    new (ready) std::atomic<int>{0};

    const pid_t child = lim::test::fork_child([&] {
        ready->store(1);
        // Wait until the parent stores 1; a wake with the value unchanged is spurious: re-check.
        while (a->load() == 0) {
            const auto r = detail::futex_wait(*a, 0, Clock::now() + 10s);
            if (r == FutexResult::timed_out) return 40;
        }
        return a->load() == 1 ? 0 : 41;
    });
    while (ready->load() == 0)
        std::this_thread::yield();
    std::this_thread::sleep_for(20ms);  // let the child block (correctness does not depend on it)
    a->store(1);
    int woken = detail::futex_wake(*a, 1);
    CHECK(woken <= 1);
    CHECK(lim::test::wait_child(child) == 0);
}

TEST_CASE("wake_bitset wakes only the waiters whose bitset intersects") {
    std::atomic<std::uint32_t> word{0};
    std::atomic<int> woken_a{0}, woken_b{0};
    std::thread a([&] {
        while (word.load() != 1) {
            if (detail::futex_wait(word, word.load(), Clock::now() + 60s, 0x1) ==
                FutexResult::timed_out)
                break;
        }
        woken_a = 1;
    });
    std::thread b([&] {
        while (word.load() != 2) {
            if (detail::futex_wait(word, word.load(), Clock::now() + 60s, 0x2) ==
                FutexResult::timed_out)
                break;
        }
        woken_b = 1;
    });
    // (A waiter's 60 s deadline, far past any delay of a loaded machine: b, timed out, would
    // count as woken.)
    std::this_thread::sleep_for(20ms);
    word.store(1);
    detail::futex_wake_bitset(word, 8, 0x1);
    a.join();
    CHECK(woken_a == 1);
    CHECK(woken_b == 0);  // b's bit was not in the wake; it keeps waiting
    word.store(2);
    detail::futex_wake_bitset(word, 8, 0x2);
    b.join();
    CHECK(woken_b == 1);
}

TEST_CASE("low_half names the low 32 bits of a 64-bit word") {
    std::atomic<std::uint64_t> w{0x0000'0007'0000'0003ULL};
    CHECK(detail::low_half(w).load() == 3);
    CHECK(detail::futex_wait(detail::low_half(w), 2, Clock::now() + 1s) ==
          FutexResult::value_changed);
}
