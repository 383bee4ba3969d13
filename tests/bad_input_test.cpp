// Bad input of every kind gives a clear lim::Error with the right code, never a crash, and leaves
// the segment exactly as it was.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "inspect/snapshot.hpp"
#include "lim/consumed_limiter.hpp"
#include "lim/lim.hpp"
#include "limiter/limiter_state.hpp"
#include "shm/layout.hpp"
#include "shm/records.hpp"
#include "shm/segment_state.hpp"
#include "support/process.hpp"

using namespace lim;
using lim::test::SegmentGuard;
using lim::test::unique_name;

namespace {

// Runs `call`, requires that it throws lim::Error with `code`, and returns the message.
std::string expect_error(Errc code, const std::function<void()>& call) {
    try {
        call();
    } catch (const Error& e) {
        CHECK_MESSAGE(e.code() == code, "got " << to_string(e.code()) << ": " << e.what());
        CHECK(std::string(e.what()).size() > 10);
        return e.what();
    }
    FAIL("expected lim::Error(" << to_string(code) << ")");
    return {};
}

// Overwrites `size` bytes at `offset` of the segment's file.
void poke(const std::string& name, off_t offset, const void* data, std::size_t size) {
    const int fd = ::open(lim::test::segment_path(name).c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    REQUIRE(::pwrite(fd, data, size, offset) == static_cast<ssize_t>(size));
    ::close(fd);
}

void truncate_to(const std::string& name, off_t size) {
    REQUIRE(::truncate(lim::test::segment_path(name).c_str(), size) == 0);
}

// Creates a plain file under /dev/shm with `bytes` as its content.
void write_file(const std::string& name, const std::vector<unsigned char>& bytes) {
    const int fd = ::open(lim::test::segment_path(name).c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
    REQUIRE(fd >= 0);
    if (!bytes.empty()) {
        REQUIRE(::write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
    }
    ::close(fd);
}

}  // namespace

TEST_CASE("bad segment names are refused by every entry point") {
    const std::vector<std::string> bad = {
        "",
        std::string(201, 'a'),
        "a/b",
        "/leading",
        std::string("nul\0inside", 10),
        "with space",
        "tab\there",
        "new\nline",
        "star*",
        "caf\xc3\xa9",
    };
    for (const std::string& name : bad) {
        CAPTURE(name);
        expect_error(Errc::invalid_name, [&] { Segment::open_or_create(name); });
        expect_error(Errc::invalid_name, [&] { Segment::open(name); });
        expect_error(Errc::invalid_name, [&] { Segment::remove(name); });
    }
    // The longest allowed name works.
    SegmentGuard guard(std::string(200, 'n'));
    CHECK(Segment::open_or_create(guard.name()).is_creator());
}

TEST_CASE("every name SPEC allows ([A-Za-z0-9._-], 1..200) is accepted, dots included") {
    // "/dev/shm/lim.<name>" cannot leave /dev/shm without a '/', so "." and ".." are plain names.
    const std::string tag = unique_name("ok");
    for (const std::string& name :
         {tag + "..b", tag + "...", tag + "._-", std::string(".") + tag, "." + tag + ".",
          std::string(200 - tag.size(), '.') + tag, tag + "AZaz09"}) {
        CAPTURE(name);
        SegmentGuard guard(name);
        auto seg = Segment::open_or_create(name);
        CHECK(seg.is_creator());
        CHECK(seg.info().name == name);
        CHECK(Segment::open(name).info().name == name);
        CHECK(Segment::remove(name));
        CHECK_FALSE(Segment::remove(name));
    }
}

TEST_CASE("bad record keys are refused") {
    SegmentGuard guard(unique_name("keys"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 4});
    const auto before = lim::test::segment_file_bytes(guard.name());
    for (const std::string& key :
         {std::string(), std::string(65, 'k'), std::string("a/b"), std::string("a b"),
          std::string("nul\0x", 5), std::string("semi;colon")}) {
        CAPTURE(key);
        expect_error(Errc::invalid_name, [&] {
            detail::find_or_create_record(
                *seg.state(), {.kind = detail::RecordKind::semaphore, .key = key}, nullptr);
        });
    }
    CHECK(lim::test::segment_file_bytes(guard.name()) == before);
    // Every allowed character, at the maximum length.
    const std::string ok = "Az09._:-" + std::string(56, 'x');
    CHECK(detail::find_or_create_record(*seg.state(),
                                        {.kind = detail::RecordKind::semaphore, .key = ok}, nullptr)
              .created);
}

TEST_CASE("open of an absent segment is not_found") {
    const std::string name = unique_name("absent");
    const std::string what = expect_error(Errc::not_found, [&] { Segment::open(name); });
    CHECK(what.find(name) != std::string::npos);
}

TEST_CASE("options out of range are refused before anything is created") {
    struct Case {
        const char* what;
        SegmentOptions options;
    };
    const Case cases[] = {
        {"zero limiters", {.max_limiters = 0}},
        {"too many limiters", {.max_limiters = 70'000}},
        {"zero processes", {.max_processes = 0}},
        {"too many processes", {.max_processes = 70'000}},
        {"over 1 GiB", {.max_limiters = 65'536, .max_processes = 65'536}},
        {"mode without owner write", {.mode = 0400}},
        {"mode with file-type bits", {.mode = 0100600}},
        {"negative reap_after", {.reap_after = std::chrono::seconds{-1}}},
    };
    for (const Case& c : cases) {
        CAPTURE(c.what);
        const std::string name = unique_name("options");
        expect_error(Errc::invalid_argument, [&] { Segment::open_or_create(name, c.options); });
        struct stat st {};
        CHECK(::stat(lim::test::segment_path(name).c_str(), &st) != 0);  // nothing created
    }
}

TEST_CASE("damaged and foreign segments are refused, and left as they were") {
    using detail::SegmentHeader;
    struct Case {
        const char* what;
        Errc code;
        std::function<void(const std::string&)> damage;
    };
    const std::uint64_t bad_magic = 0x0123456789abcdefULL;
    const std::uint32_t other_version = detail::kLayoutVersion + 1;
    const std::uint64_t other_hash = detail::kLayoutHash ^ 1;
    const std::uint32_t bad_ready = 7;
    const std::uint32_t huge_count = 1'000'000;
    const std::uint32_t other_limiters = 5;
    const std::uint64_t wrong_offset = 12345;
    const Case cases[] = {
        {"truncated to half", Errc::corrupt_segment,
         [](const std::string& n) {
             truncate_to(n, static_cast<off_t>(detail::geometry_for(8, 8).size_bytes / 2));
         }},
        {"smaller than the header", Errc::corrupt_segment,
         [](const std::string& n) { truncate_to(n, 100); }},
        {"smaller than the header prefix", Errc::corrupt_segment,
         [](const std::string& n) { truncate_to(n, 10); }},
        {"wrong magic", Errc::corrupt_segment,
         [&](const std::string& n) {
             poke(n, offsetof(SegmentHeader, magic), &bad_magic, sizeof bad_magic);
         }},
        {"another layout version", Errc::version_mismatch,
         [&](const std::string& n) {
             poke(n, offsetof(SegmentHeader, layout_version), &other_version, 4);
         }},
        {"another layout hash", Errc::version_mismatch,
         [&](const std::string& n) {
             poke(n, offsetof(SegmentHeader, layout_hash), &other_hash, 8);
         }},
        {"garbage in the state word", Errc::corrupt_segment,
         [&](const std::string& n) { poke(n, offsetof(SegmentHeader, ready), &bad_ready, 4); }},
        {"records_used beyond the table", Errc::corrupt_segment,
         [&](const std::string& n) {
             poke(n, offsetof(SegmentHeader, records_used), &huge_count, 4);
         }},
        {"geometry that does not match the size", Errc::corrupt_segment,
         [&](const std::string& n) {
             poke(n, offsetof(SegmentHeader, max_limiters), &other_limiters, 4);
         }},
        {"an offset out of place", Errc::corrupt_segment,
         [&](const std::string& n) {
             poke(n, offsetof(SegmentHeader, slots_offset), &wrong_offset, 8);
         }},
        {"a header size that disagrees with the file", Errc::corrupt_segment,
         [&](const std::string& n) {
             const std::uint64_t size = detail::geometry_for(8, 8).size_bytes + 64;
             poke(n, offsetof(SegmentHeader, size_bytes), &size, 8);
         }},
    };
    for (const Case& c : cases) {
        CAPTURE(c.what);
        SegmentGuard guard(unique_name("damaged"));
        { Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 8}); }
        c.damage(guard.name());
        const auto before = lim::test::segment_file_bytes(guard.name());
        const std::string what = expect_error(c.code, [&] { Segment::open(guard.name()); });
        CHECK(what.find(guard.name()) != std::string::npos);
        expect_error(c.code, [&] { Segment::open_or_create(guard.name()); });
        CHECK(lim::test::segment_file_bytes(guard.name()) == before);
    }
}

TEST_CASE("a foreign file under the segment's name is refused and left alone") {
    SegmentGuard guard(unique_name("foreign"));
    std::vector<unsigned char> garbage(4096);
    for (std::size_t i = 0; i < garbage.size(); ++i)
        garbage[i] = static_cast<unsigned char>(i * 7 + 1);
    write_file(guard.name(), garbage);
    expect_error(Errc::corrupt_segment, [&] { Segment::open(guard.name()); });
    expect_error(Errc::corrupt_segment, [&] { Segment::open_or_create(guard.name()); });
    CHECK(lim::test::segment_file_bytes(guard.name()) == garbage);
}

TEST_CASE(
    "a segment abandoned before initialisation: open refuses it, open_or_create rebuilds it") {
    SegmentGuard guard(unique_name("abandoned"));
    write_file(guard.name(), {});  // what a creator leaves if it dies right after shm_open
    const std::string what =
        expect_error(Errc::corrupt_segment, [&] { Segment::open(guard.name()); });
    CHECK(what.find("never initialised") != std::string::npos);
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 4});
    CHECK(seg.is_creator());
    CHECK(seg.info().max_limiters == 4);

    // Also when it died after sizing the file but before publishing the header.
    SegmentGuard guard2(unique_name("abandoned"));
    write_file(guard2.name(), std::vector<unsigned char>(detail::geometry_for(4, 4).size_bytes, 0));
    CHECK(Segment::open_or_create(guard2.name(), {.max_limiters = 4, .max_processes = 4})
              .is_creator());
}

TEST_CASE("a full record table is refused with table_full and nothing changes") {
    SegmentGuard guard(unique_name("records-full"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 4});
    for (int i = 0; i < 4; ++i) {
        const std::string key = "k" + std::to_string(i);
        CHECK(detail::find_or_create_record(
                  *seg.state(), {.kind = detail::RecordKind::semaphore, .key = key}, nullptr)
                  .created);
    }
    const auto before = lim::test::segment_file_bytes(guard.name());
    const std::string what = expect_error(Errc::table_full, [&] {
        detail::find_or_create_record(
            *seg.state(), {.kind = detail::RecordKind::semaphore, .key = "k4"}, nullptr);
    });
    CHECK(what.find("max_limiters") != std::string::npos);
    CHECK(lim::test::segment_file_bytes(guard.name()) == before);
    // Existing records are still found.
    CHECK(detail::find_record(*seg.state(), detail::RecordKind::semaphore, "k3").has_value());
}

TEST_CASE("a full process table is refused with table_full and nothing changes") {
    SegmentGuard guard(unique_name("procs-full"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 2});
    int gate[2];
    REQUIRE(::pipe(gate) == 0);
    int* attached = lim::test::shared_array<int>(1);
    // A second process takes the second slot and keeps it.
    const pid_t holder = lim::test::fork_child([&] {
        ::close(gate[1]);
        auto mine = Segment::open(guard.name());
        __atomic_store_n(attached, 1, __ATOMIC_SEQ_CST);
        char c;
        while (::read(gate[0], &c, 1) > 0) {
        }
        return 0;
    });
    ::close(gate[0]);
    while (__atomic_load_n(attached, __ATOMIC_SEQ_CST) == 0)
        ::usleep(100);

    const auto before = lim::test::segment_file_bytes(guard.name());
    const pid_t third = lim::test::fork_child([&] {
        try {
            Segment::open(guard.name());
        } catch (const Error& e) {
            return e.code() == Errc::table_full ? 0 : 20;
        }
        return 21;
    });
    CHECK(lim::test::wait_child(third) == 0);
    CHECK(lim::test::segment_file_bytes(guard.name()) == before);
    ::close(gate[1]);
    CHECK(lim::test::wait_child(holder) == 0);
}

TEST_CASE("another user cannot open a 0600 segment, nor remove it") {
    if (::geteuid() != 0) {
        MESSAGE("not root: cannot switch to another uid, skipping");
        return;
    }
    SegmentGuard guard(unique_name("perm"));
    Segment::open_or_create(guard.name());
    const pid_t child = lim::test::fork_child([&] {
        if (::setgid(65534) != 0 || ::setuid(65534) != 0) return 30;
        try {
            Segment::open(guard.name());
            return 31;
        } catch (const Error& e) {
            if (e.code() != Errc::permission_denied) return 32;
        }
        try {
            Segment::remove(guard.name());
            return 33;
        } catch (const Error& e) {
            if (e.code() != Errc::permission_denied) return 34;
        }
        return 0;
    });
    CHECK(lim::test::wait_child(child) == 0);
    struct stat st {};
    CHECK(::stat(lim::test::segment_path(guard.name()).c_str(), &st) == 0);  // still there
}

// ---------------------------------------------------------------------------------------------
// Hostile neighbours: what another local user can plant under a segment's name in /dev/shm.
// ---------------------------------------------------------------------------------------------

namespace {

// Runs `body` in a forked child that SIGALRM kills after 60 s (far past the microseconds it
// takes, however loaded the machine), so that a call that blocks (as opening a FIFO did) fails
// the test instead of hanging it.
int in_child_with_alarm(const std::function<int()>& body) {
    const pid_t child = lim::test::fork_child([&] {
        ::alarm(60);
        return body();
    });
    return lim::test::wait_child(child);
}

int expect_code_in_child(Errc code, const std::function<void()>& call) {
    try {
        call();
        return 1;
    } catch (const Error& e) {
        return e.code() == code ? 0 : 2;
    } catch (...) {
        return 3;  // anything but lim::Error breaks the contract
    }
}

// Runs `body` as uid/gid 65534 (nobody) in a forked child; needs root.
int as_nobody(const std::function<int()>& body) {
    const pid_t child = lim::test::fork_child([&] {
        if (::setgid(65534) != 0 || ::setuid(65534) != 0) return 40;
        return body();
    });
    return lim::test::wait_child(child);
}

}  // namespace

TEST_CASE("a FIFO, symlink or directory under the name is refused at once, never opened") {
    SegmentGuard guard(unique_name("fifo"));
    SegmentGuard target(unique_name("target"));
    const std::string path = lim::test::segment_path(guard.name());
    SUBCASE("FIFO") {
        REQUIRE(::mkfifo(path.c_str(), 0666) == 0);
    }
    SUBCASE("symlink to a segment") {
        Segment::open_or_create(target.name());
        REQUIRE(::symlink(lim::test::segment_path(target.name()).c_str(), path.c_str()) == 0);
    }
    SUBCASE("dangling symlink") {
        REQUIRE(::symlink("/nonexistent", path.c_str()) == 0);
    }
    SUBCASE("directory") {
        REQUIRE(::mkdir(path.c_str(), 0700) == 0);
    }
    for (int call = 0; call < 3; ++call) {
        CAPTURE(call);
        CHECK(in_child_with_alarm([&] {
                  return expect_code_in_child(Errc::permission_denied, [&] {
                      if (call == 0) Segment::open(guard.name());
                      if (call == 1) Segment::open_or_create(guard.name());
                      if (call == 2) {
                          detail::SegmentState::attach(guard.name(), {}, false,
                                                       detail::Access::read_only);
                      }
                  });
              }) == 0);
    }
    struct stat st {};
    REQUIRE(::lstat(path.c_str(), &st) == 0);
    CHECK_FALSE(S_ISREG(st.st_mode));  // left as it was
    ::rmdir(path.c_str());
}

TEST_CASE("initialising applies the requested mode, whatever the file had") {
    SegmentGuard guard(unique_name("chmod"));
    const std::string path = lim::test::segment_path(guard.name());
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    REQUIRE(fd >= 0);
    REQUIRE(::fchmod(fd, 0640) == 0);  // an abandoned file of our own, group-readable
    ::close(fd);
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 4});
    CHECK(seg.is_creator());
    struct stat st {};
    REQUIRE(::stat(path.c_str(), &st) == 0);
    CHECK((st.st_mode & 07777) == 0600);
}

TEST_CASE("a segment writable by every user is trusted only by a caller who asks for that mode") {
    SegmentGuard guard(unique_name("wide"));
    Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 4});
    REQUIRE(::chmod(lim::test::segment_path(guard.name()).c_str(), 0666) == 0);
    const std::string what =
        expect_error(Errc::permission_denied, [&] { Segment::open(guard.name()); });
    CHECK(what.find("writable by every user") != std::string::npos);
    expect_error(Errc::permission_denied, [&] { Segment::open_or_create(guard.name()); });
    CHECK_NOTHROW(Segment::open(guard.name(), {.mode = 0666}));
    // A read-only attach trusts nothing it reads (it copies and validates), so it may look.
    CHECK_NOTHROW(detail::SegmentState::attach(guard.name(), {}, false, detail::Access::read_only));
}

