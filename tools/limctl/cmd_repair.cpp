// limctl reap, reset, rm: the commands that change a segment, for repairing it after a crash.
#include <fmt/format.h>

#include <memory>
#include <string>

#include "commands.hpp"
#include "common.hpp"
#include "inspect/snapshot.hpp"
#include "lim/error.hpp"
#include "render.hpp"
#include "shm/names.hpp"

namespace limctl {
namespace {

int run_reap(const std::string& segment, bool json) {
    lim::Segment seg = open_read_write(segment);
    const lim::ReapReport report = seg.reap();
    if (json) {
        nlohmann::json reaped = nlohmann::json::array();
        for (const auto& p : report.reaped) {
            nlohmann::json returned = nlohmann::json::array();
            for (const auto& r : p.returned) {
                returned.push_back({{"kind", r.kind},
                                    {"key", lim::detail::printable(r.key)},
                                    {"layer", r.layer},
                                    {"amount", r.amount}});
            }
            reaped.push_back({{"pid", p.pid}, {"slots", p.slots}, {"returned", returned}});
        }
        nlohmann::json deferred = nlohmann::json::array();
        for (const auto& key : report.deferred)
            deferred.push_back(lim::detail::printable(key));
        fmt::print(
            "{}\n",
            nlohmann::json{{"segment", segment}, {"reaped", reaped}, {"deferred", deferred}}.dump(
                2, ' ', false, nlohmann::json::error_handler_t::replace));
        return kExitOk;
    }
    if (report.reaped.empty() && report.deferred.empty()) {
        fmt::print("segment {}: no dead processes\n", segment);
        return kExitOk;
    }
    Table t({"PID>", "SLOTS>", "RETURNED"});
    for (const auto& p : report.reaped) {
        std::string returned;
        for (const auto& r : p.returned) {
            if (!returned.empty()) returned += ", ";
            returned += fmt::format("{} {} to {} '{}'", lim::detail::format_amount(r.amount),
                                    r.layer, r.kind, lim::detail::printable(r.key));
        }
        t.add({std::to_string(p.pid), std::to_string(p.slots),
               returned.empty() ? "nothing held" : returned});
    }
    fmt::print("segment {}: reaped {} dead process(es)\n{}", segment, report.reaped.size(),
               t.render());
    for (const auto& key : report.deferred) {
        fmt::print(
            "deferred '{}': a live process is stopped in the middle of an operation on it; "
            "run reap again once it continues\n",
            lim::detail::printable(key));
    }
    return kExitOk;
}

int run_reset(const std::string& segment, const std::string& key, bool force) {
    lim::Segment seg = open_read_write(segment);
    seg.reset({.key = key, .force = force});
    if (key.empty()) {
        fmt::print("segment {}: every limiter reset to its configured state\n", segment);
    } else {
        fmt::print("segment {}: '{}' reset to its configured state\n", segment, key);
    }
    return kExitOk;
}

int run_rm(const std::string& segment) {
    if (!lim::Segment::remove(segment)) {
        throw lim::Error(lim::Errc::not_found, fmt::format("segment '{}' does not exist", segment));
    }
    fmt::print("segment {} removed (processes still attached keep using it until they detach)\n",
               segment);
    return kExitOk;
}

}  // namespace

void add_repair_commands(CLI::App& app, Action& action) {
    struct Args {
        std::string segment;
        std::string key;
        bool json = false;
        bool force = false;
    };
    auto a = std::make_shared<Args>();

    auto* reap =
        app.add_subcommand("reap", "Give back what dead processes held, and free their slots");
    reap->add_option("segment", a->segment, "Segment name")->required();
    reap->add_flag("--json", a->json, "Print JSON");
    reap->callback([&action, a] { action = [a] { return run_reap(a->segment, a->json); }; });

    auto* reset = app.add_subcommand(
        "reset", "Re-initialise every limiter (or one) to its configured state after a crash");
    reset->add_option("segment", a->segment, "Segment name")->required();
    reset->add_option("key", a->key, "Only this limiter");
    reset->add_flag(
        "--force", a->force,
        "Reset even while other live processes are attached (what they hold is forgotten)");
    reset->callback(
        [&action, a] { action = [a] { return run_reset(a->segment, a->key, a->force); }; });

    auto* rm =
        app.add_subcommand("rm", "Remove a segment's name (attached processes keep their mapping)");
    rm->add_option("segment", a->segment, "Segment name")->required();
    rm->callback([&action, a] { action = [a] { return run_rm(a->segment); }; });
}

}  // namespace limctl
