// lim::Segment: create, attach, inspect, remove; the process table across threads and fork().
#include <sys/stat.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "lim/lim.hpp"
#include "shm/process_table.hpp"
#include "shm/records.hpp"
#include "shm/segment_state.hpp"
#include "support/process.hpp"

using namespace lim;
using lim::test::SegmentGuard;
using lim::test::unique_name;

namespace {

// The process-table slots that are live or retired, as (pid, tid) pairs.
std::vector<std::pair<std::uint32_t, std::int32_t>> occupied_slots(const Segment& seg) {
    std::vector<std::pair<std::uint32_t, std::int32_t>> out;
    const auto& s = *seg.state();
    for (std::uint32_t i = 0; i < s.geometry().max_processes; ++i) {
        const auto w = s.slot(i).owner.load();
        const auto st = detail::SlotOwner::state(w);
        if (st == detail::SlotState::live || st == detail::SlotState::retired) {
            out.emplace_back(detail::SlotOwner::pid(w), s.slot(i).tid.load());
        }
    }
    return out;
}

}  // namespace

TEST_CASE("open_or_create creates a segment with the asked geometry and describes it") {
    SegmentGuard guard(unique_name("create"));
    const auto before = std::chrono::system_clock::now();
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 32, .max_processes = 64});
    const auto after = std::chrono::system_clock::now();

    CHECK(seg.is_creator());
    CHECK(seg.name() == guard.name());
    const SegmentInfo info = seg.info();
    CHECK(info.name == guard.name());
    CHECK(info.layout_version == detail::kLayoutVersion);
    CHECK(info.max_limiters == 32);
    CHECK(info.max_processes == 64);
    CHECK(info.limiters == 0);
    CHECK(info.processes == 1);
    CHECK(info.size_bytes == detail::geometry_for(32, 64).size_bytes);
    CHECK(info.created >= before - std::chrono::seconds{1});
    CHECK(info.created <= after + std::chrono::seconds{1});

    struct stat st {};
    REQUIRE(::stat(lim::test::segment_path(guard.name()).c_str(), &st) == 0);
    CHECK(static_cast<std::uint64_t>(st.st_size) == info.size_bytes);
}

TEST_CASE("open attaches to an existing segment and keeps its geometry") {
    SegmentGuard guard(unique_name("attach"));
    auto first = Segment::open_or_create(guard.name(), {.max_limiters = 16, .max_processes = 32});
    auto second = Segment::open(guard.name());
    CHECK_FALSE(second.is_creator());
    CHECK(second.info().max_limiters == 16);
    CHECK(second.info().created == first.info().created);

    // open_or_create on an existing segment adopts its geometry, whatever the options say.
    auto third = Segment::open_or_create(guard.name(), {.max_limiters = 999, .max_processes = 7});
    CHECK_FALSE(third.is_creator());
    CHECK(third.info().max_limiters == 16);
    CHECK(third.info().max_processes == 32);
}

TEST_CASE("remove unlinks the name; attached handles keep working") {
    const std::string name = unique_name("remove");
    auto seg = Segment::open_or_create(name);
    CHECK(Segment::remove(name));
    CHECK_FALSE(Segment::remove(name));
    try {
        Segment::open(name);
        FAIL("open of a removed segment must throw");
    } catch (const Error& e) {
        CHECK(e.code() == Errc::not_found);
    }
    CHECK(seg.info().name == name);  // the mapping outlives the name
    auto fresh = Segment::open_or_create(name);
    CHECK(fresh.is_creator());
    CHECK(Segment::remove(name));
}

TEST_CASE("segments are created 0600 by default and with the asked mode regardless of umask") {
    const mode_t old_mask = ::umask(077);
    {
        SegmentGuard guard(unique_name("mode"));
        Segment::open_or_create(guard.name());
        struct stat st {};
        REQUIRE(::stat(lim::test::segment_path(guard.name()).c_str(), &st) == 0);
        CHECK((st.st_mode & 0777) == 0600);
    }
    {
        SegmentGuard guard(unique_name("mode"));
        Segment::open_or_create(guard.name(), {.mode = 0660});
        struct stat st {};
        REQUIRE(::stat(lim::test::segment_path(guard.name()).c_str(), &st) == 0);
        CHECK((st.st_mode & 0777) == 0660);
    }
    ::umask(old_mask);
}

