// The tests' own Redis connection (hiredis), for calling the lease script by hand and inspecting
// what it keeps: a blocking connection to 127.0.0.1 with a 2 s timeout, and raw commands.
#pragma once

#include <doctest/doctest.h>
#include <hiredis/hiredis.h>

#include <cstddef>
#include <optional>
#include <string>
#include <vector>

namespace lim::test {

class RedisTestClient {
  public:
    explicit RedisTestClient(int port) {
        const timeval tv{2, 0};
        c_ = redisConnectWithTimeout("127.0.0.1", port, tv);
        REQUIRE(c_ != nullptr);
        REQUIRE(c_->err == 0);
    }
    ~RedisTestClient() { redisFree(c_); }
    RedisTestClient(const RedisTestClient&) = delete;
    RedisTestClient& operator=(const RedisTestClient&) = delete;

    // The reply to `args` (the caller frees it), or null when the connection failed.
    redisReply* cmd(const std::vector<std::string>& args) {
        std::vector<const char*> argv;
        std::vector<std::size_t> lens;
        for (const auto& a : args) {
            argv.push_back(a.data());
            lens.push_back(a.size());
        }
        return static_cast<redisReply*>(
            redisCommandArgv(c_, static_cast<int>(argv.size()), argv.data(), lens.data()));
    }
    // `args`, its reply dropped.
    void run(const std::vector<std::string>& args) {
        redisReply* r = cmd(args);
        if (r != nullptr) freeReplyObject(r);
    }
    // HGET key field, or nothing when absent.
    std::optional<std::string> hget(const std::string& key, const std::string& field) {
        redisReply* r = cmd({"HGET", key, field});
        std::optional<std::string> out;
        if (r != nullptr && r->type == REDIS_REPLY_STRING) out = std::string(r->str, r->len);
        if (r != nullptr) freeReplyObject(r);
        return out;
    }

  private:
    redisContext* c_ = nullptr;
};

}  // namespace lim::test
