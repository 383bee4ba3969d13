#include "baselines/redis_gcra.hpp"

#include <hiredis/hiredis.h>

#include <stdexcept>
#include <string>

namespace lim_bench {
namespace {

// GCRA: the bucket is one number, the theoretical arrival time (TAT) of the next token, in
// microseconds of the server's clock. A take of n moves it n emission intervals later; it is
// refused if that would put it more than the burst tolerance ahead of now.
constexpr const char* kScript = R"lua(
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval * n
if new_tat - now > tolerance then return 0 end
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(tolerance / 1000) + 1000)
return 1
)lua";

struct Reply {
    redisReply* r;
    explicit Reply(void* p) : r(static_cast<redisReply*>(p)) {}
    ~Reply() {
        if (r) freeReplyObject(r);
    }
    Reply(const Reply&) = delete;
    Reply& operator=(const Reply&) = delete;
};

}  // namespace

RedisGcra::RedisGcra(const std::string& host, int port) {
    ctx_ = redisConnect(host.c_str(), port);
    if (ctx_ == nullptr || ctx_->err) {
        const std::string why = ctx_ ? ctx_->errstr : "out of memory";
        if (ctx_) redisFree(ctx_);
        ctx_ = nullptr;
        throw std::runtime_error("redis connect " + host + ":" + std::to_string(port) + ": " + why);
    }
    Reply reply(redisCommand(ctx_, "SCRIPT LOAD %s", kScript));
    if (!reply.r || reply.r->type != REDIS_REPLY_STRING) {
        redisFree(ctx_);
        ctx_ = nullptr;
        throw std::runtime_error("redis SCRIPT LOAD failed");
    }
    sha_.assign(reply.r->str, reply.r->len);
}

RedisGcra::~RedisGcra() {
    if (ctx_) redisFree(ctx_);
}

bool RedisGcra::try_take(const std::string& key, double burst, double rate_per_sec, int n) {
    const double interval_us = 1e6 / rate_per_sec;
    const std::string interval = std::to_string(interval_us);
    const std::string tolerance = std::to_string(interval_us * burst);
    const std::string count = std::to_string(n);
    Reply reply(redisCommand(ctx_, "EVALSHA %s 1 %s %s %s %s", sha_.c_str(), key.c_str(),
                             interval.c_str(), tolerance.c_str(), count.c_str()));
    if (!reply.r) throw std::runtime_error("redis: connection lost");
    if (reply.r->type != REDIS_REPLY_INTEGER)
        throw std::runtime_error("redis EVALSHA: " +
                                 std::string(reply.r->str ? reply.r->str : "?"));
    return reply.r->integer == 1;
}

}  // namespace lim_bench
