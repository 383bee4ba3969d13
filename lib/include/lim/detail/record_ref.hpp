// lim/detail/record_ref.hpp: what a limiter handle holds. Not part of the API.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>

namespace lim::detail {

class SegmentState;
struct Record;

// Keeps the segment's mapping alive and names one record in it (by index, and by its address in
// this process's mapping).
struct RecordRef {
    std::shared_ptr<SegmentState> state;
    std::uint32_t index = 0;
    Record* record = nullptr;

    std::string_view key() const noexcept;
};

}  // namespace lim::detail
