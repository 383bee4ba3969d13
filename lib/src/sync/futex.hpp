// Futex wait and wake on 32-bit words in the shared segment.
//
// These are *shared* futexes: FUTEX_PRIVATE_FLAG is never set, so the kernel keys the wait queue
// by the physical page and a process can wake another that mapped the segment at another
// address. (std::atomic::wait/notify cannot do this: libstdc++ uses private futexes and a
// process-local table of waiters.)
//
// Callers keep their own record of whether anyone waits (a waiter count packed beside the value,
// as glibc's sem_t does) and call futex_wake only when it is non-zero, so an uncontended release
// makes no system call.
#pragma once

#include <atomic>
#include <cstdint>
#include <optional>

#include "lim/clock.hpp"

namespace lim::detail {

enum class FutexResult {
    woken,          // a wake arrived (or a spurious return: callers re-check their condition)
    value_changed,  // *word != expected when the kernel looked: re-check at once
    timed_out,      // `deadline` passed
    interrupted,    // a signal arrived: re-check, and wait again if still needed
};

// Sleeps while `*word == expected`, until woken or until the absolute CLOCK_MONOTONIC `deadline`
// (no deadline: until woken). `bitset` restricts which futex_wake_bitset calls wake this waiter.
// Never throws: an unexpected errno is reported as `woken`, which makes the caller re-check.
FutexResult futex_wait(const std::atomic<std::uint32_t>& word, std::uint32_t expected,
                       std::optional<TimePoint> deadline,
                       std::uint32_t bitset = 0xFFFF'FFFFu) noexcept;

// Wakes up to `count` waiters on `word`; returns how many were woken.
int futex_wake(const std::atomic<std::uint32_t>& word, int count) noexcept;

// Wakes up to `count` waiters whose wait bitset intersects `bitset`.
int futex_wake_bitset(const std::atomic<std::uint32_t>& word, int count,
                      std::uint32_t bitset) noexcept;

// The 32 bits of a 64-bit atomic word that hold its low half, as a futex word. x86-64 and
// aarch64 are little-endian, so the low half sits at the word's own address (glibc's sem_t
// waits on its value the same way).
const std::atomic<std::uint32_t>& low_half(const std::atomic<std::uint64_t>& word) noexcept;

}  // namespace lim::detail
