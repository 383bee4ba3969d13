// libFuzzer target: Retry-After and retry-after-ms values as a server (or anything between it and
// us) could send them, against a `now` anywhere in system_clock's range. Beyond not crashing, the
// parse must keep its contract: never negative, never beyond 2^31 s, zero for dates before `now`.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "lim/retry_after.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using namespace std::chrono;
    std::int64_t now_ns = 0;
    if (size >= sizeof now_ns) {
        std::memcpy(&now_ns, data, sizeof now_ns);
        data += sizeof now_ns;
        size -= sizeof now_ns;
    }
    const system_clock::time_point now{duration_cast<system_clock::duration>(nanoseconds{now_ns})};
    const std::string_view value(reinterpret_cast<const char*>(data), size);
    constexpr milliseconds kMax{(std::int64_t{1} << 31) * 1000};
    for (const auto r : {lim::parse_retry_after(value, now), lim::parse_retry_after_ms(value)}) {
        if (r && (*r < milliseconds{0} || *r > kMax)) std::abort();
    }
    return 0;
}
