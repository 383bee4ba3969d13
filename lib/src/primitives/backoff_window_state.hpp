// The BackoffWindow's state in its record: the deadline, a count of sets, and the wake channel
// that clear() uses to wake wait()ers.
#pragma once

#include <atomic>
#include <cstdint>

#include "recovery/kind_ops.hpp"
#include "shm/layout.hpp"
#include "sync/wake_channel.hpp"

namespace lim::detail {

// A window has nothing to configure; the version field keeps the config non-empty (an empty
// struct has no unique object representation) and leaves room to add options later.
struct BackoffWindowConfig {
    std::uint64_t version;
};

struct BackoffWindowBody {
    // CLOCK_MONOTONIC nanoseconds; 0: no deadline. Only ever raised by set (CAS maximum) and
    // zeroed by clear.
    alignas(kCacheLine) std::atomic<std::int64_t> until;
    std::atomic<std::uint64_t> sets;
    alignas(kCacheLine) WakeChannel channel;
};
static_assert(sizeof(BackoffWindowBody) <= kRecordBodySize);

// Largest deadline set() stores: far beyond any uptime, and far from overflow.
extern const KindOps kBackoffWindowOps;

inline constexpr std::int64_t kMaxBackoffUntil = std::int64_t{1} << 62;

// Raises `until` to `target` unless it is already later; returns the deadline now in force.
inline std::int64_t raise_until(std::atomic<std::int64_t>& until, std::int64_t target) noexcept {
    std::int64_t cur = until.load(std::memory_order_relaxed);
    while (cur < target && !until.compare_exchange_weak(cur, target, std::memory_order_seq_cst,
                                                        std::memory_order_relaxed)) {
    }
    return cur < target ? target : cur;
}

}  // namespace lim::detail
