// What lim_suite compares: for each lim family, the lim operation and the baselines with the
// same semantics, all written against lim's public API (lib/include/lim/) and the baselines in
// bench/baselines/. The shared state of every candidate is created here, in the parent, before
// any worker is forked; the ops run in whichever process calls them.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "lim/segment.hpp"
#include "suite/harness.hpp"

namespace lim_bench {

struct Candidate {
    std::string name;  // as the tables show it
    std::string kind;  // lim | floor | mutex | sem_t | boost | redis
    OpFactory make;    // builds the op in the calling process
};

// One row of the comparison: a lim operation and its baselines (the first "floor" and the first
// "mutex" among them give the goal ratios).
struct Family {
    std::string name;       // Semaphore, Dispatch, ...
    std::string operation;  // what one op is
    Candidate lim;
    std::vector<Candidate> baselines;

    const Candidate* first(const std::string& kind) const;
};

struct Env {
    lim::Segment* segment = nullptr;
    int redis_port = 0;         // 0: no Redis baseline
    bool explicit_now = false;  // the limiter families pass a time advanced 1 us per op
};

// The try-style pair of every family (uncontended and contended scenarios). Capacities are large
// enough that an op finds room unless another process's op is in the way.
std::vector<Family> try_families(const Env& env);

// Blocking hand-off at `capacity`: acquire (blocking), hold for `hold_ns`, release.
std::vector<Candidate> blocking_candidates(const Env& env, std::uint64_t capacity,
                                           std::int64_t hold_ns);

}  // namespace lim_bench
