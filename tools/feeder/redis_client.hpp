// A small synchronous Redis client over hiredis: connect with a timeout, run a loaded script by
// EVALSHA (loading it again after NOSCRIPT, as after a restart of Redis), reconnect on failure.
// Every call returns std::nullopt when Redis cannot be reached or answers an error; it never
// blocks longer than the timeout given at construction (per connect, per command).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

struct redisContext;

namespace lim::feeder {

struct RedisAddress {
    std::string host = "127.0.0.1";
    int port = 6379;
    int db = 0;
};

// Parses redis://host:port[/db]; throws std::invalid_argument with a message otherwise.
RedisAddress parse_redis_url(const std::string& url);

class RedisClient {
  public:
    RedisClient(RedisAddress address, std::chrono::microseconds timeout);
    ~RedisClient();
    RedisClient(const RedisClient&) = delete;
    RedisClient& operator=(const RedisClient&) = delete;

    // Registers a script; returns its index for eval().
    std::size_t add_script(std::string source);

    // EVALSHA of script `index` with keys and args; the reply's integers (an integer reply gives
    // one). std::nullopt on any failure (the connection is dropped and retried on the next call).
    std::optional<std::vector<long long>> eval(std::size_t index,
                                               const std::vector<std::string>& keys,
                                               const std::vector<std::string>& args);

    // Whether a connection is open: after eval's failure, false if Redis did not answer (the
    // connection was dropped), true if it answered with an error or an unexpected reply.
    bool connected() const noexcept { return ctx_ != nullptr; }

    // The last failure, for logs.
    const std::string& last_error() const noexcept { return last_error_; }

  private:
    bool ensure_connected();
    bool load_scripts();
    void drop();

    RedisAddress address_;
    std::chrono::microseconds timeout_;
    redisContext* ctx_ = nullptr;
    std::vector<std::string> sources_;
    std::vector<std::string> shas_;
    std::string last_error_;
};

}  // namespace lim::feeder
