// lim-feeder's configuration: the TOML file of SPEC.md ("Beyond one host"), parsed and checked.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "redis_client.hpp"

namespace lim::feeder {

struct GlobalRate {
    std::string key;
    double burst_size = 0;
    double sustained_rate_per_sec = 0;
};

struct GlobalBackoff {
    std::string key;
};

struct Config {
    std::string segment;
    RedisAddress redis;
    std::string host;
    // This feeder's identity beside `host` in Redis (16 hex digits), kept in its segment's lock
    // file (main.cpp): the same across restarts on one machine, different for another segment or
    // machine, so that two feeders that share a `host` name are told apart (docs/global.md).
    std::string instance;
    std::chrono::microseconds refresh{100'000};
    std::chrono::microseconds lease_ttl{1'000'000};
    bool fail_open = false;  // on_redis_down = "open", or fail_open = true
    std::vector<GlobalRate> rates;
    std::vector<GlobalBackoff> backoffs;
};

// Reads and checks the file; throws std::invalid_argument with a message naming the key.
Config load_config(const std::string& path);

// "100ms", "1s", "2.5s", "500us", "1m": a duration; throws std::invalid_argument otherwise.
std::chrono::microseconds parse_duration(const std::string& text);

}  // namespace lim::feeder
