#include "create_kinds.hpp"

#include <fmt/format.h>

#include "common.hpp"
#include "lim/semaphore.hpp"

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
    } else {
        r.fail("kind", fmt::format("'{}' is not a kind lim knows", kind));
    }
    r.finish();
    return spec;
}

}  // namespace limctl
