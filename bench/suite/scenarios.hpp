// The scenarios of lim_suite; each writes one Markdown fragment (and its plots) under
// Settings::out_dir. Each throws std::runtime_error if it cannot run.
#pragma once

#include "lim/segment.hpp"
#include "suite/report.hpp"

namespace lim_bench {

void uncontended(const Settings& s, lim::Segment& seg);  // uncontended.md, goals.md
void contended(const Settings& s, lim::Segment& seg);    // contended.md, oversubscribed.md
void handoff(const Settings& s, lim::Segment& seg);      // handoff.md
void sigstop(const Settings& s, lim::Segment& seg);      // sigstop.md
void records(const Settings& s);                         // records.md: attach, lookup, reap
void steps(const Settings& s, lim::Segment& seg);        // steps.md: the cost of each step
void lim_only(const Settings& s, lim::Segment& seg);     // lim_only.tsv: family, ns (no baselines)

// The regression guard: key ratios printed to stdout, never judged.
void guard(lim::Segment& seg);

// Runs family `name`'s lim op (or its first baseline of `kind`) `iters` times, explicit time:
// what scripts/bench.sh runs under callgrind for the instruction breakdown.
void run_op(lim::Segment& seg, const std::string& family, const std::string& kind, long iters);

}  // namespace lim_bench
