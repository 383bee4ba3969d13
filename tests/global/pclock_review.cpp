// global_pclock_review: adversarial cases of the lease script's protocol clock p
// (tools/feeder/scripts.hpp; docs/global.md, "The protocol clock"). Each case starts its own
// redis-server on 127.0.0.1 (a free port, persistence off) and calls the lease script exactly as
// lim-feeder does (EVAL of the same text, the same ARGV), each "host" passing its own honest
// CLOCK_MONOTONIC time since its previous call as elapsed_us. In ctest as global.pclock_review.
//
// P1, P2 [liveness]: a refused call (LIMHOST, LIMTTL) did not save p, so while every caller is
//   refused p never advances, and the entry that causes the refusal (expiry in p) never expires:
//   the refusal lasts forever, where before the protocol clock it ended ttl + grace after the
//   blocking entry's last renewal (expiry in TIME).
// P3 [over-admission, Redis under libfaketime]: p's advance was capped by the *caller's* grace,
//   not the state's: a host with a longer lease_ttl (a ttl change in progress), calling after a
//   forward step of Redis's clock with an elapsed longer than the state's grace, moved p past the
//   live leases of the other hosts, deleted them before their local deadlines, and was granted the
//   bucket while they still spent theirs.
// All four fail against the script of commit ba5225e and pass with the fix (the state's grace
// caps the advance; a refused call saves p and last).
// S1 [over-admission]: a call the feeder gave up on (a timeout) that Redis runs after a newer call
//   of the same host: it reported what the host held long ago, and shrank (here deleted) the entry
//   of a host that holds and may spend 8 tokens. Fails without the `seq` check (LIMSTALE).
#include <doctest/doctest.h>
#include <hiredis/hiredis.h>
#include <time.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "global/redis_client.hpp"
#include "global/redis_fixture.hpp"
#include "global/stepped_redis.hpp"
#include "lim/lim.hpp"
#include "scripts.hpp"  // tools/feeder: the lease script the feeders run
#include "support/process.hpp"

namespace {

using namespace std::chrono_literals;

constexpr long long kUnits = 10'000;

std::int64_t mono_us() {
    timespec ts{};
    ::clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000 + ts.tv_nsec / 1000;
}

std::string make_dir() {
    char t[] = "/tmp/lim-pclock-XXXXXX";
    REQUIRE(::mkdtemp(t) != nullptr);
    return t;
}

// A connection, and one lease caller per host: each remembers when it last called (its elapsed
// is the real time since, as a feeder's; since it was made, for its first call).
class Conn : public lim::test::RedisTestClient {
  public:
    using RedisTestClient::RedisTestClient;
    // The raw EVAL of the lease script for key `key`: {keep, granted, p}, or {} with `error` set.
    std::vector<long long> lease(const std::string& key, const std::string& host,
                                 const std::string& instance, long long held, long long want,
                                 long long ttl_us, long long burst, long long rate,
                                 long long elapsed_us, std::string& error,
                                 const std::string& seq = "") {
        std::vector<std::string> args{"EVAL",
                                      lim::feeder::kLeaseScript,
                                      "3",
                                      "lim:global2:{" + key + "}",
                                      "lim:global2:{" + key + "}:leases",
                                      "lim:global:{" + key + "}:leases",
                                      host,
                                      std::to_string(held),
                                      "0",
                                      std::to_string(want),
                                      std::to_string(ttl_us),
                                      std::to_string(burst),
                                      std::to_string(rate),
                                      std::to_string(ttl_us),
                                      std::to_string(want),
                                      instance,
                                      std::to_string(elapsed_us)};
        if (!seq.empty()) args.push_back(seq);
        redisReply* r = cmd(args);
        std::vector<long long> out;
        error.clear();
        if (r != nullptr && r->type == REDIS_REPLY_ARRAY) {
            for (std::size_t i = 0; i < r->elements; ++i)
                out.push_back(r->element[i]->integer);
        } else if (r != nullptr && r->type == REDIS_REPLY_ERROR) {
            error = r->str;
        } else {
            error = "no reply";
        }
        if (r != nullptr) freeReplyObject(r);
        return out;
    }
};

// A host speaking the protocol as a feeder does: its ttl (= grace), its instance id, and its own
// monotonic time of its previous call.
struct Host {
    Host(std::string n, std::string i, long long ttl)
        : name(std::move(n)), instance(std::move(i)), ttl_us(ttl) {}
    std::string name;
    std::string instance;
    long long ttl_us;
    std::int64_t last = mono_us();
    std::int64_t last_asked = 0;  // when its last call was sent (its local deadline's start)
    long long last_elapsed = 0;   // the elapsed_us its last call passed
    std::string error;
    std::vector<long long> call(Conn& c, const std::string& key, long long held, long long want,
                                long long burst, long long rate) {
        const std::int64_t now = mono_us();
        const long long elapsed = now - last;
        last = now;
        last_asked = now;
        last_elapsed = elapsed;
        return c.lease(key, name, instance, held, want, ttl_us, burst, rate, elapsed, error);
    }
};

struct PlainRedis {
    explicit PlainRedis(const std::string& dir)
        : server(lim::test::find_redis_server(), lim::test::free_port(), dir + "/redis.log") {}
    lim::test::RedisServer server;
};

}  // namespace

