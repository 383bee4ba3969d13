// global_cap_review: adversarial cases of the lease script's refill cap (tools/feeder/scripts.hpp,
// protocol step 2: the refill of the interval since the previous call is capped by `stood`, what
// every entry held before the call changed any). Each case starts its own redis-server on
// 127.0.0.1 (a free port, persistence off) and calls the lease script exactly as lim-feeder does
// (EVAL of the same text, the same ARGV); the test decides when each simulated host spends what it
// holds (always before its local deadline, asked + ttl), records every admission, and checks the
// worst window over them against burst + rate x T. In ctest as global.cap_review.
//
// C1 [over-admission]: a refused call (LIMTTL, LIMHOST, LIMSTALE) deleted the expired entries it
//   passed but saved neither `tokens` nor `ts`: the next accepted call refilled the whole interval
//   since the previous accepted one, capped by entries that no longer held the deleted one. A host
//   that spent its lease just before its deadline, its entry then deleted by a refused call, had
//   its room refilled for the time it still held it: 3.4 tokens over burst + rate x T at burst
//   10, 10/s, in all three. The fix: a refused call deletes no entry (nor moves tokens, ts or at),
//   so the next accepted call's cap counts every entry that stood since the previous accepted one.
// C2 [over-admission, the cap itself]: the late spend of global.late_spend at the script level: a
//   host holding the whole burst spends it just before its deadline and reports it at its next
//   call; capped by the leases as that call left them, the refill of the interval is granted again
//   (with `burst - stood` replaced by `burst` in the script: 4.5 tokens over).
// C3 [over-admission, rolling upgrade]: C1 through a previous protocol's lease (counted in the cap
//   while live since the previous call's TIME): a refused call moved `last`, the `since` of the
//   next accepted call, past that lease's expiry: 3.1 tokens over. Fixed by `at`, the TIME of the
//   last accepted call. C1 (x3) and C3 fail against the script before this file (commit 985d0ce's
//   parent); all five fail with the cap reverted as for C2.
// C6 [over-admission, rolling upgrade]: a refused caller with a shorter lease_ttl rewrote the
//   previous protocol's fence entry with its own expiry (red before the fix: 10 tokens over).
// C4 [over-admission, Redis restart]: the state flushed while two hosts hold half the burst each;
//   only the fence (not the cap, which counts only the reported entries) keeps the unreported
//   lease's room from being refilled: with `fence = p` for a new state, 3.8 tokens over.
#include <doctest/doctest.h>
#include <hiredis/hiredis.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "global/lease_v1.hpp"
#include "global/redis_client.hpp"
#include "global/redis_fixture.hpp"
#include "scripts.hpp"  // tools/feeder: the lease script the feeders run

namespace {

constexpr long long kUnits = 10'000;

std::int64_t mono_us() {
    timespec ts{};
    ::clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000 + ts.tv_nsec / 1000;
}

void sleep_until_us(std::int64_t at) {
    const std::int64_t now = mono_us();
    if (at > now) std::this_thread::sleep_for(std::chrono::microseconds{at - now});
}

std::string make_dir() {
    char t[] = "/tmp/lim-cap-XXXXXX";
    REQUIRE(::mkdtemp(t) != nullptr);
    return t;
}

struct Reply {
    std::vector<long long> v;  // {keep, granted, p}, empty on an error
    std::string error;
};

// One simulated host: its name, instance, ttl (= grace), its own monotonic time of its previous
// call (elapsed_us), and the local deadline of what it holds.
struct Host {
    std::string name;
    std::string instance;
    long long ttl_us;
    std::int64_t last = mono_us();
    std::int64_t asked = 0;
    long long held = 0;  // units it may still spend, until `deadline`
    std::int64_t deadline = 0;
};

struct Admission {
    std::int64_t at;
    long long units;
};

class Sim : public lim::test::RedisTestClient {
  public:
    Sim(int port, long long burst, long long rate)
        : RedisTestClient(port), burst_(burst), rate_(rate) {}