TEST_CASE("squatting: another user's file under the name is neither initialised nor trusted") {
    if (::geteuid() != 0) {
        MESSAGE("not root: cannot switch to another uid, skipping");
        return;
    }
    SegmentGuard guard(unique_name("squat"));
    const std::string path = lim::test::segment_path(guard.name());
    // nobody plants an empty 0666 file before the owner starts.
    REQUIRE(as_nobody([&] {
                const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0666);
                if (fd < 0) return 41;
                ::fchmod(fd, 0666);
                ::close(fd);
                return 0;
            }) == 0);
    expect_error(Errc::permission_denied, [&] { Segment::open_or_create(guard.name()); });
    struct stat st {};
    REQUIRE(::stat(path.c_str(), &st) == 0);
    CHECK(st.st_size == 0);  // not initialised
    CHECK(st.st_uid == 65534);

    // Also when the planted file is not writable by others: it is still nobody's, not ours.
    REQUIRE(::unlink(path.c_str()) == 0);
    REQUIRE(as_nobody([&] {
                const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0644);
                if (fd < 0) return 41;
                ::close(fd);
                return 0;
            }) == 0);
    const std::string what =
        expect_error(Errc::permission_denied, [&] { Segment::open_or_create(guard.name()); });
    CHECK(what.find("uid 65534") != std::string::npos);
    REQUIRE(::stat(path.c_str(), &st) == 0);
    CHECK(st.st_size == 0);

    // A ready segment that nobody created 0600: root's private open refuses to trust it; asking
    // for a shared mode says the caller means to share with that user.
    REQUIRE(::unlink(path.c_str()) == 0);
    REQUIRE(as_nobody([&] {
                Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 4});
                return 0;
            }) == 0);
    expect_error(Errc::permission_denied, [&] { Segment::open(guard.name()); });
    CHECK_NOTHROW(Segment::open(guard.name(), {.mode = 0660}));
}

