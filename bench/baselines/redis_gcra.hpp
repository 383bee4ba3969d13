// A GCRA token bucket in Redis 7, the way a service shares a rate limit through Redis: one
// EVALSHA round trip per take, the script reading the server's TIME so that clients need not
// agree on a clock. The baseline lim's TokenBucket is compared with (bench/suite).
#pragma once

#include <cstdint>
#include <string>

struct redisContext;

namespace lim_bench {

class RedisGcra {
  public:
    // Connects to host:port over TCP and loads the script (SCRIPT LOAD). Blocks for the round
    // trips; throws std::runtime_error if the server cannot be reached or refuses the script.
    RedisGcra(const std::string& host, int port);
    ~RedisGcra();
    RedisGcra(const RedisGcra&) = delete;
    RedisGcra& operator=(const RedisGcra&) = delete;

    // Takes `n` tokens from the bucket named `key` (at most `burst` tokens, refilled at
    // `rate_per_sec`) if they are there now; returns whether it did. One EVALSHA, blocking for
    // the round trip. Throws std::runtime_error on a connection or script error.
    bool try_take(const std::string& key, double burst, double rate_per_sec, int n = 1);

  private:
    redisContext* ctx_ = nullptr;
    std::string sha_;
};

}  // namespace lim_bench