    // The lease call as lim-feeder makes it. `seq_override` (>= 0) sends that seq instead of the
    // host's asked time (a stale call Redis runs late). Applies the answer as the feeder does.
    Reply call(Host& h, long long want, long long returned = 0, long long seq_override = -1) {
        const std::int64_t now = mono_us();
        const long long elapsed = now - h.last;
        h.last = now;
        if (seq_override < 0) h.asked = now;
        const long long held = now < h.deadline ? h.held : 0;
        std::vector<std::string> args{"EVAL",
                                      lim::feeder::kLeaseScript,
                                      "3",
                                      "lim:global2:{k}",
                                      "lim:global2:{k}:leases",
                                      "lim:global:{k}:leases",
                                      h.name,
                                      std::to_string(held),
                                      std::to_string(returned),
                                      std::to_string(want),
                                      std::to_string(h.ttl_us),
                                      std::to_string(burst_),
                                      std::to_string(rate_),
                                      std::to_string(h.ttl_us),
                                      std::to_string(want),
                                      h.instance,
                                      std::to_string(elapsed),
                                      std::to_string(seq_override >= 0 ? seq_override : now)};
        redisReply* r = cmd(args);
        Reply out;
        if (r != nullptr && r->type == REDIS_REPLY_ARRAY) {
            for (std::size_t i = 0; i < r->elements; ++i)
                out.v.push_back(r->element[i]->integer);
        } else if (r != nullptr && r->type == REDIS_REPLY_ERROR) {
            out.error = r->str;
        } else {
            out.error = "no reply";
        }
        if (r != nullptr) freeReplyObject(r);
        if (out.v.size() == 3 && seq_override < 0) {
            const std::int64_t answered = mono_us();
            // The feeder's step 4: keep min(held, keep) plus the grant, unless the answer came at
            // or after the deadline of the lease reported as held; then the new deadline.
            long long keep = std::min(held, out.v[0]);
            if (h.deadline != 0 && answered >= h.deadline) keep = 0;
            h.held = keep + out.v[1];
            h.deadline = h.asked + h.ttl_us;
        }
        return out;
    }

    // The host spends `units` of what it holds now, if its local deadline has not passed; false
    // (nothing spent) if it has: the test's schedule slipped.
    bool spend_in_time(Host& h, long long units) {
        const std::int64_t now = mono_us();
        if (now >= h.deadline) return false;
        units = std::min(units, h.held);
        h.held -= units;
        if (units > 0) admissions_.push_back({now, units});
        return true;
    }
    void spend(Host& h, long long units) {
        REQUIRE_MESSAGE(spend_in_time(h, units),
                        "the test's schedule slipped past a local deadline");
    }

    // The worst window over the admissions: max over i <= j of sum(i..j) - (burst + rate x T),
    // in tokens (positive: over the bound).
    double worst_excess() const {
        double worst = -1e18;
        for (std::size_t i = 0; i < admissions_.size(); ++i) {
            long long sum = 0;
            for (std::size_t j = i; j < admissions_.size(); ++j) {
                sum += admissions_[j].units;
                const double t = static_cast<double>(admissions_[j].at - admissions_[i].at) / 1e6;
                const double bound = static_cast<double>(burst_) + static_cast<double>(rate_) * t;
                worst = std::max(worst, (static_cast<double>(sum) - bound) / kUnits);
            }
        }
        return worst;
    }

