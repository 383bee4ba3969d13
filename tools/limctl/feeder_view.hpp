// limctl's view of lim-feeder's global rates (docs/global.md): for each limiter `K` with the
// feeder's status records beside it (feeder.K.lease, feeder.K.contact), the lease held here,
// its expiry and the feeder's last contact with Redis. Rendered by `limctl leases`, appended to
// `limctl show` and to `limctl stats --format prometheus`.
#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <vector>

#include "inspect/snapshot.hpp"

namespace limctl {

struct FeederLease {
    std::string key;
    double held = 0;                         // tokens: target - in flight, in bucket and hopper
    double expires_in = 0;                   // seconds until the local lease deadline (0: none)
    std::optional<double> last_contact_ago;  // seconds since Redis last answered
};

std::vector<FeederLease> feeder_leases(const lim::detail::SegmentSnapshot& s);
std::string render_feeder_leases(const std::vector<FeederLease>& leases);
nlohmann::json feeder_leases_json(const std::vector<FeederLease>& leases);
std::string render_feeder_prometheus(const std::string& segment,
                                     const std::vector<FeederLease>& leases);

// A whole segment as JSON (show --json, stats --json, watch --json): to_json(s), with each global
// rate's lease beside its record under "global_lease", as `show <segment> <key> --json` has it.
nlohmann::json segment_json(const lim::detail::SegmentSnapshot& s);

}  // namespace limctl
