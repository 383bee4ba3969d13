// A process killed while creating the segment or a record leaves nothing that blocks others.
#include <signal.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>

#include "lim/lim.hpp"
#include "shm/file_lock.hpp"
#include "shm/names.hpp"
#include "shm/records.hpp"
#include "shm/segment_state.hpp"
#include "support/process.hpp"

#include <boost/interprocess/shared_memory_object.hpp>

using namespace lim;
namespace bip = boost::interprocess;

namespace {
// Forks a child that runs `grab` (taking some lock) and then stops forever; returns once the
// child reported that it holds what it grabbed.
pid_t child_that_dies_holding(const std::function<void()>& grab) {
    auto* held = lim::test::shared_array<std::atomic<int>>(1);
    new (held) std::atomic<int>{0};
    const pid_t pid = lim::test::fork_child([&] {
        grab();
        held->store(1);
        for (;;)
            ::pause();
        return 0;
    });
    while (held->load() == 0)
        ::usleep(100);
    return pid;
}
}  // namespace

TEST_CASE("a creator killed while initialising the segment does not block later creators") {
    lim::test::SegmentGuard guard(lim::test::unique_name("init-death"));
    const std::string object = detail::shm_object_name(guard.name());
    // The child creates the object and takes the init lock, as a creator does, then is killed.
    const pid_t child = child_that_dies_holding([&] {
        static bip::shared_memory_object shm(bip::create_only, object.c_str(), bip::read_write);
        static auto lock =
            detail::FileLock::try_lock(shm.get_mapping_handle().handle, detail::LockByte::init);
        if (!lock) ::_exit(50);
    });
    {
        bip::shared_memory_object probe(bip::open_only, object.c_str(), bip::read_only);
        CHECK(
            detail::FileLock::is_locked(probe.get_mapping_handle().handle, detail::LockByte::init));
    }
    ::kill(child, SIGKILL);
    CHECK(lim::test::wait_child(child) == 128 + SIGKILL);
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 4});
    CHECK(seg.is_creator());  // it found the abandoned object and initialised it
}

TEST_CASE("a record creator killed while holding the record lock does not block others") {
    lim::test::SegmentGuard guard(lim::test::unique_name("record-death"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 8});
    const pid_t child = child_that_dies_holding([&] {
        static auto lock =
            detail::FileLock::lock_exclusive(seg.state()->fd(), detail::LockByte::records);
    });
    // While the child lives the lock is held (creation would wait); its death releases it.
    CHECK(detail::FileLock::is_locked(seg.state()->fd(), detail::LockByte::records));
    ::kill(child, SIGKILL);
    CHECK(lim::test::wait_child(child) == 128 + SIGKILL);
    CHECK_FALSE(detail::FileLock::is_locked(seg.state()->fd(), detail::LockByte::records));
    const auto r = detail::find_or_create_record(
        *seg.state(), {.kind = detail::RecordKind::semaphore, .key = "after"}, nullptr);
    CHECK(r.created);
}

TEST_CASE("a record left half-created by a dead creator is reused, not duplicated") {
    lim::test::SegmentGuard guard(lim::test::unique_name("record-half"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 8});
    auto& s = *seg.state();
    // What a creator leaves when it dies after claiming record 0 but before publishing it.
    s.header().records_used.store(1);
    const auto r = detail::find_or_create_record(
        s, {.kind = detail::RecordKind::semaphore, .key = "k"}, nullptr);
    CHECK(r.created);
    CHECK(r.index == 0);
    CHECK(s.records_used() == 1);
}
