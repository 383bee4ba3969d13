// A weighted layer's reset refused after a holder thawed its word (docs/design.md, "Reset", "A
// reset refused after it reset some of a multi-word record's words"): the reset must leave the
// queue exactly as it was. The resetter (a real process running Segment::reset) is stopped just
// before its CAS on the word, the word frozen; a holder (this process) waits aside on the word
// past kFrozenBreakTimeout and thaws it, as Hold::step_aside does for a stopped reaper; a third
// process announces an operation on the record, so that the reset's retry is refused (busy).
//
// How the interleaving is forced: the window between the reset's look at the word and its CAS is a
// few instructions wide, so the resetting child sets detail::weighted_reset_hook (called there,
// null outside tests) to raise(SIGSTOP) on itself, and this process waits until it is stopped.
//
// Before: the reset emptied the queue (head := tail) before its CAS, so the CAS that found the word
// thawed left the queue empty under a word that still counted the queued ticket; the waiter, its
// ticket dropped, queued again: two counted, one waiting. Once it had been admitted and had left,
// the word still counted a phantom waiter: try_acquire of a free unit refused (FIFO fairness) until
// the next reap or reset. Now the reset CASes the word first (its queued count and kFrozen kept)
// and drops the queue only once that CAS has landed: a CAS that finds the word thawed leaves the
// record as it was.
//
// Each case runs for a WeightedSemaphore, a packed Dispatch (the queued count in its one word) and
// an unpacked one (in its byte word), with the other interleavings of the new order (kCases): the
// resetter stopped after that CAS landed, a holder thawing the word (the reset has landed; the
// queue is left as it is, the waiter keeps its ticket), and the resetter SIGKILLed before or after
// that CAS (a reap then recounts the record its dead slot announced). In every case, once the
// waiter has been admitted and has left, nobody is counted as queued and a free unit is taken at
// once.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "dispatch/dispatch_state.hpp"
#include "lim/lim.hpp"
#include "primitives/weighted_semaphore_state.hpp"
#include "recovery/kind_ops.hpp"
#include "shm/ledger.hpp"
#include "shm/process_table.hpp"
#include "shm/records.hpp"
#include "support/crash_segment.hpp"
#include "support/process.hpp"

using namespace lim;
using namespace std::chrono_literals;
using lim::test::Flag;
using lim::test::ledger_sum;
using lim::test::make_flag;

namespace {

// Called first in every child: a child left waiting by a failed check dies with this process
// instead of outliving the run.
void die_with_parent() {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
}

// The resetting child's hook: it stops itself once, at step `stop_step` (0: just before its first
// CAS on the word; 1: that CAS landed, just before it looks at the word again and drops the queue).
std::atomic<int> stop_step{-1};
void stop_once(int step) noexcept {
    int expected = step;
    if (stop_step.compare_exchange_strong(expected, -1)) ::raise(SIGSTOP);
}

// A child that force-resets `key`, stopping itself at `step`. Exits 0 if its reset landed, 1 if it
// was refused (busy), 2 on any other outcome.
pid_t fork_resetter(Segment& seg, const char* key, int step) {
    return lim::test::fork_child([&seg, key, step] {
        die_with_parent();
        stop_step.store(step);
        detail::weighted_reset_hook.store(stop_once);
        try {
            seg.reset({.key = key, .force = true});
            return 0;
        } catch (const Error& e) {
            return e.code() == Errc::busy ? 1 : 2;
        }
    });
}

// Whether `pid` stopped (false if it exited first: its status is left for wait_child).
bool wait_stopped(pid_t pid) {
    siginfo_t info{};
    return ::waitid(P_PID, static_cast<id_t>(pid), &info, WSTOPPED | WEXITED | WNOWAIT) == 0 &&
           info.si_code == CLD_STOPPED;
}

// A queue's control words and the word, to compare before and after a refused reset.
struct QueueState {
    std::uint64_t word, head, tail;
};
QueueState queue_state(const std::atomic<std::uint64_t>& word, const detail::WeightedQueue& q) {
    return {word.load() & ~detail::kFrozen, q.head.load(), q.tail.load()};
}

// How the stopped resetter goes on.
enum class Outcome {
    // Stopped before its first CAS; a holder thaws the word; continued, its CAS fails, and its
    // retry is refused (a third process announced on the record): the record exactly as it was.
    refused,
    // Stopped after its first CAS landed; a holder thaws the word; continued, it leaves the queue
    // (live again) as it was: the reset landed, the waiter keeps its turn.
    landed_queue_kept,
    // SIGKILLed where it stopped; a holder thaws the word (the recovery lock now free), and a reap
    // recounts the record (the dead resetter's slot announced it).
    killed,
};

// The staging shared by the cases. A child holds the whole budget (`take_all`, given back by
// `give_all`); a child waits for part of it (`wait_for`: queued at the head of the byte queue,
// then gives back at once); a child announces on the record on demand. A resetting child stops at
// its hook (`step`) and goes on as `outcome` says. Once the waiter has been admitted and has left,
// nobody may be counted as queued, and a free unit must be taken at once.
struct Staging {
    Segment& seg;
    std::uint32_t record;
    std::atomic<std::uint64_t>& word;  // the word that carries the queued count
    detail::WeightedQueue& queue;
    const char* key;
    std::function<void()> warm;             // gives the calling thread a slot
    std::function<void()> take_all;         // takes the whole budget (blocking)
    std::function<void()> give_all;         // gives it back (nothing if a reset forgot it)
    std::function<void()> wait_for;         // queues for part of it, then gives it back at once
    std::function<std::uint32_t()> queued;  // the queued count the public API shows
    std::function<bool()> try_one;          // try_acquire of one free unit (kept)