TEST_CASE("a read-only attach reads a private copy: truncation afterwards cannot hurt it") {
    SegmentGuard guard(unique_name("trunc"));
    {
        auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 4});
        Semaphore::open(seg, "db", {.capacity = 3});
    }
    const auto state =
        detail::SegmentState::attach(guard.name(), {}, false, detail::Access::read_only);
    truncate_to(guard.name(), 0);
    // Reading every record touches every page: a mapping would have raised SIGBUS.
    CHECK(state->records_used() == 1);
    CHECK(detail::record_key(state->record(0)) == "db");
    std::uint64_t sum = 0;
    for (std::uint64_t i = 0; i < state->size(); i += 4096)
        sum += static_cast<unsigned char>(state->base()[i]);
    CHECK(sum > 0);  // the header's magic is in the first page
    // And attaching again now is an error, not a signal.
    expect_error(Errc::corrupt_segment, [&] {
        detail::SegmentState::attach(guard.name(), {}, false, detail::Access::read_only);
    });
}

TEST_CASE("a read-only attach never waits for an unready segment") {
    SegmentGuard guard(unique_name("unready"));
    write_file(guard.name(), {});
    // The read-write open waits up to 0.5 s for an initialiser; a read-only attach reports the
    // unready segment at once with its own type.
    bool unready = false;
    try {
        detail::SegmentState::attach(guard.name(), {}, false, detail::Access::read_only);
    } catch (const detail::UnreadySegment& e) {
        unready = e.code() == Errc::corrupt_segment;
    }
    CHECK(unready);
}

