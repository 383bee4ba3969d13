// What the crash tests that stage a reap or a reset by hand share: a segment in which nothing
// reaps but the test, the sum the live ledgers show for a record, and a process whose slot is
// in the middle of an operation on a record when the test says so.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>

#include "lim/segment.hpp"
#include "shm/ledger.hpp"
#include "shm/process_table.hpp"
#include "support/process.hpp"

namespace lim::test {

// A segment of 8 records and 32 process slots in which no reap runs but the test's own: none
// after a blocked wait (`reap_after` 0) and none on attach.
inline Segment own_reaps_segment(const SegmentGuard& guard) {
    return Segment::open_or_create(guard.name(), {.max_limiters = 8,
                                                  .max_processes = 32,
                                                  .reap_after = std::chrono::seconds{0},
                                                  .reap_on_attach = false});
}

// What the occupied slots' ledgers show for `record`'s `layer`: what the live processes hold once
// the dead have been reaped.
inline std::int64_t ledger_sum(const detail::SegmentState& state, std::uint32_t record,
                               int layer = 0) {
    std::int64_t sum = 0;
    for (std::uint32_t i = 0; i < state.geometry().max_processes; ++i) {
        if (!detail::slot_is_occupied(state.slot(i).owner.load())) continue;
        sum += detail::holding(state.ledger(i, record), layer);
    }
    return sum;
}

// A child process that stands for a live slot in the middle of an operation on `record`: a
// reset's retry refuses a record on which a live slot has announced. The child runs `warm` (so
// that its thread's slot is claimed before the test freezes anything), and the constructor
// returns once it has; on announce() the child opens a QuickHold on the record and keeps it open
// until finish().
class AnnouncingChild {
  public:
    AnnouncingChild(detail::SegmentState& state, std::uint32_t record,
                    const std::function<void()>& warm)
        : announce_go_(make_flag()), announced_(make_flag()), close_go_(make_flag()) {
        Flag* warmed = make_flag();
        pid_ = fork_child([&] {
            warm();
            warmed->set();
            announce_go_->wait();
            detail::QuickHold hold;
            if (!hold.open(state, record)) return 20;
            announced_->set();
            close_go_->wait();
            hold.close();
            return 0;
        });
        warmed->wait();
    }
    // Returns once the child's slot has announced the record.
    void announce() {
        announce_go_->set();
        announced_->wait();
    }
    // Lets the child (announcing first if it has not) close its hold and exit; returns its exit
    // status: 0, or 20 if its QuickHold could not open.
    int finish() {
        announce_go_->set();
        close_go_->set();
        return wait_child(pid_);
    }

  private:
    Flag* announce_go_;
    Flag* announced_;
    Flag* close_go_;
    pid_t pid_ = -1;
};

}  // namespace lim::test
