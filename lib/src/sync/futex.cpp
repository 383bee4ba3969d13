#include "sync/futex.hpp"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <ctime>

namespace lim::detail {
namespace {

std::uint32_t* address(const std::atomic<std::uint32_t>& word) noexcept {
    // The kernel reads the word itself; std::atomic<uint32_t> is a plain 32-bit word
    // (static_assert in layout.hpp), so its address is the futex address.
    return reinterpret_cast<std::uint32_t*>(const_cast<std::atomic<std::uint32_t>*>(&word));
}

long futex(std::uint32_t* addr, int op, std::uint32_t val, const timespec* timeout,
           std::uint32_t val3) noexcept {
    return ::syscall(SYS_futex, addr, op, val, timeout, nullptr, val3);
}

}  // namespace

FutexResult futex_wait(const std::atomic<std::uint32_t>& word, std::uint32_t expected,
                       std::optional<TimePoint> deadline, std::uint32_t bitset) noexcept {
    timespec ts{};
    const timespec* timeout = nullptr;
    if (deadline) {
        const std::int64_t ns = to_nanos(*deadline);
        if (ns <= 0) return FutexResult::timed_out;
        ts.tv_sec = static_cast<time_t>(ns / 1'000'000'000);
        ts.tv_nsec = static_cast<long>(ns % 1'000'000'000);
        timeout = &ts;
    }
    // FUTEX_WAIT_BITSET takes an absolute timeout, on CLOCK_MONOTONIC unless
    // FUTEX_CLOCK_REALTIME is given: exactly lim's clock, and no drift from re-computing a
    // relative timeout after each spurious wake.
    if (futex(address(word), FUTEX_WAIT_BITSET, expected, timeout, bitset) == 0) {
        return FutexResult::woken;
    }
    switch (errno) {
        case EAGAIN:
            return FutexResult::value_changed;
        case ETIMEDOUT:
            return FutexResult::timed_out;
        case EINTR:
            return FutexResult::interrupted;
        default:
            return FutexResult::woken;
    }
}

int futex_wake(const std::atomic<std::uint32_t>& word, int count) noexcept {
    const long n = futex(address(word), FUTEX_WAKE, static_cast<std::uint32_t>(count), nullptr, 0);
    return n < 0 ? 0 : static_cast<int>(n);
}

int futex_wake_bitset(const std::atomic<std::uint32_t>& word, int count,
                      std::uint32_t bitset) noexcept {
    const long n =
        futex(address(word), FUTEX_WAKE_BITSET, static_cast<std::uint32_t>(count), nullptr, bitset);
    return n < 0 ? 0 : static_cast<int>(n);
}

const std::atomic<std::uint32_t>& low_half(const std::atomic<std::uint64_t>& word) noexcept {
    static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
                  "low_half assumes the low 32 bits are at the word's address");
    return *reinterpret_cast<const std::atomic<std::uint32_t>*>(&word);
}

}  // namespace lim::detail
