#include "create_kinds.hpp"

#include <fmt/format.h>

#include <cmath>
#include <limits>

#include "common.hpp"
#include "lim/backoff_window.hpp"
#include "lim/dispatch.hpp"
#include "lim/error.hpp"
#include "lim/limiter.hpp"
#include "lim/semaphore.hpp"
#include "lim/throttle.hpp"
#include "lim/throttled_rate_limiter.hpp"
#include "lim/token_bucket.hpp"
#include "lim/weighted_semaphore.hpp"
#include "shm/names.hpp"

namespace limctl {
namespace {

std::string where(const toml::node& node, const std::string& file) {
    const auto& src = node.source();
    return fmt::format("{}:{}", file, src.begin.line);
}

}  // namespace

// ---- TableReader ---------------------------------------------------------------------------

TableReader::TableReader(const toml::table& table, std::string file, std::string context)
    : table_(table), file_(std::move(file)), context_(std::move(context)) {}

[[noreturn]] void TableReader::fail(const std::string& key, const std::string& what) const {
    const toml::node* node = table_.get(key);
    throw UsageError(fmt::format("{}: {}.{}: {}", node ? where(*node, file_) : file_,
                                 lim::detail::printable(context_), lim::detail::printable(key),
                                 what));
}

std::optional<double> TableReader::number(const std::string& key) {
    used_.insert(key);
    const toml::node* node = table_.get(key);
    if (!node) return std::nullopt;
    if (auto v = node->value<double>()) return *v;
    fail(key, "must be a number");
}

std::optional<std::int64_t> TableReader::integer(const std::string& key) {
    used_.insert(key);
    const toml::node* node = table_.get(key);
    if (!node) return std::nullopt;
    if (node->is_integer()) return node->value<std::int64_t>();
    fail(key, "must be an integer");
}

std::optional<std::int64_t> TableReader::integer(const std::string& key, std::int64_t lo,
                                                 std::int64_t hi) {
    const auto v = integer(key);
    if (v && (*v < lo || *v > hi)) fail(key, fmt::format("is {}; it must be {}..{}", *v, lo, hi));
    return v;
}

std::optional<std::string> TableReader::string(const std::string& key) {
    used_.insert(key);
    const toml::node* node = table_.get(key);
    if (!node) return std::nullopt;
    if (auto v = node->value<std::string>()) return *v;
    fail(key, "must be a string");
}

std::optional<lim::InfiniteOrFinite<double>> TableReader::maybe_infinite(const std::string& key) {
    used_.insert(key);
    const toml::node* node = table_.get(key);
    if (!node) return std::nullopt;
    if (auto s = node->value<std::string>()) {
        if (*s == "infinite" || *s == "inf") return lim::InfiniteOrFinite<double>(lim::infinite);
        fail(key, "must be a number or \"infinite\"");
    }
    if (auto v = node->value<double>()) {
        // TOML's own `inf` (and `+inf`) is lim::infinite, as "infinite" is (and as math.inf is
        // in the Python package); -inf and nan stay numbers, for the library to refuse.
        if (std::isinf(*v) && *v > 0) return lim::InfiniteOrFinite<double>(lim::infinite);
        return lim::InfiniteOrFinite<double>(*v);
    }
    fail(key, "must be a number or \"infinite\"");
}

std::optional<std::chrono::nanoseconds> TableReader::duration(const std::string& key) {
    used_.insert(key);
    const toml::node* node = table_.get(key);
    if (!node) return std::nullopt;
    if (auto s = node->value<std::string>()) return parse_duration(*s);
    if (auto v = node->value<double>()) return parse_duration(fmt::format("{}s", *v));
    fail(key, "must be a duration such as \"10s\" or a number of seconds");
}

std::optional<unsigned> TableReader::mode(const std::string& key) {
    used_.insert(key);
    const toml::node* node = table_.get(key);
    if (!node) return std::nullopt;
    const char* const how = "must be octal: 0o660 (a TOML octal integer) or \"0660\"";
    if (const auto* i = node->as_integer()) {
        if ((i->flags() & toml::value_flags::format_as_octal) == toml::value_flags::none) {
            fail(key, fmt::format("{} is a decimal integer; {}", i->get(), how));
        }
        if (i->get() < 0 || i->get() > 07777) fail(key, how);
        return static_cast<unsigned>(i->get());
    }
    const auto text = node->value<std::string>();
    if (!text) fail(key, how);
    // "0660", "660", "0600": octal digits, nothing else.
    const std::string digits = text->size() > 1 && (*text)[0] == '0' ? text->substr(1) : *text;
    if (digits.empty() || digits.size() > 4) fail(key, how);
    unsigned mode = 0;
    for (char c : digits) {
        if (c < '0' || c > '7') fail(key, how);
        mode = mode * 8 + static_cast<unsigned>(c - '0');
    }
    return mode;
}

void TableReader::missing(const std::string& key) {
    missing_.push_back(key);
}

void TableReader::finish() const {
    // An unknown key first: when a required option is also missing, a misspelling of it is the
    // likelier story, and the message names both.
    for (const auto& [k, v] : table_) {
        const std::string key(k.str());
        if (used_.count(key)) continue;
        fail(key, missing_.empty() ? "unknown option"
                                   : fmt::format("unknown option ({}.{} is missing)", context_,
                                                 missing_.front()));
    }
    if (!missing_.empty()) {
        throw UsageError(fmt::format("{}: {}.{}: missing (a required option)", where(table_, file_),
                                     lim::detail::printable(context_), missing_.front()));
    }
}

namespace {

std::uint64_t require_count(TableReader& r, const std::string& key) {
    const auto v = r.integer(key, 0, std::numeric_limits<std::int64_t>::max());
    if (!v) r.missing(key);  // reported by finish(), after any unknown key
    return static_cast<std::uint64_t>(v.value_or(0));
}

double require_number(TableReader& r, const std::string& key) {
    const auto v = r.number(key);
    if (!v) r.missing(key);  // reported by finish(), after any unknown key
    return v.value_or(0);
}

}  // namespace

LimiterSpec read_limiter(const std::string& key, const std::string& kind, TableReader& r) {
    LimiterSpec spec{key, kind, {}};
    if (kind == "semaphore") {
        const lim::SemaphoreOptions o{.capacity = require_count(r, "capacity")};
        spec.open = [key, o](const lim::Segment& seg) { lim::Semaphore::open(seg, key, o); };
    } else if (kind == "token_bucket") {
        const lim::TokenBucketOptions o{
            .burst_size = require_number(r, "burst_size"),
            .sustained_rate_per_sec = require_number(r, "sustained_rate_per_sec"),
            .initial_bucket_level = r.number("initial_bucket_level").value_or(0)};
        spec.open = [key, o](const lim::Segment& seg) { lim::TokenBucket::open(seg, key, o); };
    } else if (kind == "throttle") {
        const lim::ThrottleOptions o{.max_concurrent_jobs = static_cast<std::int64_t>(
                                         require_count(r, "max_concurrent_jobs"))};
        spec.open = [key, o](const lim::Segment& seg) { lim::Throttle::open(seg, key, o); };
    } else if (kind == "throttled_rate_limiter") {
        const lim::ThrottledRateLimiterOptions o{
            .burst_size = require_number(r, "burst_size"),
            .sustained_rate_per_sec = require_number(r, "sustained_rate_per_sec"),
            .max_concurrent_jobs =
                static_cast<std::int64_t>(require_count(r, "max_concurrent_jobs"))};
        spec.open = [key, o](const lim::Segment& seg) {
            lim::ThrottledRateLimiter::open(seg, key, o);
        };
    } else if (kind == "limiter") {
        const lim::LimiterConfig o{
            .hopper_to_bucket_rate_per_sec =
                r.maybe_infinite("hopper_to_bucket_rate_per_sec").value_or(lim::infinite),
            .bucket_size = require_number(r, "bucket_size"),
            .initial_bucket_level = r.number("initial_bucket_level").value_or(0),
            .initial_hopper_level =
                r.maybe_infinite("initial_hopper_level").value_or(lim::infinite)};
        spec.open = [key, o](const lim::Segment& seg) { lim::Limiter::open(seg, key, o); };
    } else if (kind == "weighted_semaphore") {
        const lim::WeightedSemaphoreOptions o{.capacity = require_count(r, "capacity")};
        spec.open = [key, o](const lim::Segment& seg) {
            lim::WeightedSemaphore::open(seg, key, o);
        };
    } else if (kind == "dispatch") {
        // Options as lim::DispatchOptions names them; `limiter` names the BackoffWindow (by
        // default the Dispatch's own key, as Foundation's examples do).
        const std::string window = r.string("limiter").value_or(key);
        try {
            lim::detail::validate_key(window);
        } catch (const lim::Error& e) {
            r.fail("limiter", e.what());
        }
        const auto count = [&](const char* name) -> std::optional<std::uint64_t> {
            const auto v = r.integer(name, 0, std::numeric_limits<std::int64_t>::max());
            return v ? std::optional<std::uint64_t>(static_cast<std::uint64_t>(*v)) : std::nullopt;
        };
        const auto concurrency = count("concurrency");
        const auto throttled = count("throttled_concurrency");
        const auto budget = count("byte_budget");
        const auto penalty = count("byte_penalty_multiplier");
        const auto backoff_window = r.duration("backoff_window");
        spec.open = [=](const lim::Segment& seg) {
            // Start from the API's defaults; the file overrides what it names.
            lim::DispatchOptions o{.limiter = lim::BackoffWindow::for_key(seg, window), .key = key};
            if (concurrency) o.concurrency = *concurrency;
            if (throttled) o.throttled_concurrency = *throttled;
            if (budget) o.byte_budget = *budget;
            if (penalty) o.byte_penalty_multiplier = *penalty;
            if (backoff_window) o.backoff_window = *backoff_window;
            lim::Dispatch::open(seg, o);
        };
    } else {
        r.fail("kind", fmt::format("'{}' is not a kind lim knows", lim::detail::printable(kind)));
    }
    r.finish();
    return spec;
}

// ---- the whole file ------------------------------------------------------------------------

CreatePlan load_create_plan(const toml::table& doc, const std::string& file) {
    CreatePlan plan;
    for (const auto& [k, v] : doc) {
        const std::string section(k.str());
        if (section != "segment" && section != "limiter") {
            throw UsageError(
                fmt::format("{}: unknown section [{}] (expected [segment] and [limiter.<key>])",
                            where(v, file), lim::detail::printable(section)));
        }
        if (!v.is_table()) {
            throw UsageError(
                fmt::format("{}: '{}' must be a table ([{}])", where(v, file), section, section));
        }
    }
    if (const toml::table* seg = doc["segment"].as_table()) {
        TableReader r(*seg, file, "segment");
        if (auto v = r.integer("max_limiters", 1, std::numeric_limits<std::uint32_t>::max())) {
            plan.options.max_limiters = static_cast<std::uint32_t>(*v);
            plan.max_limiters_given = true;
        }
        if (auto v = r.integer("max_processes", 1, std::numeric_limits<std::uint32_t>::max())) {
            plan.options.max_processes = static_cast<std::uint32_t>(*v);
            plan.max_processes_given = true;
        }
        if (auto v = r.mode("mode")) {
            plan.options.mode = *v;
            plan.mode_given = true;
        }
        if (auto v = r.duration("reap_after")) plan.options.reap_after = *v;
        r.finish();
        try {
            lim::detail::validate_options(plan.options);
        } catch (const lim::Error& e) {
            throw UsageError(fmt::format("{}: [segment]: {}", where(*seg, file), e.what()));
        }
    }
    if (const toml::table* limiters = doc["limiter"].as_table()) {
        for (const auto& [k, v] : *limiters) {
            const std::string key(k.str());
            const toml::table* t = v.as_table();
            if (!t) {
                throw UsageError(fmt::format("{}: limiter.{} must be a table", where(v, file),
                                             lim::detail::printable(key)));
            }
            try {
                lim::detail::validate_key(key);
            } catch (const lim::Error& e) {
                throw UsageError(fmt::format("{}: [limiter]: {}", where(v, file), e.what()));
            }
            TableReader r(*t, file, "limiter." + key);
            const auto kind = r.string("kind");
            if (!kind) {
                r.fail("kind",
                       "missing (dispatch, token_bucket, throttle, throttled_rate_limiter, "
                       "limiter, semaphore, weighted_semaphore)");
            }
            plan.specs.push_back(read_limiter(key, *kind, r));
        }
    }
    return plan;
}

CreatePlan load_create_plan_text(std::string_view text, const std::string& file) {
    toml::table doc;
    try {
        doc = toml::parse(text, file);
    } catch (const toml::parse_error& e) {
        const auto& src = e.source();
        // The parser's description escapes what it quotes ("saw '\\n'"); main() escapes any
        // control byte left when it prints the line.
        throw UsageError(
            fmt::format("{}:{}:{}: {}", file, src.begin.line, src.begin.column, e.description()));
    }
    return load_create_plan(doc, file);
}

}  // namespace limctl
