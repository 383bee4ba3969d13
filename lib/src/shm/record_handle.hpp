// What every limiter handle holds, and how every family opens its record: find or create
// (kind, key) with a configuration, and refuse, or adopt, a stored configuration that differs.
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>

#include "lim/detail/record_ref.hpp"
#include "lim/error.hpp"
#include "lim/segment.hpp"
#include "shm/layout.hpp"
#include "shm/records.hpp"
#include "shm/segment_state.hpp"

namespace lim::detail {

template <class Body>
Body& body_of(const RecordRef& ref) noexcept {
    static_assert(sizeof(Body) <= kRecordBodySize, "a family's body must fit the record");
    static_assert(alignof(Body) <= kCacheLine);
    return *reinterpret_cast<Body*>(ref.record->body);
}

template <class Config>
const Config& config_of(const RecordRef& ref) noexcept {
    return *reinterpret_cast<const Config*>(ref.record->config);
}

// Requirements on a family's configuration struct: it is compared byte for byte, so it must have
// no padding (store doubles as their bit patterns in uint64_t) and must fit Record::config.
template <class Config>
constexpr bool is_record_config_v =
    std::is_trivially_copyable_v<Config>&& std::has_unique_object_representations_v<Config> &&
    sizeof(Config) <= kRecordConfigSize;

// Opens (kind, key) in `segment`, creating it with `wanted` if absent (running `init_body` on
// the new record before anyone can see it). If it exists with another configuration (or flavor):
// with `adopt`, attaches with the stored one; otherwise throws Error(config_mismatch) with
// `describe(stored)` and `describe(wanted)` in the message. `what` names the family
// ("semaphore") for messages.
template <class Config>
RecordRef open_record(const Segment& segment, RecordKind kind, std::uint16_t flavor,
                      std::string_view what, std::string_view key, const Config& wanted, bool adopt,
                      const std::function<void(Record&)>& init_body,
                      const std::function<std::string(const Config&, std::uint16_t)>& describe) {
    static_assert(is_record_config_v<Config>);
    const std::shared_ptr<SegmentState>& state = segment.state();
    const OpenedRecord opened = find_or_create_record(*state,
                                                      RecordSpec{.kind = kind,
                                                                 .flavor = flavor,
                                                                 .key = key,
                                                                 .config = &wanted,
                                                                 .config_size = sizeof(Config)},
                                                      init_body);
    RecordRef ref{state, opened.index, opened.record};
    if (!opened.created && !adopt &&
        (load_flavor(opened.record->header) != flavor ||
         !same_config(*opened.record, &wanted, sizeof(Config)))) {
        Config stored;
        std::memcpy(&stored, opened.record->config, sizeof(Config));
        throw Error(Errc::config_mismatch,
                    fmt::format("{} '{}' in segment '{}' exists as {}; asked for {} (pass "
                                "lim::adopt_existing to attach with the stored configuration)",
                                what, key, state->name(),
                                describe(stored, load_flavor(opened.record->header)),
                                describe(wanted, flavor)));
    }
    return ref;
}

}  // namespace lim::detail