// A live neighbour whose ledger was scribbled on (a buggy process, a stray write): a reap sums
// the live ledgers to recount a record, and that sum must neither overflow (undefined behaviour;
// a wrapped sum is negative, recounted as nothing held) nor let one process's damaged entry cancel
// what another process holds. Either way the throttle would admit past max_concurrent_jobs while
// the test process still runs its job. docs/design.md, "The recount".
TEST_CASE("a damaged ledger entry of a live neighbour cannot make a reap free what others hold") {
    for (const std::int64_t garbage :
         {std::numeric_limits<std::int64_t>::max(), std::numeric_limits<std::int64_t>::max() - 5,
          std::numeric_limits<std::int64_t>::min(), std::int64_t{-1'000'000}}) {
        CAPTURE(garbage);
        SegmentGuard guard(unique_name("lim-ledger"));
        auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 16});
        auto th = Throttle::open(seg, "th", {.max_concurrent_jobs = 3});
        REQUIRE(th.try_start_job().kind() == StartJob::Kind::start);  // ours, held throughout

        // The neighbour: runs one job and stays alive (and running it) until told to exit.
        auto* go = lim::test::make_flag();
        auto* ready = lim::test::make_flag();
        const pid_t neighbour = lim::test::fork_child([&] {
            auto mine = Throttle::open(seg, "th", {.max_concurrent_jobs = 3});
            if (mine.try_start_job().kind() != StartJob::Kind::start) return 1;
            ready->set();
            go->wait();
            return 0;
        });
        ready->wait();
        // One that dies holding a job, so that the reap recounts the record.
        const pid_t dead = lim::test::fork_child([&] {
            auto mine = Throttle::open(seg, "th", {.max_concurrent_jobs = 3});
            return mine.try_start_job().kind() == StartJob::Kind::start ? 0 : 1;
        });
        REQUIRE(lim::test::wait_child(dead) == 0);

        // Scribble on the neighbour's ledger entry for the record.
        detail::SegmentState& state = *seg.state();
        const auto record = detail::find_record(state, detail::RecordKind::limiter, "th");
        REQUIRE(record.has_value());
        bool scribbled = false;
        for (std::uint32_t i = 0; i < state.geometry().max_processes; ++i) {
            const std::uint64_t owner = state.slot(i).owner.load();
            if (detail::SlotOwner::pid(owner) != static_cast<std::uint32_t>(neighbour)) continue;
            auto& held = state.ledger(i, *record).held[0];
            if (held.load() == 0) continue;
            held.store(garbage);
            scribbled = true;
        }
        REQUIRE(scribbled);

        (void)seg.reap();  // the dead one's job comes back; ours and the neighbour's must not
        // Live jobs: ours and the neighbour's. A huge entry counts as held (at most one more
        // job: doubt means held); a negative one loses at most the neighbour's own job, never
        // ours (at most two more).
        int started = 0;
        while (started < 3 && th.try_start_job().kind() == StartJob::Kind::start)
            ++started;
        CHECK(started <= (garbage > 0 ? 1 : 2));

        go->set();
        CHECK(lim::test::wait_child(neighbour) == 0);
    }
}

