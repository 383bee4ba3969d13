// What limiter tests read of a segment's internals: a limiter record's index, and what the
// calling thread's ledger holds in it.
#pragma once

#include <doctest/doctest.h>

#include <cstdint>
#include <string_view>

#include "lim/segment.hpp"
#include "shm/process_table.hpp"
#include "shm/records.hpp"

namespace lim::test {

// The record of the limiter `key` (it must exist).
inline std::uint32_t record_of(const Segment& seg, std::string_view key) {
    const auto r = detail::find_record(*seg.state(), detail::RecordKind::limiter, key);
    REQUIRE(r.has_value());
    return *r;
}

// What the calling thread holds in `record`, by its ledger.
inline std::int64_t my_holding(const Segment& seg, std::uint32_t record) {
    return detail::holder(*seg.state()).entry(record).held[0].load();
}

}  // namespace lim::test
