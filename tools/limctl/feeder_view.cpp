#include "feeder_view.hpp"

#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <memory>

#include "../feeder/status.hpp"
#include "commands.hpp"
#include "common.hpp"
#include "render.hpp"

namespace limctl {
namespace {

using lim::detail::Quantity;
using lim::detail::RecordSnapshot;

const RecordSnapshot* find(const lim::detail::SegmentSnapshot& s, const std::string& key) {
    for (const RecordSnapshot& r : s.records) {
        if (r.key == key) return &r;
    }
    return nullptr;
}

std::optional<double> value_of(const RecordSnapshot& r, const std::string& name) {
    for (const Quantity& q : r.values) {
        if (q.name == name) return q.value;
    }
    for (const Quantity& q : r.layers) {
        if (q.name == name) return q.value;
    }
    return std::nullopt;
}

std::optional<double> capacity_of(const RecordSnapshot& r, const std::string& name) {
    for (const Quantity& q : r.layers) {
        if (q.name == name) return q.capacity;
    }
    return std::nullopt;
}

}  // namespace

std::vector<FeederLease> feeder_leases(const lim::detail::SegmentSnapshot& s) {
    std::vector<FeederLease> out;
    for (const RecordSnapshot& r : s.records) {
        if (r.kind != "limiter") continue;
        const RecordSnapshot* lease = find(s, lim::feeder::lease_status_key(r.key));
        const RecordSnapshot* contact = find(s, lim::feeder::contact_status_key(r.key));
        if (lease == nullptr || contact == nullptr || lease->kind != "backoff_window" ||
            contact->kind != "backoff_window") {
            continue;
        }
        FeederLease l;
        l.key = r.key;
        // Held here: what the target leaves outside flight (bucket + hopper).
        const auto in_flight = value_of(r, "tokens_in_flight");
        const auto target = capacity_of(r, "tokens_in_flight");
        if (in_flight && target) l.held = std::max(0.0, *target - *in_flight);
        l.expires_in = value_of(*lease, "backoff_remaining").value_or(0);
        const double horizon = static_cast<double>(lim::feeder::kContactHorizon.count());
        const double remaining = value_of(*contact, "backoff_remaining").value_or(0);
        if (remaining > 0) l.last_contact_ago = std::max(0.0, horizon - remaining);
        out.push_back(l);
    }
    return out;
}

std::string render_feeder_leases(const std::vector<FeederLease>& leases) {
    Table t({"GLOBAL RATE", "LEASE HELD>", "EXPIRES IN>", "LAST REDIS CONTACT>"});
    for (const FeederLease& l : leases) {
        t.add({l.key, fmt::format("{:g}", l.held),
               l.expires_in > 0 ? fmt::format("{:.3f}s", l.expires_in) : "expired",
               l.last_contact_ago ? fmt::format("{:.3f}s ago", *l.last_contact_ago)
                                  : "none for an hour"});
    }
    return t.render();
}

nlohmann::json feeder_leases_json(const std::vector<FeederLease>& leases) {
    nlohmann::json out = nlohmann::json::array();
    for (const FeederLease& l : leases) {
        nlohmann::json j{{"key", l.key},
                         {"lease_held_tokens", l.held},
                         {"lease_expires_in_seconds", l.expires_in}};
        j["last_contact_seconds_ago"] =
            l.last_contact_ago ? nlohmann::json(*l.last_contact_ago) : nlohmann::json(nullptr);
        out.push_back(j);
    }
    return out;
}

nlohmann::json segment_json(const lim::detail::SegmentSnapshot& s) {
    nlohmann::json j = to_json(s);
    const std::vector<FeederLease> leases = feeder_leases(s);
    if (leases.empty()) return j;
    auto& records = j["records"];  // in the order of s.records; keys there are escaped
    for (std::size_t i = 0; i < s.records.size() && i < records.size(); ++i) {
        if (s.records[i].kind != "limiter") continue;
        for (const FeederLease& l : leases) {
            if (l.key == s.records[i].key) {
                records[i]["global_lease"] = feeder_leases_json({l}).at(0);
            }
        }
    }
    return j;
}

std::string render_feeder_prometheus(const std::string& segment,
                                     const std::vector<FeederLease>& leases) {
    if (leases.empty()) return {};
    std::string held =
        "# HELP lim_feeder_lease_held_tokens Tokens of the global lease held on this host "
        "(unspent).\n# TYPE lim_feeder_lease_held_tokens gauge\n";
    std::string expiry =
        "# HELP lim_feeder_lease_expires_in_seconds Time to the local lease deadline (0: no "
        "lease).\n# TYPE lim_feeder_lease_expires_in_seconds gauge\n";
    std::string contact =
        "# HELP lim_feeder_last_contact_seconds Seconds since lim-feeder last heard from Redis.\n# "
        "TYPE lim_feeder_last_contact_seconds gauge\n";
    for (const FeederLease& l : leases) {
        const std::string labels = fmt::format("segment=\"{}\",key=\"{}\"", segment, l.key);
        // As every other sample limctl prints: whole numbers bare, others to 4 decimals (not
        // the shortest round-trip form, 2.310299999999984).
        held += fmt::format("lim_feeder_lease_held_tokens{{{}}} {}\n", labels,
                            prometheus_value(l.held));
        expiry += fmt::format("lim_feeder_lease_expires_in_seconds{{{}}} {}\n", labels,
                              prometheus_value(l.expires_in));
        contact += fmt::format("lim_feeder_last_contact_seconds{{{}}} {}\n", labels,
                               prometheus_value(l.last_contact_ago.value_or(3600.0)));
    }
    return held + expiry + contact;
}

void add_feeder_command(CLI::App& app, Action& action) {
    struct Args {
        std::string segment;
        bool json = false;
    };
    auto a = std::make_shared<Args>();
    auto* leases = app.add_subcommand(
        "leases", "Show lim-feeder's global leases: held, expiry, last contact with Redis");
    leases->add_option("segment", a->segment, "Segment name")->required();
    leases->add_flag("--json", a->json, "Print JSON");
    leases->callback([&action, a] {
        action = [a] {
            const auto state = open_read_only(a->segment);
            const auto s = lim::detail::snapshot_segment(*state, lim::Clock::now());
            const auto l = feeder_leases(s);
            if (a->json) {
                fmt::print("{}\n", feeder_leases_json(l).dump(
                                       2, ' ', false, nlohmann::json::error_handler_t::replace));
            } else if (l.empty()) {
                fmt::print("segment '{}' has no global rate fed by lim-feeder\n", a->segment);
            } else {
                fmt::print("{}", render_feeder_leases(l));
            }
            return kExitOk;
        };
    });
}

}  // namespace limctl
