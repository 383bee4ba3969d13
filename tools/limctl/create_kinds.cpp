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

std::string create_limiter(const lim::Segment& seg, const std::string& key, const std::string& kind,
                           TableReader& r) {
    const std::uint32_t before = seg.info().limiters;
    if (kind == "semaphore") {
        lim::Semaphore::open(seg, key, {.capacity = require_count(r, "capacity")});
    } else {
        r.fail("kind", fmt::format("'{}' is not a kind lim knows", kind));
    }
    return seg.info().limiters > before ? "created" : "exists";
}

}  // namespace limctl