    void run(int step, Outcome outcome) {
        detail::SegmentState& state = *seg.state();
        // A live slot mid-operation on the record, on announce(): the reset's retry refuses.
        lim::test::AnnouncingChild staged(state, record, [&] {
            die_with_parent();
            warm();
        });
        Flag* held = make_flag();
        Flag* give_go = make_flag();
        const pid_t holder = lim::test::fork_child([&] {
            die_with_parent();
            take_all();
            held->set();
            give_go->wait();
            give_all();
            return 0;
        });
        held->wait();
        Flag* admitted = make_flag();
        const pid_t waiter = lim::test::fork_child([&] {
            die_with_parent();
            wait_for();
            admitted->set();
            return 0;
        });
        // Queued: counted in the word, then its ticket taken (tail) and written to the ring.
        REQUIRE(lim::test::eventually([&] {
            const std::uint64_t t = queue.tail.load() - 1;
            return queued() == 1 && queue.head.load() == t &&
                   detail::RingEntry::is(queue.ring[t % detail::kRingSize].load(), t,
                                         detail::RingState::waiting);
        }));
        const QueueState before = queue_state(word, queue);

        const pid_t resetter = fork_resetter(seg, key, step);
        REQUIRE(wait_stopped(resetter));  // at its hook, the word frozen
        CHECK(detail::is_frozen(word.load()));
        if (outcome == Outcome::killed) lim::test::kill_and_wait(resetter);
        {
            // A holder waiting aside breaks the freeze (Hold::step_aside): after 200 ms while the
            // stopped resetter holds the recovery lock, after 20 ms once it is dead.
            detail::Hold hold(state, record);
            hold.wait_while_frozen(word, state);
        }
        CHECK_FALSE(detail::is_frozen(word.load()));
        if (outcome == Outcome::refused) staged.announce();
        if (outcome != Outcome::killed) {
            ::kill(resetter, SIGCONT);
            CHECK(lim::test::wait_child(resetter) == (outcome == Outcome::refused ? 1 : 0));
        }
        if (outcome == Outcome::refused) {
            // Refused: the record as it was, the waiter's ticket still queued at the head.
            const QueueState after = queue_state(word, queue);
            CHECK(after.head == before.head);  // before: moved to the tail (the ticket dropped)
            CHECK(after.tail == before.tail);
            CHECK(after.word == before.word);
            CHECK(queued() == 1);
            CHECK(admitted->value.load() == 0);  // still no room
            give_go->set();
            CHECK(lim::test::wait_child(holder) == 0);
        } else {
            if (outcome == Outcome::landed_queue_kept) {
                const QueueState after = queue_state(word, queue);
                CHECK(after.tail == before.tail);  // no ticket taken again
            } else {
                seg.reap();  // recounts the record the dead resetter announced
            }
            // The units were reset (the holder's forgotten): the waiter is admitted.
            REQUIRE(lim::test::eventually([&] { return admitted->value.load() == 1; }));
            CHECK(queue.tail.load() == before.tail);  // admitted with its first ticket
            give_go->set();
            CHECK(lim::test::wait_child(holder) == 0);
        }
        CHECK(staged.finish() == 0);
        REQUIRE(lim::test::eventually([&] { return admitted->value.load() == 1; }));
        CHECK(lim::test::wait_child(waiter) == 0);
        // Nobody waits now: nobody is counted as queued, and a free unit is taken at once.
        CHECK(queued() == 0);  // before (refused): 1, the dropped ticket
        CHECK(try_one());      // before (refused): refused behind the phantom waiter
    }
};

// The cases every kind runs: where the resetter stops, and how it goes on.
struct Case {
    int step;
    Outcome outcome;
    const char* name;
};
constexpr Case kCases[] = {
    {0, Outcome::refused, "stopped before its CAS, then refused"},
    {1, Outcome::landed_queue_kept, "stopped after its CAS, the word thawed"},
    {0, Outcome::killed, "killed before its CAS"},
    {1, Outcome::killed, "killed after its CAS"},
};

}  // namespace

