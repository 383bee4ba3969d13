// What the steps an operation is made of cost on this machine, each alone in a loop: the
// vocabulary of the breakdown in docs/benchmarks.md.
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <functional>

#include "baselines/mutex_baselines.hpp"
#include "lim/lim.hpp"
#include "suite/scenarios.hpp"

namespace lim_bench {

void steps(const Settings& s, lim::Segment& seg) {
    auto* f = make_shared_object<FloorWord>();
    auto* w = make_shared_object<FloorWord>();
    auto* m = make_shared_object<RobustMutex>();
    auto sem = lim::Semaphore::open(seg, "steps.sem", {.capacity = 1 << 20});
    struct Step {
        const char* what;
        Op op;
    };
    const std::vector<Step> list{
        {"`fetch_add` + `fetch_sub` on a shared word (the Dispatch floor)",
         [f] {
             f->fetch_add_pair();
             return true;
         }},
        {"one CAS take on a shared word (`lock cmpxchg`, uncontended)",
         [f] { return f->cas_take(~std::uint64_t{0} - 1); }},
        {"a `seq_cst` store (`xchg`)",
         [w] {
             w->word.store(1, std::memory_order_seq_cst);
             return true;
         }},
        {"a relaxed store + load (a ledger store that needs no fence)",
         [w] {
             w->word.store(2, std::memory_order_relaxed);
             return w->word.load(std::memory_order_relaxed) == 2;
         }},
        {"robust mutex lock + unlock, uncontended",
         [m] {
             m->lock();
             m->unlock();
             return true;
         }},
        {"`lim::Clock::now()` (vDSO `clock_gettime`, called through liblim)",
         [] { return lim::to_nanos(lim::Clock::now()) > 0; }},
        {"`clock_gettime(CLOCK_MONOTONIC)` called directly",
         [] {
             timespec ts{};
             ::clock_gettime(CLOCK_MONOTONIC, &ts);
             return ts.tv_sec >= 0;
         }},
        {"a system call (`getpid` by `syscall`)", [] { return ::syscall(SYS_getpid) > 0; }},
        {"a call into liblim that reads one word (`Semaphore::in_use`)",
         [&sem] { return sem.in_use() < (1u << 30); }},
        {"the harness's own call of an operation (`std::function`, empty body)",
         [] { return true; }},
    };
    Report r(s, "steps");
    std::vector<std::vector<std::string>> rows;
    for (const Step& st : list)
        rows.push_back({st.what, fmt_ns(ns_per_op(st.op, s.quick ? 3 : 7,
                                                  std::chrono::milliseconds{s.quick ? 20 : 60}))});
    r.table({"step", "ns"}, rows);
}

}  // namespace lim_bench
