// limctl ls, show, stats: read commands. They map segments read-only and never write.
#include <dirent.h>

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "commands.hpp"
#include "common.hpp"
#include "feeder_view.hpp"
#include "inspect/snapshot.hpp"
#include "lim/error.hpp"
#include "render.hpp"
#include "shm/names.hpp"

namespace limctl {
namespace {

std::vector<std::string> segment_names() {
    std::vector<std::string> names;
    DIR* dir = ::opendir("/dev/shm");
    if (dir == nullptr) return names;
    while (const dirent* e = ::readdir(dir)) {
        const std::string file = e->d_name;
        if (file.rfind("lim.", 0) == 0 && file.size() > 4) names.push_back(file.substr(4));
    }
    ::closedir(dir);
    std::sort(names.begin(), names.end());
    return names;
}

int run_ls(bool json) {
    nlohmann::json out = nlohmann::json::array();
    Table t({"SEGMENT", "SIZE>", "LIMITERS>", "PROCESSES>", "CREATED (UTC)", "STATUS"});
    for (const std::string& raw : segment_names()) {
        // Any user can name a file in /dev/shm: what is printed is escaped (no terminal
        // sequences, no newlines forging rows, valid UTF-8 for JSON).
        const std::string name = lim::detail::printable(raw);
        try {
            const auto state = open_read_only(raw);
            const lim::SegmentInfo info = state->info();
            const auto created = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                     info.created.time_since_epoch())
                                     .count();
            nlohmann::json j = to_json(info);
            // The segment object of show --json, as docs/limctl.md says ls --json gives.
            j["reaps_total"] = state->header().reaps_total.load(std::memory_order_relaxed);
            j["status"] = "ok";
            out.push_back(j);
            t.add({name, format_bytes(static_cast<double>(info.size_bytes)),
                   fmt::format("{}/{}", info.limiters, info.max_limiters),
                   std::to_string(info.processes), format_wall_time(created), "ok"});
        } catch (const lim::detail::UnreadySegment& e) {
            // Being created, or abandoned half-way: a read command reports it and moves on.
            out.push_back({{"name", name}, {"status", "unready"}, {"error", e.what()}});
            t.add({name, "", "", "", "", "unready"});
        } catch (const lim::Error& e) {
            out.push_back(
                {{"name", name}, {"status", lim::to_string(e.code())}, {"error", e.what()}});
            t.add({name, "", "", "", "", std::string(lim::to_string(e.code()))});
        }
    }
    if (json) {
        fmt::print("{}\n", out.dump(2, ' ', false, nlohmann::json::error_handler_t::replace));
    } else if (t.empty()) {
        fmt::print("no lim segments in /dev/shm\n");
    } else {
        fmt::print("{}", t.render());
    }
    return kExitOk;
}

int run_show(const std::string& segment, const std::string& key, bool json, bool processes) {
    const auto state = open_read_only(segment);
    const lim::detail::SegmentSnapshot s = lim::detail::snapshot_segment(*state, lim::Clock::now());
    if (!key.empty()) {
        const bool known = std::any_of(s.records.begin(), s.records.end(),
                                       [&](const auto& r) { return r.key == key; });
        if (!known) {
            throw lim::Error(lim::Errc::not_found,
                             fmt::format("segment '{}' has no limiter '{}'", segment, key));
        }
        // A global rate's lease (held, expiry, the feeder's last contact), as `limctl leases`
        // shows it, so that the key's own view answers "why does this worker stall?" too.
        std::vector<FeederLease> lease = feeder_leases(s);
        std::erase_if(lease, [&](const FeederLease& l) { return l.key != key; });
        if (json) {
            nlohmann::json records = nlohmann::json::array();
            for (const auto& r : s.records) {
                if (r.key != key) continue;
                nlohmann::json j = to_json(r);
                if (!lease.empty() && r.kind == "limiter") {
                    j["global_lease"] = feeder_leases_json(lease).at(0);
                }
                records.push_back(std::move(j));
            }
            fmt::print("{}\n", nlohmann::json{{"segment", segment}, {"records", records}}.dump(
                                   2, ' ', false, nlohmann::json::error_handler_t::replace));
        } else {
            fmt::print("{}", render_record_detail(s, key));
            if (!lease.empty()) fmt::print("\n{}", render_feeder_leases(lease));
        }
        return kExitOk;
    }
    if (json) {
        fmt::print("{}\n",
                   segment_json(s).dump(2, ' ', false, nlohmann::json::error_handler_t::replace));
        return kExitOk;
    }
    fmt::print("{}", render_overview(s));
    if (const auto leases = feeder_leases(s); !leases.empty()) {
        fmt::print("\n{}", render_feeder_leases(leases));
    }
    if (processes) fmt::print("\n{}", render_processes(s));
    return kExitOk;
}

int run_stats(const std::string& segment, const std::string& format) {
    const auto state = open_read_only(segment);
    const auto s = lim::detail::snapshot_segment(*state, lim::Clock::now());
    if (format == "prometheus") {
        fmt::print("{}", render_prometheus(s));
        fmt::print("{}", render_feeder_prometheus(segment, feeder_leases(s)));
    } else {
        fmt::print("{}\n",
                   segment_json(s).dump(2, ' ', false, nlohmann::json::error_handler_t::replace));
    }
    return kExitOk;
}

}  // namespace

void add_read_commands(CLI::App& app, Action& action) {
    struct Args {
        std::string segment;
        std::string key;
        std::string format = "prometheus";
        bool json = false;
        bool processes = false;
    };
    auto a = std::make_shared<Args>();

    auto* ls = app.add_subcommand("ls", "List the lim segments in /dev/shm");
    ls->add_flag("--json", a->json, "Print JSON");
    ls->callback([&action, a] { action = [a] { return run_ls(a->json); }; });

    auto* show =
        app.add_subcommand("show", "Show a segment's limiters, or everything about one key");
    show->add_option("segment", a->segment, "Segment name")->required();
    show->add_option("key", a->key, "Limiter key: show its configuration, layers and holders");
    show->add_flag("--json", a->json, "Print JSON");
    show->add_flag("-p,--processes", a->processes, "Also list the process table");
    show->callback([&action, a] {
        action = [a] { return run_show(a->segment, a->key, a->json, a->processes); };
    });

    auto* stats = app.add_subcommand("stats", "Export a segment's metrics");
    stats->add_option("segment", a->segment, "Segment name")->required();
    stats->add_option("--format", a->format, "prometheus (default) or json")
        ->check(CLI::IsMember({"prometheus", "json"}));
    stats->add_flag("--json", a->json, "Same as --format json");
    stats->callback([&action, a] {
        action = [a] { return run_stats(a->segment, a->json ? "json" : a->format); };
    });
}

}  // namespace limctl