// P1: a host's feeder restarts with a new instance id (a reboot: /dev/shm, where the id is kept,
// is emptied; a container's own /dev/shm; the lock file removed) while its previous instance's
// entry lives, and no other host calls (one host, or every host restarted). Each call is refused
// (LIMHOST) until that entry expires; a refused call did not save p, so it never did.
TEST_CASE("P1 [liveness]: a lone host restarted with a new instance id is refused forever") {
    if (lim::test::find_redis_server().empty()) {
        MESSAGE("SKIPPED: redis-server is not installed");
        return;
    }
    const std::string dir = make_dir();
    PlainRedis redis(dir);
    REQUIRE(redis.server.start());
    Conn c(redis.server.port());
    constexpr long long kTtl = 250'000;  // lease_ttl = grace: an entry lives 0.5 s of p
    const long long burst = 10 * kUnits;
    const long long rate = 10 * kUnits;
    Host h{"h", "00000000000000aa", kTtl};
    // The first life: past the fence, holding a lease (every 50 ms, as a feeder with refresh 50
    // ms).
    long long held = 0;
    for (int i = 0; i < 40 && held == 0; ++i) {
        const auto g = h.call(c, "k", 0, 5 * kUnits, burst, rate);
        REQUIRE(g.size() == 3);
        held = g[1];
        std::this_thread::sleep_for(50ms);
    }
    REQUIRE(held > 0);
    const std::int64_t died = h.last_asked;
    // It dies; its next life (a new instance id, a fresh process: elapsed since its start) calls
    // every 50 ms for 3 s (6 times ttl + grace).
    Host h2{"h", "00000000000000bb", kTtl};
    std::optional<std::int64_t> accepted_at;
    std::string first_error;
    while (mono_us() - died < 3'000'000 && !accepted_at) {
        const auto g = h2.call(c, "k", 0, 5 * kUnits, burst, rate);
        if (g.size() == 3) {
            accepted_at = h2.last_asked;
        } else if (first_error.empty()) {
            first_error = h2.error;
        }
        std::this_thread::sleep_for(50ms);
    }
    MESSAGE("P1: first refusal: " << first_error);
    CHECK(first_error.rfind("LIMHOST", 0) == 0);
    REQUIRE_MESSAGE(accepted_at.has_value(),
                    "the restarted host was refused (LIMHOST) for 3 s, 6 x (ttl + grace) after "
                    "its previous life's last call: p does not advance on refused calls");
    // Safety: not before the previous life's local deadline (asked + ttl) had passed.
    CHECK(*accepted_at - died >= kTtl);
    MESSAGE("P1: accepted " << (*accepted_at - died) / 1000
                            << " ms after the previous life's call");
}

