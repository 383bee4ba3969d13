#include "create_kinds.hpp"

#include <fmt/format.h>

#include "common.hpp"
#include "lim/backoff_window.hpp"
#include "lim/dispatch.hpp"
#include "lim/semaphore.hpp"
#include "lim/weighted_semaphore.hpp"

namespace limctl {
namespace {

std::uint64_t require_count(TableReader& r, const std::string& key) {
    const auto v = r.integer(key);
    if (!v) r.fail(key, "missing");
    if (*v < 0) r.fail(key, "must not be negative");
    return static_cast<std::uint64_t>(*v);
}

}  // namespace

LimiterSpec read_limiter(const std::string& key, const std::string& kind, TableReader& r) {
    LimiterSpec spec{key, kind, {}};
    if (kind == "semaphore") {
        const lim::SemaphoreOptions o{.capacity = require_count(r, "capacity")};
        spec.open = [key, o](const lim::Segment& seg) { lim::Semaphore::open(seg, key, o); };
    } else if (kind == "weighted_semaphore") {
        const lim::WeightedSemaphoreOptions o{.capacity = require_count(r, "capacity")};
        spec.open = [key, o](const lim::Segment& seg) {
            lim::WeightedSemaphore::open(seg, key, o);
        };
    } else if (kind == "dispatch") {
        // Options as lim::DispatchOptions names them; `limiter` names the BackoffWindow (by
        // default the Dispatch's own key, as Foundation's examples do).
        const std::string window = r.string("limiter").value_or(key);
        const auto count = [&](const char* name) -> std::optional<std::uint64_t> {
            const auto v = r.integer(name);
            if (v && *v < 0) r.fail(name, "must not be negative");
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
        r.fail("kind", fmt::format("'{}' is not a kind lim knows", kind));
    }
    r.finish();
    return spec;
}

}  // namespace limctl
