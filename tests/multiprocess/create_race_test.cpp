// 32 processes call open_or_create on the same name at the same instant, 100 times over:
// exactly one initialises, and all of them attach to that one segment.
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <vector>

#include "lim/lim.hpp"
#include "shm/segment_state.hpp"
#include "support/process.hpp"

using namespace lim;

namespace {

constexpr int kProcesses = 32;
constexpr int kRounds = 100;

struct Report {
    std::atomic<int> creator;           // 1 if this process's call initialised the segment
    std::atomic<std::int64_t> created;  // the segment's creation stamp, as this process saw it
    std::atomic<std::int64_t> size;
    std::atomic<std::int64_t> header_address;  // not compared: just proves it mapped
};

struct Shared {
    Report reports[kProcesses];
};

}  // namespace

TEST_CASE("concurrent open_or_create: exactly one initialiser, one segment, 100 rounds") {
    auto* shared = lim::test::shared_array<Shared>(1);
    for (int round = 0; round < kRounds; ++round) {
        lim::test::SegmentGuard guard(lim::test::unique_name("race"));
        new (shared) Shared{};
        // The children block reading a pipe; closing its write end releases all of them at once.
        int gate[2];
        REQUIRE(::pipe(gate) == 0);
        std::vector<pid_t> children;
        for (int i = 0; i < kProcesses; ++i) {
            children.push_back(lim::test::fork_child([&, i] {
                ::close(gate[1]);
                char c;
                while (::read(gate[0], &c, 1) > 0) {
                }
                auto seg =
                    Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 64});
                Report& r = shared->reports[i];
                r.creator = seg.is_creator() ? 1 : 0;
                r.created = seg.info().created.time_since_epoch().count();
                r.size = static_cast<std::int64_t>(seg.info().size_bytes);
                return 0;
            }));
        }
        ::close(gate[0]);
        ::close(gate[1]);
        int failures = 0;
        for (pid_t pid : children)
            failures += lim::test::wait_child(pid) != 0;
        REQUIRE(failures == 0);

        int creators = 0;
        for (const Report& r : shared->reports)
            creators += r.creator.load();
        CHECK(creators == 1);
        const std::int64_t created = shared->reports[0].created.load();
        for (const Report& r : shared->reports) {
            CHECK(r.created.load() == created);
            CHECK(r.size.load() ==
                  static_cast<std::int64_t>(detail::geometry_for(8, 64).size_bytes));
        }
        // And the segment they built is valid for a newcomer.
        auto seg = Segment::open(guard.name());
        CHECK(seg.info().created.time_since_epoch().count() == created);
        if (creators != 1) break;
    }
}
