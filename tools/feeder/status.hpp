// Where lim-feeder leaves its lease state for limctl: beside the local record of a global rate
// `key`, two BackoffWindow records (no new record kind, no layout change):
//   feeder.<key>.lease    until() = the local lease deadline (CLOCK_MONOTONIC); the amount held
//                         is the rate record's own in_limiter() (target - in flight)
//   feeder.<key>.contact  until() = the last time Redis answered + kContactHorizon, so that its
//                         remaining time (all a read-only viewer sees) gives the contact's age:
//                         age = kContactHorizon - remaining; none remaining = no contact for an
//                         hour
// The feeder is their only writer (clear then set, so a reader may briefly see none).
#pragma once

#include <chrono>
#include <string>
#include <string_view>

namespace lim::feeder {

inline constexpr std::chrono::seconds kContactHorizon{3600};

inline std::string lease_status_key(std::string_view key) {
    return "feeder." + std::string(key) + ".lease";
}
inline std::string contact_status_key(std::string_view key) {
    return "feeder." + std::string(key) + ".contact";
}

}  // namespace lim::feeder
