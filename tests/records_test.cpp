// The record table: lock-free lookup by (kind, key), creation exactly once across processes.
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <string>
#include <vector>

#include "lim/lim.hpp"
#include "shm/records.hpp"
#include "shm/segment_state.hpp"
#include "support/process.hpp"

using namespace lim;
using detail::RecordKind;

namespace {
struct FakeConfig {
    std::uint64_t capacity;
    std::uint64_t other;
};
}  // namespace

TEST_CASE("a record is created once, found by kind and key, and keeps its configuration") {
    lim::test::SegmentGuard guard(lim::test::unique_name("records"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 8});
    auto& s = *seg.state();
    const FakeConfig cfg{8, 1};
    int inits = 0;
    const auto made = detail::find_or_create_record(s,
                                                    {.kind = RecordKind::semaphore,
                                                     .flavor = 3,
                                                     .key = "db",
                                                     .config = &cfg,
                                                     .config_size = sizeof cfg},
                                                    [&](detail::Record&) { ++inits; });
    CHECK(made.created);
    CHECK(inits == 1);
    CHECK(detail::record_key(*made.record) == "db");
    CHECK(made.record->header.flavor == 3);
    CHECK(detail::same_config(*made.record, &cfg, sizeof cfg));
    const FakeConfig other{9, 1};
    CHECK_FALSE(detail::same_config(*made.record, &other, sizeof other));

    const auto again = detail::find_or_create_record(
        s,
        {.kind = RecordKind::semaphore, .key = "db", .config = &other, .config_size = sizeof other},
        [&](detail::Record&) { ++inits; });
    CHECK_FALSE(again.created);
    CHECK(again.index == made.index);
    CHECK(inits == 1);

    // Same key, another kind: another record (a Dispatch and a BackoffWindow share API names).
    const auto window = detail::find_or_create_record(
        s, {.kind = RecordKind::backoff_window, .key = "db"}, nullptr);
    CHECK(window.created);
    CHECK(window.index != made.index);
    CHECK(detail::find_record(s, RecordKind::semaphore, "db") == made.index);
    CHECK(detail::find_record(s, RecordKind::backoff_window, "db") == window.index);
    CHECK_FALSE(detail::find_record(s, RecordKind::dispatch, "db").has_value());
    CHECK(seg.info().limiters == 2);
}

TEST_CASE("lookups find every record of a full table") {
    lim::test::SegmentGuard guard(lim::test::unique_name("records-many"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 500, .max_processes = 4});
    auto& s = *seg.state();
    for (int i = 0; i < 500; ++i) {
        detail::find_or_create_record(
            s, {.kind = RecordKind::limiter, .key = "key:" + std::to_string(i)}, nullptr);
    }
    for (int i = 0; i < 500; ++i) {
        const auto found = detail::find_record(s, RecordKind::limiter, "key:" + std::to_string(i));
        REQUIRE(found.has_value());
        CHECK(detail::record_key(s.record(*found)) == "key:" + std::to_string(i));
    }
    CHECK_FALSE(detail::find_record(s, RecordKind::limiter, "key:500").has_value());
}

TEST_CASE("16 processes creating the same keys at once: each key is created exactly once") {
    constexpr int kProcs = 16;
    constexpr int kKeys = 20;
    lim::test::SegmentGuard guard(lim::test::unique_name("records-race"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 64, .max_processes = 64});
    auto* created = lim::test::shared_array<std::atomic<int>>(kKeys);
    auto* index = lim::test::shared_array<std::atomic<int>>(kProcs * kKeys);
    int gate[2];
    REQUIRE(::pipe(gate) == 0);
    std::vector<pid_t> kids;
    for (int p = 0; p < kProcs; ++p) {
        kids.push_back(lim::test::fork_child([&, p] {
            ::close(gate[1]);
            char c;
            while (::read(gate[0], &c, 1) > 0) {
            }
            for (int k = 0; k < kKeys; ++k) {
                const auto r = detail::find_or_create_record(
                    *seg.state(), {.kind = RecordKind::semaphore, .key = "k" + std::to_string(k)},
                    nullptr);
                if (r.created) created[k].fetch_add(1);
                index[p * kKeys + k].store(static_cast<int>(r.index));
            }
            return 0;
        }));
    }
    ::close(gate[0]);
    ::close(gate[1]);
    for (pid_t k : kids)
        CHECK(lim::test::wait_child(k) == 0);
    for (int k = 0; k < kKeys; ++k) {
        CHECK(created[k].load() == 1);
        for (int p = 1; p < kProcs; ++p)
            CHECK(index[p * kKeys + k].load() == index[k].load());
    }
    CHECK(seg.info().limiters == kKeys);
}