// The same for the semaphores, whose recount packs the units in use into a field of the word
// (32 bits for a Semaphore, 47 for a WeightedSemaphore, whose bits 47-61 count the queued): a
// damaged entry that makes the live sum a multiple of the fields' range must not leave the units
// field at what fits, 0, while our unit is held.
TEST_CASE("a damaged ledger entry cannot wrap a semaphore's recount into its word's fields") {
    struct Case {
        const char* kind;
        std::int64_t garbage;  // with our 1 unit, the live sum is the field's range
    };
    for (const Case c : {Case{"semaphore", std::int64_t{0xFFFF'FFFF}},
                         Case{"weighted_semaphore", (std::int64_t{1} << 62) - 1}}) {
        const std::string kind = c.kind;
        CAPTURE(kind);
        SegmentGuard guard(unique_name("lim-ledger"));
        auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 16});
        const bool weighted = kind == "weighted_semaphore";
        const auto try_acquire = [&](const Segment& s) {
            if (weighted) return WeightedSemaphore::open(s, "s", {.capacity = 3}).try_acquire(1);
            return Semaphore::open(s, "s", {.capacity = 3}).try_acquire(1);
        };
        REQUIRE(try_acquire(seg));  // ours, held throughout
        auto* go = lim::test::make_flag();
        auto* ready = lim::test::make_flag();
        const pid_t neighbour = lim::test::fork_child([&] {
            if (!try_acquire(seg)) return 1;
            ready->set();
            go->wait();
            return 0;
        });
        ready->wait();
        const pid_t dead = lim::test::fork_child([&] { return try_acquire(seg) ? 0 : 1; });
        REQUIRE(lim::test::wait_child(dead) == 0);

        detail::SegmentState& state = *seg.state();
        const auto record = detail::find_record(
            state,
            weighted ? detail::RecordKind::weighted_semaphore : detail::RecordKind::semaphore, "s");
        REQUIRE(record.has_value());
        bool scribbled = false;
        for (std::uint32_t i = 0; i < state.geometry().max_processes; ++i) {
            const std::uint64_t owner = state.slot(i).owner.load();
            if (detail::SlotOwner::pid(owner) != static_cast<std::uint32_t>(neighbour)) continue;
            auto& held = state.ledger(i, *record).held[0];
            if (held.load() == 0) continue;
            held.store(c.garbage);
            scribbled = true;
        }
        REQUIRE(scribbled);

        (void)seg.reap();
        // Ours and the neighbour's are held (its damaged entry counts as a huge holding): none
        // more.
        int acquired = 0;
        while (acquired < 3 && try_acquire(seg))
            ++acquired;
        CHECK(acquired == 0);

        go->set();
        CHECK(lim::test::wait_child(neighbour) == 0);
    }
}