TEST_CASE("a weighted semaphore's reset refused after a holder thawed its word keeps its queue") {
    lim::test::SegmentGuard guard(lim::test::unique_name("rq-ws"));
    auto seg = lim::test::own_reaps_segment(guard);
    auto ws = WeightedSemaphore::open(seg, "bytes", {.capacity = 10});
    detail::SegmentState& state = *seg.state();
    const auto record =
        *detail::find_record(state, detail::RecordKind::weighted_semaphore, "bytes");
    auto& layer =
        reinterpret_cast<detail::WeightedSemaphoreBody*>(state.record(record).body)->layer;
    for (const Case& c : kCases) {
        INFO(std::string(c.name));
        Staging{.seg = seg,
                .record = record,
                .word = layer.word,
                .queue = layer.queue,
                .key = "bytes",
                .warm =
                    [&] {
                        if (ws.try_acquire(1)) ws.release(1);
                    },
                .take_all = [&] { ws.acquire(10); },
                .give_all =
                    [&] {
                        try {
                            ws.release(10);
                        } catch (const Error&) {
                            // Forgotten by a reset that landed: nothing to give back.
                        }
                    },
                .wait_for =
                    [&] {
                        ws.acquire(5);
                        ws.release(5);
                    },
                .queued = [&] { return ws.waiters(); },
                .try_one = [&] { return ws.try_acquire(1); }}
            .run(c.step, c.outcome);
        CHECK(ws.in_use() == 1);
        CHECK(static_cast<std::int64_t>(ws.in_use()) == ledger_sum(state, record, 0));
        if (ws.in_use() == 1) ws.release(1);
        CHECK(ws.in_use() == 0);
    }
}

namespace {

// A Dispatch of `budget` bytes: packed (the queued count in its one word) or not (in its byte
// word, reset after its concurrency word: a refusal there restores only the byte layer's ledgers).
void dispatch_cases(const char* stem, std::uint64_t budget, bool packed) {
    lim::test::SegmentGuard guard(lim::test::unique_name(stem));
    auto seg = lim::test::own_reaps_segment(guard);
    auto d = Dispatch::open(seg, {.limiter = BackoffWindow::for_key(seg, "api"),
                                  .key = "api",
                                  .concurrency = 4,
                                  .byte_budget = budget});
    detail::SegmentState& state = *seg.state();
    const auto record = *detail::find_record(state, detail::RecordKind::dispatch, "api");
    REQUIRE(detail::is_packed(*reinterpret_cast<const detail::DispatchConfig*>(
                state.record(record).config)) == packed);
    auto& body = *reinterpret_cast<detail::DispatchBody*>(state.record(record).body);
    for (const Case& c : kCases) {
        INFO(std::string(c.name));
        std::optional<Permit> all;
        std::optional<Permit> one;
        Staging{.seg = seg,
                .record = record,
                .word = packed ? body.concurrency : body.bytes.word,
                .queue = body.bytes.queue,
                .key = "api",
                .warm = [&] { d.acquire(0).release(); },
                .take_all = [&] { all.emplace(d.acquire(budget)); },
                .give_all = [&] { all->release(); },
                .wait_for = [&] { d.acquire(budget / 2).release(); },
                .queued = [&] { return d.snapshot().bytes_waiters; },
                .try_one =
                    [&] {
                        one = d.try_acquire(1);
                        return one.has_value();
                    }}
            .run(c.step, c.outcome);
        CHECK(d.snapshot().bytes_in_flight == 1);
        CHECK(d.snapshot().in_flight == 1);
        CHECK(ledger_sum(state, record, detail::kDispatchBytesLayer) == 1);
        one.reset();
        CHECK(d.snapshot().bytes_in_flight == 0);
        CHECK(d.snapshot().in_flight == 0);
    }
}

}  // namespace

TEST_CASE("a packed Dispatch's reset refused after a holder thawed its word keeps its byte queue") {
    dispatch_cases("rq-d", 1000, true);
}

TEST_CASE(
    "an unpacked Dispatch's reset refused after a holder thawed its byte word keeps its queue") {
    dispatch_cases("rq-du", std::uint64_t{1} << 33, false);
}
