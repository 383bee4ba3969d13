// lim-feeder's loop: every refresh, for each global rate, renew this host's lease in Redis, take
// what demand needs, give back what it does not, and move it into the local record's token target;
// at the local lease deadline (taken before asking Redis) remove what is unspent. Between refreshes
// (every refresh / 4), a rate that starves calls early. For each global backoff, merge the local
// BackoffWindow with the shared deadline (max, never shortening).
#pragma once

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "config.hpp"
#include "lim/backoff_window.hpp"
#include "lim/limiter.hpp"
#include "lim/segment.hpp"
#include "redis_client.hpp"

namespace lim::feeder {

class Feeder {
  public:
    // Opens (or creates) the segment and the local records, reconciling with what a previous
    // feeder left there (a live lease is kept until its deadline; an expired one is removed).
    explicit Feeder(Config config);

    // Runs until `stop` becomes true; then gives every lease back (best effort) and returns.
    void run(const std::atomic<bool>& stop);

    // One refresh: every global rate, then every global backoff.
    void tick();

    // A quarter of a refresh after a tick or a look: the lease call of every global rate that
    // starves now (workers asleep on its record, takes refused, or it ran dry while being spent;
    // seen from the record alone, no Redis), as a tick makes it. Nothing while Redis is down.
    void look();

    // Removes every local lease and tells Redis (best effort).
    void give_back();

  private:
    struct Rate {
        GlobalRate g;
        Limiter local;
        BackoffWindow lease_status;
        BackoffWindow contact_status;
        std::optional<TimePoint> deadline;  // the local lease deadline, when a lease is held
        double last_in_flight = 0;
        TimePoint last_tick{};
        double demand = 0;    // tokens per second, smoothed
        double desired = 1;   // tokens the lease should hold
        double sleepers = 0;  // workers asleep on the record, smoothed (the host's weight)
        std::vector<std::string> keys;
        // When this feeder last sent a lease call for this key (answered or not): the lease
        // script's protocol clock advances by at most the time since (docs/global.md).
        std::optional<TimePoint> last_call;
        // Refused demand taken from the record by look() (reading it resets it), which the next
        // lease call adds to its own.
        double refused_seen = 0;
        // Converted at start while a take that read the token bucket's configuration had not
        // ended (a stopped worker): nothing is granted until lim::settle_conversion says so.
        bool settling = false;
    };
    struct Backoff {
        GlobalBackoff g;
        BackoffWindow local;
        std::vector<std::string> keys;
    };

    // tick_rate, except that a lim::Error(busy) (a segment lock held by a stopped neighbour)
    // skips the rate for this tick, saying so once, instead of ending the feeder.
    void tick_rate_or_skip(Rate& r, TimePoint now, bool& redis_ok);
    void tick_rate(Rate& r, TimePoint now, bool& redis_ok);
    bool starving(Rate& r, TimePoint now);
    void tick_backoff(Backoff& b, bool& redis_ok);
    void set_available(Rate& r, double in_flight, double available);
    void feed_open(Rate& r, double in_flight, double& available, double dt);
    void note_contact(Rate& r, TimePoint now);
    void note_lease(Rate& r);
    void log_redis(bool ok);
    std::string elapsed_since_last_call(Rate& r, TimePoint at) const;
    static std::string call_seq(TimePoint at);
    void note_failure(const std::string& key, bool& redis_ok);

    Config config_;
    Segment segment_;
    RedisClient redis_;
    TimePoint started_;  // CLOCK_MONOTONIC at construction
    std::size_t lease_script_ = 0;
    std::size_t backoff_script_ = 0;
    std::vector<Rate> rates_;
    std::vector<Backoff> backoffs_;
    std::optional<bool> redis_up_;
    std::string last_key_error_;
    // Test only: LIM_FEEDER_TEST_STALL, a file while which exists a lease call stalls after its
    // `asked` and before it is sent (tests/global/late_spend_test.cpp). Empty: never.
    std::string test_stall_;
};

}  // namespace lim::feeder