// A limiter record that a buggy process scribbled on: every operation of the library on it (the
// general take and return, the reads, tokens_may_be_available_when, a bounded blocking take, a
// configuration switch and the rebase it may trigger, the consumed record's calls) returns or
// throws lim::Error; none crashes, hangs or overflows (run under UBSan: values read from the
// segment are bounded before use). Token bucket takes on garbage: token_bucket_reanchor_review.
TEST_CASE("garbage in a limiter record: every operation returns, and a reset repairs it") {
    std::mt19937_64 rng(4242);
    const auto pick = [&rng]() -> std::int64_t {
        switch (rng() % 6) {
            case 0:
                return std::numeric_limits<std::int64_t>::min() +
                       static_cast<std::int64_t>(rng() % 4);
            case 1:
                return std::numeric_limits<std::int64_t>::max() -
                       static_cast<std::int64_t>(rng() % 4);
            case 2:
                return static_cast<std::int64_t>(rng() % 2'000'000'000'000) - 1'000'000'000'000;
            case 3:
                return to_nanos(Clock::now()) - static_cast<std::int64_t>(rng() % 4'000'000'000);
            default:
                return static_cast<std::int64_t>(rng());
        }
    };
    SegmentGuard guard(unique_name("lim-garbage"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 16});
    const LimiterConfig config{.hopper_to_bucket_rate_per_sec = 1000.0,
                               .bucket_size = 10,
                               .initial_bucket_level = 10,
                               .initial_hopper_level = 100.0};
    Limiter l = Limiter::open(seg, "l", config);
    auto& body = *reinterpret_cast<detail::LimiterBody*>(
        seg.state()
            ->record(*detail::find_record(*seg.state(), detail::RecordKind::limiter, "l"))
            .body);
    long errors = 0;
    const auto attempt = [&](const std::function<void()>& op) {
        try {
            op();
        } catch (const Error&) {
            ++errors;
        }
    };
    for (int i = 0; i < 3'000; ++i) {
        const std::uint32_t gen = detail::BucketWord::gen(body.bucket.load());
        detail::ConfigBlock& c = body.config[gen & 1];
        c.flags.store(static_cast<std::uint32_t>(rng() % 8));
        switch (rng() % 4) {
            case 0:
                c.drip_shift.store(0);
                break;
            case 1:
                c.drip_shift.store(static_cast<std::uint32_t>(rng() % 200));
                break;
            default:
                c.drip_shift.store(static_cast<std::uint32_t>(rng()));
        }
        c.drip_m.store(rng() % 2 == 0 ? rng() % 184'467'440'738 : rng());
        c.drip_whole.store(rng() % 2 == 0 ? c.drip_m.load() / 1'000'000'000 : rng());
        c.drip_rest.store(rng() % 2 == 0 ? c.drip_m.load() % 1'000'000'000 : rng());
        c.anchor_ns.store(pick());
        c.bucket_size.store(rng() % 2 == 0 ? 100'000 : pick());
        c.target.store(pick());
        body.bucket.store(rng() % 2 == 0 ? detail::BucketWord::make(gen, pick()) : rng());
        body.time_ns.store(rng() % 2 == 0 ? to_nanos(Clock::now()) : pick());
        // kFrozen now and then: an operation waits aside, then thaws it (recovery lock free).
        body.in_flight.store(static_cast<std::uint64_t>(pick()) &
                             (rng() % 16 == 0 ? ~std::uint64_t{0} : ~detail::kFrozen));
        body.lease_deadline_ns.store(pick());
        body.refused.store(rng());
        const TimePoint now = Clock::now();
        attempt([&] { (void)l.try_take(now, 1); });
        attempt([&] { (void)l.try_take(1); });
        attempt([&] { l.return_to_hopper(now, 0.5); });
        attempt([&] {
            (void)l.in_bucket(now);
            (void)l.in_hopper(now);
            (void)l.in_flight(now);
            (void)l.in_limiter(now);
            (void)l.in_system(now);
            (void)l.bucket_size();
            (void)l.hopper_to_bucket_rate_per_sec();
            (void)l.token_target_level();
        });
        attempt([&] { (void)l.tokens_may_be_available_when(now, 1); });
        attempt([&] { (void)l.tokens_may_be_available_when(now, 5); });
        if (i % 50 == 0) {
            attempt([&] { (void)l.take_until(1, Clock::now() + std::chrono::milliseconds{1}); });
        }
        if (i % 10 == 0) attempt([&] { l.set_token_target_level(now, 50.0); });
        if (i % 10 == 5) attempt([&] { l.set_hopper_to_bucket_rate_per_sec(now, 2.5); });
        attempt([&] {
            (void)is_consumed(l);
            (void)lease_deadline(l);
            (void)take_refused_demand(l);
            (void)settle_conversion(l, Duration::zero());
        });
        if (i % 10 == 3) attempt([&] { (void)rebase_consumed(l); });
        // What limctl reads (its snapshot of the record).
        attempt([&] { (void)detail::snapshot_segment(*seg.state(), now); });
    }
    // The creation configuration (Record::config, which a reset rebuilds from) damaged too:
    // resets and every operation after them.
    const std::uint32_t rec = *detail::find_record(*seg.state(), detail::RecordKind::limiter, "l");
    auto* created = reinterpret_cast<detail::LimiterRecordConfig*>(seg.state()->record(rec).config);
    const detail::LimiterRecordConfig original = *created;
    for (int i = 0; i < 300; ++i) {
        switch (rng() % 3) {
            case 0:
                created->rate_bits = std::bit_cast<std::uint64_t>(
                    rng() % 2 == 0 ? std::numeric_limits<double>::infinity() : -1.0);
                break;
            case 1:
                created->rate_bits = std::bit_cast<std::uint64_t>(std::ldexp(1.5, 70));
                break;
            default:
                created->rate_bits = rng();
        }
        created->bucket_size = pick();
        created->initial_bucket_level = pick();
        created->initial_hopper_level = pick();
        created->flags = static_cast<std::uint32_t>(rng() % 8);
        attempt([&] { seg.reset({.key = "l", .force = true}); });
        const TimePoint now = Clock::now();
        attempt([&] { (void)l.try_take(now, 1); });
        attempt([&] { (void)l.try_take(1); });
        attempt([&] { l.return_to_hopper(now, 0.5); });
        attempt([&] { (void)l.in_system(now); });
        attempt([&] { (void)l.tokens_may_be_available_when(now, 1); });
        if (i % 10 == 0) attempt([&] { l.set_token_target_level(now, 50.0); });
    }
    *created = original;
    MESSAGE(errors << " lim::Errors over 3,300 rounds of garbage");
    // A forced reset restores the created state: 10 tokens in the bucket, not one more (at a
    // `now` before the reset, moved up to the reset's time, where the drip is 0).
    const TimePoint now = Clock::now();
    seg.reset({.key = "l", .force = true});
    CHECK(l.try_take(now, 10) == TryTake::taken);
    CHECK(l.try_take(now, 0.0001) == TryTake::unable);
}

// The Dispatch family's records scribbled on byte by byte (configuration and body: words,
// futexes, queue rings): every non-blocking call, a release of what it took, and limctl's
// snapshot return or throw lim::Error; nothing crashes or overflows (run under UBSan).
TEST_CASE("garbage in a semaphore, weighted semaphore or dispatch record: every call returns") {
    std::mt19937_64 rng(777);
    SegmentGuard guard(unique_name("lim-garbage-d"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 8, .max_processes = 16});
    auto window = BackoffWindow::for_key(seg, "api");
    // Handles opened before the damage (an open validates the configuration it finds).
    auto s = Semaphore::open(seg, "s", {.capacity = 3});
    auto w = WeightedSemaphore::open(seg, "w", {.capacity = 100});
    auto d = Dispatch::open(seg, {.limiter = window, .key = "api", .concurrency = 4});
    detail::SegmentState& state = *seg.state();
    const auto scribble = [&](detail::RecordKind kind, std::string_view key) {
        detail::Record& r = state.record(*detail::find_record(state, kind, key));
        const int where = static_cast<int>(rng() % 3);
        std::byte* bytes = where == 0 ? r.config : r.body;
        const std::size_t size = where == 0 ? detail::kRecordConfigSize : detail::kRecordBodySize;
        for (int k = 0; k < 8; ++k) {
            const std::size_t at = rng() % (size - 8);
            const std::uint64_t v = rng() % 4 == 0 ? ~std::uint64_t{0} >> (rng() % 64) : rng();
            std::memcpy(bytes + at, &v, 8);
        }
    };
    long errors = 0;
    std::map<std::string, long> codes;
    const auto attempt = [&](const std::function<void()>& op) {
        try {
            op();
        } catch (const Error& e) {
            ++errors;
            ++codes[std::string(to_string(e.code())) + ": " + std::string(e.what()).substr(0, 60)];
        }
    };
    for (int i = 0; i < 2'000; ++i) {
        scribble(detail::RecordKind::semaphore, "s");
        scribble(detail::RecordKind::weighted_semaphore, "w");
        scribble(detail::RecordKind::dispatch, "api");
        scribble(detail::RecordKind::backoff_window, "api");
        attempt([&] {
            if (s.try_acquire(1)) s.release(1);
            (void)s.in_use();
            (void)s.waiters();
        });
        attempt([&] {
            if (w.try_acquire(7)) w.release(7);
            (void)w.in_use();
        });
        attempt([&] {
            if (auto p = d.try_acquire(1000)) p.reset();
            (void)d.snapshot();
            (void)d.backoff_active();
        });
        attempt([&] { d.set_backoff(std::chrono::milliseconds{1}); });
        attempt([&] {
            (void)Semaphore::open(seg, "s", {.capacity = 3}, adopt_existing);
            (void)WeightedSemaphore::open(seg, "w", {.capacity = 100}, adopt_existing);
        });
        attempt([&] { (void)detail::snapshot_segment(state, Clock::now()); });
    }
    MESSAGE(errors << " lim::Errors over 2,000 rounds of garbage");
    for (const auto& [what, n] : codes)
        MESSAGE(n << " x " << what);
}