  private:
    long long burst_;
    long long rate_;
    std::vector<Admission> admissions_;
};

// A case's own redis-server, started on a free port with its log in a fresh directory.
struct PlainRedis {
    PlainRedis()
        : server(lim::test::find_redis_server(), lim::test::free_port(),
                 make_dir() + "/redis.log") {
        REQUIRE(server.start());
    }
    lim::test::RedisServer server;
};

// True (and the case reports SKIPPED) when no redis-server is installed.
bool no_redis_server() {
    if (!lim::test::find_redis_server().empty()) return false;
    MESSAGE("SKIPPED: redis-server is not installed");
    return true;
}

// Past the fence, `b` holds the whole burst (the bucket refilled to it, b alone wanting).
void fill(Sim& s, Host& b, long long burst) {
    REQUIRE(s.call(b, burst).v.size() == 3);  // creates the state: the fence, ttl + grace
    for (int i = 0; i < 100 && b.held < burst; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds{50});
        REQUIRE(s.call(b, burst - b.held).v.size() == 3);
    }
    REQUIRE(b.held == burst);
}

enum class Refusal { ttl, host, stale };

// C1: see the file's head. Burst 10, 10/s, ttl = grace = 500 ms (an entry lives 1 s of p).
// B holds the burst; A's call (the last accepted one, at +150 ms) finds nothing and leaves an
// entry that wants. B spends its 10 just before its deadline (+490 ms). B's entry expires at
// +1000 ms; at +1050 ms a refused call (X's) deletes it; at +1080 ms A calls again. A token bucket
// refills from B's spend on: A should find about 10/s x 80 ms; refilled since A's previous call
// (+150 ms) under the cap of what stood after the deletion, it found 9.3: 19.3 tokens in 0.59 s
// against a bound of 15.9. Returns false if the schedule slipped (the process woke too late for
// one of its steps, as under a loaded ctest run): the caller runs the scenario again.
bool refused_deletes_once(Refusal kind) {
    PlainRedis redis;
    constexpr long long kTtl = 500'000;
    const long long burst = 10 * kUnits;
    const long long rate = 10 * kUnits;
    Sim s(redis.server.port(), burst, rate);
    Host b{"b", "00000000000000b1", kTtl};
    Host a{"a", "00000000000000a1", kTtl};
    Host x{"x", "00000000000000c1", kTtl * 2};  // LIMTTL: another lease_ttl than the state's
    Host a2{"a", "00000000000000a2", kTtl};     // LIMHOST: another feeder as host "a"
    fill(s, b, burst);
    const std::int64_t t0 = b.asked;
    sleep_until_us(t0 + 150'000);
    const Reply ra = s.call(a, burst);  // the last accepted call before the refused one
    REQUIRE(ra.v.size() == 3);
    CHECK(ra.v[1] == 0);
    const std::int64_t a_first = a.asked;
    sleep_until_us(t0 + 490'000);
    if (!s.spend_in_time(b, burst)) return false;  // just before b's deadline, t0 + 500 ms
    // Refused calls every 100 ms from +250 ms (each advances p, so that p follows real time with
    // no accepted call: a gap longer than grace would count as grace); the one at +1050 ms finds
    // B's entry expired (t0 + 1 s of p) and A's live (a_first + 1 s).
    // Each call's answer is checked once the schedule is known to have held: a process woken
    // too late can find the state expired, and its call is then no refusal.
    std::vector<std::string> answers;
    const char* expected = kind == Refusal::ttl    ? "LIMTTL"
                           : kind == Refusal::host ? "LIMHOST"
                                                   : "LIMSTALE";
    for (std::int64_t at = 250'000; at <= 1'050'000; at += 100'000) {
        sleep_until_us(t0 + at);
        switch (kind) {
            case Refusal::ttl:
                answers.push_back(s.call(x, burst).error);
                break;
            case Refusal::host:
                answers.push_back(s.call(a2, burst).error);
                break;
            case Refusal::stale:
                // A's call that its feeder gave up on (asked before its accepted one), run late.
                answers.push_back(s.call(a, burst, 0, a_first - 1).error);
                break;
        }
    }
    {
        // The schedule held: at the last refused call, B's entry had expired (in p), A's had not.
        const long long p = std::stoll(s.hget("lim:global2:{k}", "p").value_or("0"));
        const auto expiry = [&](const std::string& host) {
            const std::string e = s.hget("lim:global2:{k}:leases", host).value_or("0:0");
            return std::stoll(e.substr(e.find(':') + 1));
        };
        // (B's entry not expired, or A's expired: the schedule slipped.)
        if (expiry("b") > p || expiry("a") <= p) return false;
    }
    for (const std::string& answer : answers) {
        INFO("a call that should have been refused with " << expected << " answered '" << answer
                                                          << "'");
        CHECK(answer.rfind(expected, 0) == 0);
    }
    sleep_until_us(t0 + 1'080'000);
    const Reply ra2 = s.call(a, burst);
    REQUIRE(ra2.v.size() == 3);
    if (!s.spend_in_time(a, a.held)) return false;
    const double excess = s.worst_excess();
    MESSAGE("C1: A granted " << static_cast<double>(ra2.v[1]) / kUnits
                             << " tokens after the refused call; worst window " << excess
                             << " tokens against burst + rate x T");
    CHECK(excess <= 0.01);
    return true;
}

void refused_deletes(Refusal kind) {
    if (no_redis_server()) return;
    constexpr int kTries = 4;
    for (int i = 1; i <= kTries; ++i) {
        if (refused_deletes_once(kind)) return;
        MESSAGE("C1: the schedule slipped (try " << i << " of " << kTries << ")");
    }
    FAIL("C1: the schedule slipped in every try: the machine is too loaded for this case");
}

}  // namespace

TEST_CASE("C1 [over-admission]: a refused call (LIMTTL) deletes an expired entry from the cap") {
    refused_deletes(Refusal::ttl);
}
TEST_CASE("C1 [over-admission]: a refused call (LIMHOST) deletes an expired entry from the cap") {
    refused_deletes(Refusal::host);
}
TEST_CASE("C1 [over-admission]: a refused call (LIMSTALE) deletes an expired entry from the cap") {
    refused_deletes(Refusal::stale);
}

// C2: B holds the burst and spends it all just before its deadline; A has an entry that wants
// (so the bucket is shared, as in global.late_spend); B reports at its next call (held 0). The
// refill of the interval since the previous call must be capped by what stood in it (B's 10):
// capped by the leases as B's call leaves them (0), B or A would be granted rate x the interval.
TEST_CASE("C2 [over-admission]: a lease spent late in the interval is no room for its refill") {
    if (no_redis_server()) return;
    PlainRedis redis;
    constexpr long long kTtl = 500'000;
    const long long burst = 10 * kUnits;
    const long long rate = 10 * kUnits;
    Sim s(redis.server.port(), burst, rate);
    Host b{"b", "00000000000000b1", kTtl};
    fill(s, b, burst);
    const std::int64_t t0 = b.asked;
    sleep_until_us(t0 + 450'000);
    s.spend(b, burst);  // just before b's deadline, t0 + 500 ms
    const Reply rb = s.call(b, burst);
    REQUIRE(rb.v.size() == 3);
    s.spend(b, b.held);
    const double excess = s.worst_excess();
    MESSAGE("C2: B granted " << static_cast<double>(rb.v[1]) / kUnits
                             << " tokens at its call after the late spend; worst window " << excess
                             << " tokens against burst + rate x T");
    CHECK(excess <= 0.01);
}

// C3: the same through a lease of the previous protocol (a rolling upgrade, lim:global:{K}:leases,
// its expiry in TIME). Its lease of the whole burst stands in the cap of every interval whose
// previous call read a TIME before its expiry (`since`). A refused call saved `last` (TIME) but
// not `ts`: the next accepted call's `since` was the refused call's TIME, past the old lease's
// expiry, so the refill of the interval since the previous accepted call was capped without it,
// though it stood and was spent in it. Burst 10, 15/s, new ttl 500 ms; the old host's lease
// expires 1.5 s after the start (its deadline, 250 ms before, as the old protocol's ttl = grace
// of 250 ms): it spends its 10 at +1.24 s; A's accepted calls every 100 ms to +1.05 s, LIMTTL
// refusals every 100 ms from +1.15 s to +1.65 s, A's call at +1.7 s.
TEST_CASE("C3 [over-admission]: a refused call moves `since` past a previous protocol's lease") {
    if (no_redis_server()) return;
    PlainRedis redis;
    constexpr long long kTtl = 500'000;
    const long long burst = 10 * kUnits;
    const long long rate = 15 * kUnits;
    Sim s(redis.server.port(), burst, rate);
    Host a{"a", "00000000000000a1", kTtl};
    Host x{"x", "00000000000000c1", kTtl * 2};  // LIMTTL: another lease_ttl than the state's
    Host o{"o", "", 250'000};                   // the previous protocol's host
    const std::int64_t t0 = mono_us();
    long long time_us = 0;
    {
        redisReply* r = s.cmd({"TIME"});
        REQUIRE(r != nullptr);
        REQUIRE(r->type == REDIS_REPLY_ARRAY);
        time_us = std::stoll(r->element[0]->str) * 1'000'000 + std::stoll(r->element[1]->str);
        freeReplyObject(r);
    }
    s.run({"HSET", "lim:global:{k}:leases", "o",
           std::to_string(burst) + ":" + std::to_string(time_us + 1'500'000) + ":0"});
    o.held = burst;
    o.deadline = t0 + 1'250'000;
    for (std::int64_t at = 0; at <= 1'050'000; at += 100'000) {
        sleep_until_us(t0 + at);
        const Reply ra = s.call(a, burst);
        REQUIRE(ra.v.size() == 3);
        REQUIRE(ra.v[1] == 0);  // the old lease holds the whole burst
    }
    sleep_until_us(t0 + 1'240'000);
    s.spend(o, burst);  // just before the old host's deadline
    for (std::int64_t at = 1'150'000; at <= 1'650'000; at += 100'000) {
        sleep_until_us(t0 + at);
        CHECK(s.call(x, burst).error.rfind("LIMTTL", 0) == 0);
    }
    sleep_until_us(t0 + 1'700'000);
    const Reply ra = s.call(a, burst);
    REQUIRE(ra.v.size() == 3);
    s.spend(a, a.held);
    const double excess = s.worst_excess();
    MESSAGE("C3: A granted " << static_cast<double>(ra.v[1]) / kUnits
                             << " tokens after the refused calls; worst window " << excess
                             << " tokens against burst + rate x T");
    CHECK(excess <= 0.01);
}

// C4: Redis loses the state mid-interval (FLUSHALL, as a restart without persistence) while two
// hosts hold 5 tokens each of a burst of 10 and spend nothing yet. A's next call reports its 5
// (adopted: "no lease known"); B's lease is unknown to Redis until B calls. Without the fence, the
// cap counts only A's entry, and A's second call 0.38 s later is refilled 3.8 tokens; then both
// hosts spend all they hold at one instant: 13.8 against a bound of 10. With the fence (nothing
// granted for ttl + grace of p after the first call: every lease from before has reached its
// local deadline by then), A gets nothing.
TEST_CASE("C4 [over-admission]: a flushed state is fenced, not capped by the entries reported") {
    if (no_redis_server()) return;
    PlainRedis redis;
    constexpr long long kTtl = 500'000;
    const long long burst = 10 * kUnits;
    const long long rate = 10 * kUnits;
    Sim s(redis.server.port(), burst, rate);
    Host a{"a", "00000000000000a1", kTtl};
    Host b{"b", "00000000000000b1", kTtl};
    const long long half = burst / 2;
    REQUIRE(s.call(a, half).v.size() == 3);
    REQUIRE(s.call(b, half).v.size() == 3);
    for (int i = 0; i < 100 && (a.held < half || b.held < half); ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds{50});
        REQUIRE(s.call(a, half - a.held).v.size() == 3);
        REQUIRE(s.call(b, half - b.held).v.size() == 3);
    }
    REQUIRE(a.held == half);
    REQUIRE(b.held == half);
    const std::int64_t t0 = b.asked;
    s.run({"FLUSHALL"});
    sleep_until_us(t0 + 20'000);
    const Reply r1 = s.call(a, burst);
    REQUIRE(r1.v.size() == 3);
    CHECK(r1.v[0] == half);  // adopted
    sleep_until_us(t0 + 400'000);
    const Reply r2 = s.call(a, burst);
    REQUIRE(r2.v.size() == 3);
    sleep_until_us(t0 + 450'000);  // before B's deadline (t0 + 500 ms)
    s.spend(a, a.held);
    s.spend(b, b.held);
    const double excess = s.worst_excess();
    MESSAGE("C4: A granted " << static_cast<double>(r2.v[1]) / kUnits
                             << " tokens after the flush; worst window " << excess
                             << " tokens against burst + rate x T");
    CHECK(excess <= 0.01);
}

// C6: a rolling upgrade (the previous protocol's script, tests/global/lease_v1.hpp) while a host
// with another lease_ttl calls the new script: refused (LIMTTL), it still rewrote the fence entry
// "~lim-protocol-2" with its own, shorter, TIME + ttl + grace (50 + 50 ms), ending the fence
// while A held the whole burst under the new protocol (its deadline 500 ms after its call): the
// old host was then granted the old bucket (refilled since its previous call) and both spent a
// burst within 0.2 s. The fence entry's expiry now never moves earlier.
TEST_CASE(
    "C6 [over-admission]: a refused caller's shorter ttl ends the previous protocol's fence") {
    if (no_redis_server()) return;
    PlainRedis redis;
    constexpr long long kTtl = 500'000;
    const long long burst = 10 * kUnits;
    const long long rate = 10 * kUnits;
    Sim s(redis.server.port(), burst, rate);
    const auto old_call = [&](long long want) {
        redisReply* r = s.cmd({"EVAL", lim::test::kLeaseScriptV1, "2", "lim:global:{k}",
                               "lim:global:{k}:leases", "o", "0", "0", std::to_string(want),
                               std::to_string(kTtl), std::to_string(burst), std::to_string(rate),
                               std::to_string(kTtl)});
        std::vector<long long> out;
        if (r != nullptr && r->type == REDIS_REPLY_ARRAY) {
            for (std::size_t i = 0; i < r->elements; ++i)
                out.push_back(r->element[i]->integer);
        }
        if (r != nullptr) freeReplyObject(r);
        return out;
    };
    // The old host's first call: its state and its fence (1 s of TIME), long before.
    REQUIRE(old_call(0).size() == 3);
    Host a{"a", "00000000000000a1", kTtl};
    Host x{"x", "00000000000000c1", 50'000};  // another lease_ttl (refused: LIMTTL)
    Host o{"o", "", kTtl};
    fill(s, a, burst);  // A holds the whole burst of the new protocol
    const std::int64_t t0 = a.asked;
    sleep_until_us(t0 + 20'000);
    CHECK(s.call(x, burst).error.rfind("LIMTTL", 0) == 0);
    sleep_until_us(t0 + 200'000);
    const auto g = old_call(burst);
    REQUIRE(g.size() == 3);
    o.held = g[1];
    o.deadline = mono_us() + kTtl;
    s.spend(o, o.held);
    s.spend(a, a.held);  // before A's deadline, t0 + 500 ms
    const double excess = s.worst_excess();
    MESSAGE("C6: the old host granted " << static_cast<double>(g[1]) / kUnits
                                        << " tokens while A held the burst; worst window " << excess
                                        << " tokens against burst + rate x T");
    CHECK(excess <= 0.01);
}
