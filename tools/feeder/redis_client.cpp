#include "redis_client.hpp"

#include <hiredis/hiredis.h>
#include <sys/time.h>

#include <algorithm>
#include <charconv>
#include <stdexcept>

namespace lim::feeder {
namespace {

struct ReplyDeleter {
    void operator()(redisReply* r) const noexcept { freeReplyObject(r); }
};
using Reply = std::unique_ptr<redisReply, ReplyDeleter>;

int parse_int(const std::string& s, const std::string& url, int lo, int hi) {
    int v = 0;
    const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc{} || p != s.data() + s.size() || v < lo || v > hi) {
        throw std::invalid_argument("redis address '" + url + "': '" + s +
                                    "' is not a number from " + std::to_string(lo) + " to " +
                                    std::to_string(hi));
    }
    return v;
}

timeval to_timeval(std::chrono::microseconds us) {
    timeval tv{};
    tv.tv_sec = static_cast<time_t>(us.count() / 1'000'000);
    tv.tv_usec = static_cast<suseconds_t>(us.count() % 1'000'000);
    return tv;
}

}  // namespace

RedisAddress parse_redis_url(const std::string& url) {
    const std::string scheme = "redis://";
    if (url.rfind(scheme, 0) != 0) {
        throw std::invalid_argument("redis address '" + url + "' must be redis://host:port[/db]");
    }
    std::string rest = url.substr(scheme.size());
    RedisAddress a;
    if (const auto slash = rest.find('/'); slash != std::string::npos) {
        const std::string db = rest.substr(slash + 1);
        if (!db.empty()) a.db = parse_int(db, url, 0, 1'000'000);
        rest.resize(slash);
    }
    if (const auto colon = rest.rfind(':'); colon != std::string::npos) {
        a.port = parse_int(rest.substr(colon + 1), url, 1, 65535);
        rest.resize(colon);
    }
    if (rest.empty()) throw std::invalid_argument("redis address '" + url + "' names no host");
    a.host = rest;
    return a;
}

RedisClient::RedisClient(RedisAddress address, std::chrono::microseconds timeout,
                         std::chrono::microseconds max_timeout)
    : address_(std::move(address)),
      base_timeout_(timeout),
      max_timeout_(std::max(timeout, max_timeout)),
      timeout_(timeout) {}

RedisClient::~RedisClient() {
    drop();
}

std::size_t RedisClient::add_script(std::string source) {
    sources_.push_back(std::move(source));
    shas_.emplace_back();
    if (ctx_ != nullptr) load_scripts();
    return sources_.size() - 1;
}

void RedisClient::drop() {
    if (ctx_ != nullptr) redisFree(ctx_);
    ctx_ = nullptr;
}

void RedisClient::no_answer() {
    drop();
    timeout_ = std::min(max_timeout_, 2 * timeout_);
}

void RedisClient::answered() {
    if (timeout_ <= base_timeout_) return;
    timeout_ = std::max(base_timeout_, timeout_ / 2);
    // The connection keeps the timeout it was opened with until told otherwise. If it cannot
    // be told, the next call reconnects with the new one.
    if (ctx_ != nullptr && redisSetTimeout(ctx_, to_timeval(timeout_)) != REDIS_OK) drop();
}

bool RedisClient::ensure_connected() {
    if (ctx_ != nullptr) return true;
    const timeval tv = to_timeval(timeout_);
    ctx_ = redisConnectWithTimeout(address_.host.c_str(), address_.port, tv);
    if (ctx_ == nullptr || ctx_->err != 0) {
        last_error_ = ctx_ != nullptr ? ctx_->errstr : "cannot allocate a connection";
        no_answer();
        return false;
    }
    if (redisSetTimeout(ctx_, tv) != REDIS_OK) {
        last_error_ = "cannot set the command timeout";
        drop();
        return false;
    }
    if (address_.db != 0) {
        Reply r(static_cast<redisReply*>(redisCommand(ctx_, "SELECT %d", address_.db)));
        if (!r || r->type == REDIS_REPLY_ERROR) {
            last_error_ = r ? r->str : ctx_->errstr;
            if (r) {
                drop();
            } else {
                no_answer();
            }
            return false;
        }
    }
    return load_scripts();
}

bool RedisClient::load_scripts() {
    for (std::size_t i = 0; i < sources_.size(); ++i) {
        Reply r(static_cast<redisReply*>(
            redisCommand(ctx_, "SCRIPT LOAD %b", sources_[i].data(), sources_[i].size())));
        if (!r || r->type != REDIS_REPLY_STRING) {
            last_error_ = r ? (r->str != nullptr ? r->str : "SCRIPT LOAD failed") : ctx_->errstr;
            if (r) {
                drop();
            } else {
                no_answer();
            }
            return false;
        }
        shas_[i].assign(r->str, r->len);
    }
    return true;
}

std::optional<std::vector<long long>> RedisClient::eval(std::size_t index,
                                                        const std::vector<std::string>& keys,
                                                        const std::vector<std::string>& args) {
    for (int attempt = 0; attempt < 2; ++attempt) {
        if (!ensure_connected()) return std::nullopt;
        const std::string nkeys = std::to_string(keys.size());
        std::vector<const char*> argv{"EVALSHA", shas_[index].c_str(), nkeys.c_str()};
        std::vector<std::size_t> lens{7, shas_[index].size(), nkeys.size()};
        for (const auto* list : {&keys, &args}) {
            for (const std::string& s : *list) {
                argv.push_back(s.data());
                lens.push_back(s.size());
            }
        }
        Reply r(static_cast<redisReply*>(
            redisCommandArgv(ctx_, static_cast<int>(argv.size()), argv.data(), lens.data())));
        if (!r) {
            last_error_ = ctx_->errstr;
            no_answer();
            return std::nullopt;
        }
        answered();
        if (r->type == REDIS_REPLY_ERROR) {
            last_error_.assign(r->str, r->len);
            if (last_error_.rfind("NOSCRIPT", 0) == 0 && load_scripts()) continue;
            return std::nullopt;
        }
        std::vector<long long> out;
        if (r->type == REDIS_REPLY_INTEGER) {
            out.push_back(r->integer);
        } else if (r->type == REDIS_REPLY_ARRAY) {
            for (std::size_t i = 0; i < r->elements; ++i) {
                if (r->element[i]->type != REDIS_REPLY_INTEGER) {
                    last_error_ = "a script answered a non-integer";
                    return std::nullopt;
                }
                out.push_back(r->element[i]->integer);
            }
        } else {
            last_error_ = "a script answered neither an integer nor an array";
            return std::nullopt;
        }
        return out;
    }
    return std::nullopt;
}

}  // namespace lim::feeder