// P2: a ttl change in progress (`lease_ttl` 250 ms -> 500 ms, host by host, as docs/global.md
// says to change it) while one host, holding its entry, has died. The live host with the new ttl
// is refused (LIMTTL) until the dead host's entry expires; a refused call did not save p, so it
// never did.
TEST_CASE("P2 [liveness]: LIMTTL behind a dead host's entry lasts forever") {
    if (lim::test::find_redis_server().empty()) {
        MESSAGE("SKIPPED: redis-server is not installed");
        return;
    }
    const std::string dir = make_dir();
    PlainRedis redis(dir);
    REQUIRE(redis.server.start());
    Conn c(redis.server.port());
    const long long burst = 10 * kUnits;
    const long long rate = 10 * kUnits;
    Host a{"a", "00000000000000aa", 250'000};
    Host b{"b", "00000000000000bb", 250'000};
    // Both call under 250 ms for a while (b's entry lives: it wants), then b dies.
    for (int i = 0; i < 6; ++i) {
        REQUIRE(a.call(c, "k", 0, kUnits, burst, rate).size() == 3);
        REQUIRE(b.call(c, "k", 0, kUnits, burst, rate).size() == 3);
        std::this_thread::sleep_for(50ms);
    }
    const std::int64_t b_died = b.last_asked;
    // a is restarted with lease_ttl 500 ms (its lock file kept: the same instance), and calls
    // every 50 ms for 3 s.
    Host a2{"a", "00000000000000aa", 500'000};
    std::optional<std::int64_t> accepted_at;
    std::string first_error;
    while (mono_us() - b_died < 3'000'000 && !accepted_at) {
        const auto g = a2.call(c, "k", 0, kUnits, burst, rate);
        if (g.size() == 3) {
            accepted_at = a2.last_asked;
        } else if (first_error.empty()) {
            first_error = a2.error;
        }
        std::this_thread::sleep_for(50ms);
    }
    MESSAGE("P2: first refusal: " << first_error);
    CHECK(first_error.rfind("LIMTTL", 0) == 0);
    REQUIRE_MESSAGE(accepted_at.has_value(),
                    "the host with the new ttl was refused (LIMTTL) for 3 s, 6 x (ttl + grace) "
                    "after the dead host's last call: p does not advance on refused calls");
    CHECK(*accepted_at - b_died >= 250'000);  // not before b's local deadline
    MESSAGE("P2: accepted " << (*accepted_at - b_died) / 1000 << " ms after b's last call");
}

// P3: Redis's clock steps 10 s forward just after host a (lease_ttl 250 ms) was granted the
// burst. Host c, configured with lease_ttl 5 s (a ttl change in progress; refused LIMTTL while a
// holds a lease), calls next; its previous call was ~1.5 s ago, so its honest elapsed is ~1.5 s,
// more than the state's grace (250 ms). Capped by c's own grace (5 s), p advanced ~1.5 s, past a's
// expiry (p + 500 ms): a's entry was deleted 1-2 ms after a's ask, long before a's local
// deadline (ask + 250 ms); then c, alone, was accepted and granted the refilled bucket while a
// may still spend the burst: 2 x burst within a few ms, over burst + rate x T plus the step's
// allowance rate x min(grace, e) (docs/global.md, the proof).
TEST_CASE("P3 [over-admission]: a longer-ttl caller after a forward step deletes live leases") {
    const std::string dir = make_dir();
    std::string why_not;
    const auto redis = lim::test::SteppedRedis::start(dir, why_not);
    if (!redis) {
        MESSAGE(why_not);
        return;
    }
    const auto set_offset = [&](int seconds) { redis->set_offset(seconds); };
    Conn c(redis->port());
    const auto redis_time_s = [&]() -> long long {
        redisReply* r = c.cmd({"EVAL", "return redis.call('TIME')[1]", "0"});
        long long v = 0;
        if (r != nullptr && r->type == REDIS_REPLY_STRING) v = std::atoll(r->str);
        if (r != nullptr) freeReplyObject(r);
        return v;
    };
    const long long t0 = redis_time_s();
    set_offset(10);
    const long long t1 = redis_time_s();
    set_offset(0);
    if (t1 - t0 < 9) {
        MESSAGE("SKIPPED: libfaketime does not shift Redis's TIME here");
        return;
    }
    const long long burst = 10 * kUnits;
    const long long rate = 10 * kUnits;
    Host a{"a", "00000000000000aa", 250'000};
    Host cc{"c", "00000000000000cc", 5'000'000};
    // a creates the state (ttl 250 ms) and keeps an entry; c's first call is refused (LIMTTL).
    REQUIRE(a.call(c, "k", 0, kUnits, burst, rate).size() == 3);
    CHECK(cc.call(c, "k", 0, burst, burst, rate).empty());
    CHECK(cc.error.rfind("LIMTTL", 0) == 0);
    // a calls every 50 ms past the fence and the refill, then asks for the whole burst.
    long long a_held = 0;
    for (int i = 0; i < 60 && a_held < burst; ++i) {
        const auto g = a.call(c, "k", a_held, burst - a_held, burst, rate);
        REQUIRE(g.size() == 3);
        a_held = g[0] + g[1];
        std::this_thread::sleep_for(50ms);
    }
    REQUIRE(a_held == burst);
    const auto g_last = a.call(c, "k", a_held, 0, burst, rate);  // renewed: deadline asked + 250 ms
    REQUIRE(g_last.size() == 3);
    a_held = g_last[0] + g_last[1];
    const std::int64_t a_asked = a.last_asked;
    // The step, then c's call (its elapsed: the real time since its refused first call).
    set_offset(10);
    const auto g_c = cc.call(c, "k", 0, burst, burst, rate);
    const std::int64_t c_at = mono_us();
    const auto a_entry = c.hget("lim:global2:{k}:leases", "a");
    set_offset(0);
    const long long c_granted = g_c.size() == 3 ? g_c[1] : 0;
    MESSAGE("P3: c's elapsed " << cc.last_elapsed / 1000 << " ms; c's reply: "
                               << (g_c.size() == 3 ? "granted " + std::to_string(c_granted)
                                                   : "error " + cc.error)
                               << "; a's entry " << (a_entry ? *a_entry : "deleted") << ", "
                               << (c_at - a_asked) / 1000 << " ms after a's ask");
    REQUIRE(c_at - a_asked < 250'000);  // still before a's local deadline
    CHECK_MESSAGE(a_entry.has_value(), "a's live lease was deleted before its local deadline");
    // a holds `a_held` (the burst) until its deadline; c's grant must leave burst + rate x T +
    // rate x min(state's grace, c's elapsed) = burst + rate x (T + 250 ms) over both.
    const double allowed =
        static_cast<double>(burst) +
        static_cast<double>(rate) * (static_cast<double>(c_at - a_asked) / 1e6 + 0.25);
    CHECK(static_cast<double>(a_held + c_granted) <= allowed);
}

// P1e: P1 end to end, with the real lim-feeder. One host; its feeder holds a lease, is killed
// (SIGKILL) and its lock file removed (what a reboot does to /dev/shm, where the feeder keeps its
// instance id; a container's own /dev/shm on each start), then started again: a new instance id
// under the same host name while the previous one's entry lives. It is refused (LIMHOST) until
// that entry expires, ttl + grace = 1 s after its last renewal; before the fix, forever: the host
// never admitted again.
TEST_CASE("P1e [liveness]: a lone host's feeder restarted with a new instance id feeds again") {
    if (lim::test::find_redis_server().empty()) {
        MESSAGE("SKIPPED: redis-server is not installed");
        return;
    }
    const std::string dir = make_dir();
    PlainRedis redis(dir);
    REQUIRE(redis.server.start());
    lim::test::SegmentGuard guard(lim::test::unique_name("pc1e"));
    const std::string config = dir + "/feeder.toml";
    {
        std::ofstream out(config);
        out << "[feeder]\nsegment = \"" << guard.name()
            << "\"\nredis = \"redis://127.0.0.1:" << redis.server.port()
            << "\"\nhost = \"h\"\nrefresh = \"50ms\"\nlease_ttl = \"500ms\"\n"
               "[global.api]\nkind = \"rate\"\nburst_size = 20\nsustained_rate_per_sec = 100\n";
    }
    const std::string log = dir + "/feeder.log";
    lim::test::ChildProcess feeder;
    feeder.start({FEEDER_PATH, "--config", config}, log);
    std::optional<lim::Segment> seg;
    REQUIRE(lim::test::eventually(
        [&] {
            try {
                seg.emplace(lim::Segment::open(guard.name()));
                return seg->info().limiters >= 3;
            } catch (const lim::Error&) {
                return false;
            }
        },
        30s));
    auto tb = lim::TokenBucket::open(*seg, "api", {.burst_size = 20, .sustained_rate_per_sec = 100},
                                     lim::adopt_existing);
    // Fed: a take succeeds (past the fence).
    REQUIRE(lim::test::eventually([&] { return tb.try_take(1) == lim::TryTake::taken; }, 30s));
    feeder.stop(SIGKILL);
    const std::int64_t killed = mono_us();
    REQUIRE(::unlink(("/dev/shm/lim-feeder." + guard.name() + ".lock").c_str()) == 0);
    feeder.start({FEEDER_PATH, "--config", config}, log);
    // Its previous lease's deadline (<= 500 ms after the kill) passes: nothing is admitted then
    // until the new instance is served. Served at all (within 30 s: about 4 x ttl + grace on an
    // idle machine, and room for a loaded one; refused forever before the fix)?
    std::this_thread::sleep_for(600ms);
    const bool fed = lim::test::eventually(
        [&] {
            std::this_thread::sleep_for(5ms);
            return tb.try_take(1) == lim::TryTake::taken;
        },
        30s);
    const std::string text = lim::test::read_file(log);
    MESSAGE("P1e: the feeder's log:\n" << text);
    CHECK(text.find("LIMHOST") != std::string::npos);  // refused while the old entry lived
    CHECK_MESSAGE(fed, "the host never admitted again: its restarted feeder is refused forever");
    MESSAGE("P1e: fed again " << (mono_us() - killed) / 1000 << " ms after the kill");
    feeder.stop(SIGTERM);
}

// S1: a call Redis runs after a newer call of the same host. lim-feeder gives a call up after its
// timeout (min(refresh, 500 ms)), drops the connection and asks again on a new one; if Redis was
// stalled (a slow command, a fork, the machine), the old call may still be in the old socket and
// run after the new one. Run, it would count what the host held when it asked long ago, not what
// the newer call left it: here the newer call was granted 8 tokens the host now holds, and the
// stale call (held 0, asking for nothing) would shrink the host's entry to 0 while the host can
// still spend the 8 (Redis then grants them again to another host). With `seq` (the caller's
// monotonic time when it asked) the script refuses it (LIMSTALE), changing nothing but p.
TEST_CASE("S1 [over-admission]: a lease call Redis runs after a newer one of the same host") {
    if (lim::test::find_redis_server().empty()) {
        MESSAGE("SKIPPED: redis-server is not installed");
        return;
    }
    const std::string dir = make_dir();
    PlainRedis redis(dir);
    REQUIRE(redis.server.start());
    Conn c(redis.server.port());
    constexpr long long kTtl = 250'000;
    const long long burst = 10 * kUnits;
    const long long rate = 10 * kUnits;
    const std::string inst = "00000000000000aa";
    std::string error;
    // Past the fence, the host renews every 50 ms until it holds 8 tokens (the bucket refills
    // at 10/s from the fence on).
    std::int64_t last = mono_us();
    long long lease = 0;
    std::int64_t stale_seq = 0;
    for (int i = 0; i < 60 && lease < 8 * kUnits; ++i) {
        std::this_thread::sleep_for(50ms);
        const std::int64_t now = mono_us();
        // The call that will be given up on is asked first (its seq), then the newer one runs.
        stale_seq = now;
        const auto g = c.lease("s", "h", inst, lease, 8 * kUnits - lease, kTtl, burst, rate,
                               now - last, error, std::to_string(now + 1));
        last = now;
        REQUIRE(g.size() == 3);
        lease = g[0] + g[1];
    }
    REQUIRE(lease == 8 * kUnits);
    const auto entry = [&] { return c.hget("lim:global2:{s}:leases", "h").value_or(""); };
    const std::string before = entry();
    REQUIRE(before.rfind("80000:", 0) == 0);
    // The stale call: asked before the newer one (a lower seq), held 0, wanting nothing.
    const auto stale =
        c.lease("s", "h", inst, 0, 0, kTtl, burst, rate, 0, error, std::to_string(stale_seq));
    CHECK(stale.empty());
    CHECK(error.rfind("LIMSTALE", 0) == 0);
    MESSAGE("S1: the stale call: " << error);
    // The host's entry still counts the 8 tokens it holds.
    CHECK(entry() == before);
    // A newer call of the same host (a higher seq) is run as usual.
    const std::int64_t now = mono_us();
    const auto next = c.lease("s", "h", inst, 8 * kUnits, 8 * kUnits, kTtl, burst, rate, now - last,
                              error, std::to_string(now + 2));
    REQUIRE(next.size() == 3);
    CHECK(next[0] == 8 * kUnits);
    // Without a seq (a hand call) nothing is compared.
    const auto hand = c.lease("s", "h", inst, 8 * kUnits, 8 * kUnits, kTtl, burst, rate, 0, error);
    CHECK(hand.size() == 3);
}
