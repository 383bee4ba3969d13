// lim_suite: lim against what a user would pick instead, one scenario per argument. Run by
// scripts/bench.sh, which assembles docs/benchmarks.md from the fragments it writes.
//
//   lim_suite [--quick] [--out DIR] [--redis-port P] [--command TEXT] SCENARIO...
//       SCENARIO: uncontended contended handoff sigstop records steps all, and lim_only (the
//       lim rows of uncontended as TSV: bench.sh runs it in a shared and a static build)
//   lim_suite guard                          the CI regression guard: key ratios, printed
//   lim_suite op FAMILY KIND ITERATIONS      one op in a loop, for callgrind (KIND: lim, floor,
//                                            mutex)
//
// Exit status: 0 when every scenario ran, 1 when one could not run (never on a slow figure).
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "lim/segment.hpp"
#include "suite/scenarios.hpp"

namespace {

// A segment private to this run, removed on every exit path.
struct ScratchSegment {
    std::string name = "limbench-" + std::to_string(::getpid());
    lim::Segment seg;
    ScratchSegment()
        : seg((lim::Segment::remove(name),
               lim::Segment::open_or_create(name, {.max_limiters = 512, .max_processes = 1024}))) {}
    ~ScratchSegment() { lim::Segment::remove(name); }
};

int usage() {
    std::fprintf(stderr,
                 "usage: lim_suite [--quick] [--out DIR] [--redis-port P] [--command TEXT] "
                 "uncontended|contended|handoff|sigstop|records|steps|all...\n"
                 "       lim_suite guard\n"
                 "       lim_suite op FAMILY lim|floor|mutex ITERATIONS\n");
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    using namespace lim_bench;
    std::vector<std::string> args(argv + 1, argv + argc);
    Settings s;
    std::vector<std::string> scenarios;
    try {
        if (!args.empty() && args[0] == "guard") {
            ScratchSegment scratch;
            guard(scratch.seg);
            return 0;
        }
        if (!args.empty() && args[0] == "op") {
            if (args.size() != 4) return usage();
            ScratchSegment scratch;
            run_op(scratch.seg, args[1], args[2], std::stol(args[3]));
            return 0;
        }
        for (std::size_t i = 0; i < args.size(); ++i) {
            const std::string& a = args[i];
            const bool has_value = i + 1 < args.size();
            if (a == "--quick") {
                s.quick = true;
            } else if (a == "--out" && has_value) {
                s.out_dir = args[++i];
            } else if (a == "--redis-port" && has_value) {
                s.redis_port = std::stoi(args[++i]);
            } else if (a == "--command" && has_value) {
                s.command = args[++i];
            } else if (a == "all") {
                scenarios.insert(scenarios.end(), {"steps", "uncontended", "contended", "handoff",
                                                   "sigstop", "records"});
            } else if (!a.empty() && a[0] != '-') {
                scenarios.push_back(a);
            } else {
                return usage();
            }
        }
        if (scenarios.empty()) return usage();
        ScratchSegment scratch;
        for (const std::string& sc : scenarios) {
            std::fprintf(stderr, "lim_suite: %s\n", sc.c_str());
            if (sc == "uncontended")
                uncontended(s, scratch.seg);
            else if (sc == "contended")
                contended(s, scratch.seg);
            else if (sc == "handoff")
                handoff(s, scratch.seg);
            else if (sc == "sigstop")
                sigstop(s, scratch.seg);
            else if (sc == "records")
                records(s);
            else if (sc == "steps")
                steps(s, scratch.seg);
            else if (sc == "lim_only")
                lim_only(s, scratch.seg);
            else
                return usage();
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "lim_suite: %s\n", e.what());
        return 1;
    }
    return 0;
}
