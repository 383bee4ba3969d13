// What limiter tests read of a segment's internals: a limiter record's index and body, its
// bucket word's generation, the process table's occupied slots, and what the calling thread's
// ledger holds in a record.
#pragma once

#include <doctest/doctest.h>

#include <cstdint>
#include <string_view>

#include "lim/segment.hpp"
#include "limiter/limiter_state.hpp"
#include "shm/process_table.hpp"
#include "shm/records.hpp"

namespace lim::test {

// The record of the limiter `key` (it must exist).
inline std::uint32_t record_of(const Segment& seg, std::string_view key) {
    const auto r = detail::find_record(*seg.state(), detail::RecordKind::limiter, key);
    REQUIRE(r.has_value());
    return *r;
}

// The body of the limiter `key` (it must exist).
inline detail::LimiterBody& body_of(const Segment& seg, std::string_view key) {
    return *reinterpret_cast<detail::LimiterBody*>(seg.state()->record(record_of(seg, key)).body);
}

// The generation of `body`'s bucket word (one more per configuration switch, 16 bits).
inline std::uint32_t generation(const detail::LimiterBody& body) {
    return detail::BucketWord::gen(body.bucket.load());
}

// How many slots of the process table are occupied (by live or dead owners).
inline std::uint32_t occupied(const Segment& seg) {
    std::uint32_t n = 0;
    const auto& s = *seg.state();
    for (std::uint32_t i = 0; i < s.geometry().max_processes; ++i)
        n += detail::slot_is_occupied(s.slot(i).owner.load());
    return n;
}

// What the calling thread holds in `record`, by its ledger.
inline std::int64_t my_holding(const Segment& seg, std::uint32_t record) {
    return detail::holder(*seg.state()).entry(record).held[0].load();
}

}  // namespace lim::test
