// A small synchronous Redis client over hiredis: connect with a timeout, run a loaded script by
// EVALSHA (loading it again after NOSCRIPT, as after a restart of Redis), reconnect on failure.
// Every call returns std::nullopt when Redis cannot be reached or answers an error; it never
// blocks longer than the current timeout (per connect, per command): the base timeout given at
// construction, doubled after each call Redis did not answer in time, up to the maximum, and
// halved back towards the base after each answer. (A fixed timeout shorter than a loaded
// host's or a slow Redis's round trip would give every call up, so that the host was never fed;
// docs/global.md, "Redis slow".)
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
    RedisClient(RedisAddress address, std::chrono::microseconds timeout,
                std::chrono::microseconds max_timeout);
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

    // The timeout the next connect or command will be given.
    std::chrono::microseconds timeout() const noexcept { return timeout_; }

    // The last failure, for logs.
    const std::string& last_error() const noexcept { return last_error_; }

  private:
    bool ensure_connected();
    bool load_scripts();
    void drop();
    // Drops the connection after Redis did not answer (in time), and doubles the timeout.
    void no_answer();
    // After an answer: halves the timeout back towards the base.
    void answered();

    RedisAddress address_;
    std::chrono::microseconds base_timeout_;
    std::chrono::microseconds max_timeout_;
    std::chrono::microseconds timeout_;
    redisContext* ctx_ = nullptr;
    std::vector<std::string> sources_;
    std::vector<std::string> shas_;
    std::string last_error_;
};

}  // namespace lim::feeder
