// lim-feeder's consumed records as the global tests build them: its local configuration, a
// worker's adopting TokenBucket, a grant, and a granted record with what the fast take works on.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>

#include "lim/consumed_limiter.hpp"
#include "lim/lim.hpp"
#include "limiter/limiter_state.hpp"
#include "shm/process_table.hpp"
#include "support/limiter_records.hpp"
#include "support/limiter_time.hpp"
#include "support/process.hpp"

namespace lim::test {

// lim-feeder's local configuration for a global burst of `burst` (infinite drip, levels 0).
inline LimiterConfig feeder_config(double burst) {
    return LimiterConfig{.hopper_to_bucket_rate_per_sec = infinite,
                         .bucket_size = burst,
                         .initial_bucket_level = 0,
                         .initial_hopper_level = 0.0};
}

// What a worker opens (SPEC: adopting, creating if absent).
inline TokenBucket worker_bucket(const Segment& seg, const std::string& key, double burst,
                                 double rate, double initial = 0) {
    return TokenBucket::open(
        seg, key,
        {.burst_size = burst, .sustained_rate_per_sec = rate, .initial_bucket_level = initial},
        adopt_existing);
}

// As lim-feeder grants `g`: the target raised to in_flight + g, then a lease deadline `ttl` ahead.
inline void grant(Limiter& l, double g, Duration ttl = std::chrono::seconds{10}) {
    l.set_token_target_level(l.in_flight() + g);
    set_lease_deadline(l, Clock::now() + ttl);
}

// Takes 1 token at a time from `l` until refused; returns how many were admitted.
inline int take_all(Limiter& l) {
    int admitted = 0;
    while (l.try_take(1) == TryTake::taken)
        ++admitted;
    return admitted;
}

// lim-feeder's record "global" (burst 10), with `grant` tokens granted and a lease an hour away.
inline Limiter feeder_record(const Segment& seg, double grant) {
    Limiter lm = open_consumed_limiter(seg, "global", feeder_config(10));
    lm.set_token_target_level(grant);
    set_lease_deadline(lm, Clock::now() + std::chrono::hours{1});
    return lm;
}

// A segment named after `prefix` holding feeder_record(grant), and what the fast take works on.
struct FeederRecord {
    FeederRecord(double grant, const std::string& prefix)
        : guard(unique_name(prefix)),
          seg(limiter_segment(guard)),
          lm(feeder_record(seg, grant)),
          rec(record_of(seg, "global")),
          body(*reinterpret_cast<detail::LimiterBody*>(seg.state()->record(rec).body)),
          core(*seg.state(), rec),
          entry(detail::holder(*seg.state()).entry(rec)) {}

    // Takes this thread's ledger has counted as admitted on the record.
    std::uint64_t admitted() const { return entry.admitted.load(); }
    // The real clock, as a take's `now`.
    std::int64_t now_ns() const { return to_nanos(Clock::now()); }
    // What may still be taken: target - F (never below 0).
    double left() const {
        return std::max(0.0, lm.token_target_level().value_or(0.0) - lm.in_flight());
    }

    SegmentGuard guard;
    Segment seg;
    Limiter lm;
    std::uint32_t rec;
    detail::LimiterBody& body;
    detail::LimiterCore core;
    detail::LedgerEntry& entry;
};

}  // namespace lim::test
