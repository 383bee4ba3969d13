// What a user would write instead of lim, in shared memory: each primitive's semantics as plain
// counters behind a robust process-shared pthread mutex (PTHREAD_MUTEX_ROBUST +
// PTHREAD_PROCESS_SHARED), with a process-shared condition variable where a caller blocks.
// A mutex whose owner died is made consistent and reused, as a careful user would; a stopped
// owner stalls everyone, which is the point of comparing with it.
//
// Every type here is placed in MAP_SHARED memory with placement new (see make_shared_object) and
// used from any process forked afterwards. Times are ns of lim::Clock (CLOCK_MONOTONIC).
#pragma once

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <new>

#include "suite/harness.hpp"

namespace lim_bench {

template <class T, class... Args>
T* make_shared_object(Args&&... args) {
    return new (shared_memory(sizeof(T))) T(static_cast<Args&&>(args)...);
}

class RobustMutex {
  public:
    RobustMutex() {
        pthread_mutexattr_t a;
        pthread_mutexattr_init(&a);
        pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
        pthread_mutex_init(&m_, &a);
        pthread_mutexattr_destroy(&a);
    }
    void lock() noexcept {
        if (pthread_mutex_lock(&m_) == EOWNERDEAD) pthread_mutex_consistent(&m_);
    }
    void unlock() noexcept { pthread_mutex_unlock(&m_); }
    pthread_mutex_t* native() noexcept { return &m_; }

  private:
    pthread_mutex_t m_;
};

// A counting semaphore: units in use under the mutex, sleepers on a condition variable that a
// release signals (one waiter per unit released, so no herd).
class MutexSemaphore {
  public:
    explicit MutexSemaphore(std::uint64_t capacity) : capacity_(capacity) {
        pthread_condattr_t a;
        pthread_condattr_init(&a);
        pthread_condattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
        pthread_cond_init(&cv_, &a);
        pthread_condattr_destroy(&a);
    }
    bool try_acquire(std::uint64_t n = 1) noexcept {
        m_.lock();
        const bool ok = in_use_ + n <= capacity_;
        if (ok) in_use_ += n;
        m_.unlock();
        return ok;
    }
    void acquire(std::uint64_t n = 1) noexcept {
        m_.lock();
        while (in_use_ + n > capacity_) {
            ++waiters_;
            if (pthread_cond_wait(&cv_, m_.native()) == EOWNERDEAD)
                pthread_mutex_consistent(m_.native());
            --waiters_;
        }
        in_use_ += n;
        m_.unlock();
    }
    void release(std::uint64_t n = 1) noexcept {
        m_.lock();
        in_use_ -= std::min(n, in_use_);
        const bool wake = waiters_ > 0;
        m_.unlock();
        if (wake) {
            if (n == 1)
                pthread_cond_signal(&cv_);
            else
                pthread_cond_broadcast(&cv_);
        }
    }