TEST_CASE(
    "each thread that holds gets its own slot; an empty slot is freed when the thread exits") {
    SegmentGuard guard(unique_name("threads"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 8});
    CHECK(occupied_slots(seg).size() == 1);  // the attaching thread

    std::atomic<std::uint32_t> other_slot{~0u};
    std::thread t([&] {
        const auto h = detail::holder(*seg.state());
        other_slot = h.slot_index;
        CHECK(occupied_slots(seg).size() == 2);
        CHECK(detail::holder(*seg.state()).slot_index == h.slot_index);  // cached, same slot
    });
    t.join();
    CHECK(other_slot != detail::holder(*seg.state()).slot_index);
    CHECK(occupied_slots(seg).size() == 1);  // freed at thread exit
    CHECK(seg.info().processes == 1);
}

TEST_CASE("a slot whose ledger is not empty is retired at thread exit and adopted later") {
    SegmentGuard guard(unique_name("retire"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 8});
    auto& s = *seg.state();
    const auto rec = detail::find_or_create_record(
        s, {.kind = detail::RecordKind::semaphore, .key = "r"}, nullptr);
    REQUIRE(rec.index == 0);
    std::uint32_t slot = 0;
    std::thread([&] {
        const auto h = detail::holder(s);
        slot = h.slot_index;
        h.entry(0).held[0].store(5);  // as if the thread exited holding 5 units of record 0
    }).join();
    const auto w = s.slot(slot).owner.load();
    CHECK(detail::SlotOwner::state(w) == detail::SlotState::retired);
    CHECK(detail::SlotOwner::pid(w) == static_cast<std::uint32_t>(::getpid()));

    std::thread([&] {
        const auto h = detail::holder(s);
        CHECK(h.slot_index == slot);  // the process's retired slot is adopted, not a new one
        CHECK(h.entry(0).held[0].load() == 5);
        h.entry(0).held[0].store(0);
    }).join();
    CHECK(detail::SlotOwner::state(s.slot(slot).owner.load()) == detail::SlotState::free);
}

TEST_CASE("a handle inherited across fork registers the child's own slot on first use") {
    SegmentGuard guard(unique_name("fork"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 8});
    const auto parent_slot = detail::holder(*seg.state()).slot_index;
    // The parent's cache now holds the mapping (so the child's check below is not vacuous).
    bool cached = false;
    for (const detail::HolderCacheEntry& e : detail::tl_holder_cache)
        cached |= e.uid == seg.state()->uid();
    REQUIRE(cached);

    int* child_ready = lim::test::shared_array<int>(2);
    const pid_t child = lim::test::fork_child([&] {
        // The fork hook emptied this thread's slot cache: no entry of the parent's survives.
        for (const detail::HolderCacheEntry& e : detail::tl_holder_cache) {
            if (e.uid != 0) return 9;
        }
        const auto h = detail::holder(*seg.state());
        if (h.slot_index == parent_slot) return 10;
        const auto w = h.slot->owner.load();
        if (detail::SlotOwner::pid(w) != static_cast<std::uint32_t>(::getpid())) return 11;
        if (h.slot->tid.load() != ::gettid()) return 12;
        if (detail::holder(*seg.state()).slot_index != h.slot_index) return 13;
        if (seg.info().processes != 2) return 14;
        __atomic_store_n(&child_ready[0], 1, __ATOMIC_SEQ_CST);
        while (__atomic_load_n(&child_ready[1], __ATOMIC_SEQ_CST) == 0)
            std::this_thread::yield();
        return 0;
    });
    while (__atomic_load_n(&child_ready[0], __ATOMIC_SEQ_CST) == 0)
        std::this_thread::yield();
    const auto slots = occupied_slots(seg);
    CHECK(slots.size() == 2);
    bool saw_child = false;
    for (auto [pid, tid] : slots)
        saw_child |= pid == static_cast<std::uint32_t>(child);
    CHECK(saw_child);
    __atomic_store_n(&child_ready[1], 1, __ATOMIC_SEQ_CST);
    CHECK(lim::test::wait_child(child) == 0);
    // The parent's slot is still the parent's.
    CHECK(detail::holder(*seg.state()).slot_index == parent_slot);
    CHECK(detail::SlotOwner::pid(seg.state()->slot(parent_slot).owner.load()) ==
          static_cast<std::uint32_t>(::getpid()));
}

TEST_CASE("closing the last handle frees the process's slots") {
    SegmentGuard guard(unique_name("close"));
    auto keeper = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 8});
    {
        auto second = Segment::open(guard.name());  // a second mapping: its own slot
        CHECK(occupied_slots(keeper).size() == 2);
    }
    CHECK(occupied_slots(keeper).size() == 1);
}