  private:
    RobustMutex m_;
    pthread_cond_t cv_;
    std::uint64_t capacity_;
    std::uint64_t in_use_ = 0;
    std::uint64_t waiters_ = 0;
};

// A token bucket (tokens never come back): refill from the elapsed time, then take. Tokens in
// units of 1/10,000, like lim's.
class MutexTokenBucket {
  public:
    MutexTokenBucket(double burst, double rate_per_sec, std::int64_t now_ns)
        : burst_(static_cast<std::int64_t>(burst * 10'000)),
          units_per_ns_(rate_per_sec * 10'000 / 1e9),
          level_(burst_),
          last_ns_(now_ns) {}
    bool try_take(std::int64_t now_ns, double n) noexcept {
        const auto want = static_cast<std::int64_t>(n * 10'000);
        m_.lock();
        if (now_ns > last_ns_) {
            const double add = static_cast<double>(now_ns - last_ns_) * units_per_ns_;
            level_ = std::min<std::int64_t>(burst_, level_ + static_cast<std::int64_t>(add));
            last_ns_ = now_ns;
        }
        const bool ok = level_ >= want;
        if (ok) level_ -= want;
        m_.unlock();
        return ok;
    }

  private:
    RobustMutex m_;
    std::int64_t burst_;
    double units_per_ns_;
    std::int64_t level_;
    std::int64_t last_ns_;
};

// Jane Street's Limiter as the seed describes it, sequential: bucket, hopper (here infinite or
// a level), in flight, a drip from hopper to bucket at a rate (infinite: all at once).
class MutexLimiter {
  public:
    // rate_per_sec <= 0 means an infinite rate; hopper < 0 means an infinite hopper.
    MutexLimiter(double bucket_size, double rate_per_sec, double bucket, double hopper,
                 std::int64_t now_ns)
        : size_(static_cast<std::int64_t>(bucket_size * 10'000)),
          units_per_ns_(rate_per_sec * 10'000 / 1e9),
          bucket_(static_cast<std::int64_t>(bucket * 10'000)),
          hopper_(hopper < 0 ? -1 : static_cast<std::int64_t>(hopper * 10'000)),
          last_ns_(now_ns) {}
    bool try_take(std::int64_t now_ns, double n) noexcept {
        const auto want = static_cast<std::int64_t>(n * 10'000);
        m_.lock();
        advance(now_ns);
        const bool ok = bucket_ >= want;
        if (ok) {
            bucket_ -= want;
            in_flight_ += want;
        }
        m_.unlock();
        return ok;
    }
    void return_to_hopper(std::int64_t now_ns, double n) noexcept {
        const auto back = static_cast<std::int64_t>(n * 10'000);
        m_.lock();
        advance(now_ns);
        in_flight_ -= back;
        if (hopper_ >= 0) hopper_ += back;
        advance(now_ns);
        m_.unlock();
    }

  private:
    void advance(std::int64_t now_ns) noexcept {
        std::int64_t room = size_ - bucket_;
        if (room <= 0) {
            last_ns_ = std::max(last_ns_, now_ns);
            return;
        }
        std::int64_t drip = room;
        if (units_per_ns_ > 0 && now_ns > last_ns_)
            drip = std::min<std::int64_t>(
                room,
                static_cast<std::int64_t>(static_cast<double>(now_ns - last_ns_) * units_per_ns_));
        else if (units_per_ns_ > 0)
            drip = 0;
        if (hopper_ >= 0) {
            drip = std::min(drip, hopper_);
            hopper_ -= drip;
        }
        bucket_ += drip;
        last_ns_ = std::max(last_ns_, now_ns);
    }

    RobustMutex m_;
    std::int64_t size_;
    double units_per_ns_;
    std::int64_t bucket_;
    std::int64_t hopper_;  // -1: infinite
    std::int64_t in_flight_ = 0;
    std::int64_t last_ns_;
};

// Foundation's Dispatch layers as counters: backoff check (a clock read only while a backoff
// was ever set), concurrency, throttled concurrency under backoff, bytes with the penalty.
class MutexDispatch {
  public:
    struct Held {
        bool throttled = false;
        std::uint64_t charged = 0;
    };
    bool try_acquire(std::uint64_t n, Held& held) noexcept {
        m_.lock();
        bool backoff = false;
        if (until_ns_ != 0) {
            const std::int64_t now = now_ns();
            backoff = now < until_ns_ || now - until_ns_ < window_ns_;
        }
        std::uint64_t charged = std::min(backoff ? n * penalty_ : n, byte_budget_);
        const bool ok = in_flight_ < concurrency_ && (!backoff || throttled_ < throttled_cap_) &&
                        bytes_ + charged <= byte_budget_;
        if (ok) {
            ++in_flight_;
            if (backoff) ++throttled_;
            bytes_ += charged;
        }
        m_.unlock();
        held = {backoff, charged};
        return ok;
    }
    void release(const Held& held) noexcept {
        m_.lock();
        bytes_ -= held.charged;
        if (held.throttled) --throttled_;
        --in_flight_;
        m_.unlock();
    }

  private:
    RobustMutex m_;
    std::uint64_t concurrency_ = 400, throttled_cap_ = 10, byte_budget_ = 5'000'000;
    std::int64_t window_ns_ = 10'000'000'000;
    std::uint64_t penalty_ = 20;
    std::uint64_t in_flight_ = 0, throttled_ = 0, bytes_ = 0;
    std::int64_t until_ns_ = 0;
};

// The floor: the least any counter shared through memory can cost.
struct alignas(64) FloorWord {
    std::atomic<std::uint64_t> word{0};

    void fetch_add_pair() noexcept {
        word.fetch_add(1, std::memory_order_acq_rel);
        word.fetch_sub(1, std::memory_order_acq_rel);
    }
    // One bounded take by CAS (what a token bucket's take must at least do).
    bool cas_take(std::uint64_t bound) noexcept {
        std::uint64_t v = word.load(std::memory_order_relaxed);
        do {
            if (v + 1 > bound) return false;
        } while (!word.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel,
                                             std::memory_order_relaxed));
        return true;
    }
    void cas_give_back() noexcept {
        std::uint64_t v = word.load(std::memory_order_relaxed);
        while (!word.compare_exchange_weak(v, v - 1, std::memory_order_acq_rel,
                                           std::memory_order_relaxed)) {
        }
    }
};

}  // namespace lim_bench
