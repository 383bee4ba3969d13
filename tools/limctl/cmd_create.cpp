// limctl create <segment> --config <file.toml>: declares a segment and its limiters from a file in
// the SPEC's format. Every key is an option name of the API; unknown keys are errors (a typo must
// not silently become a default). Idempotent: limiters that exist with the same configuration
// are left alone; one that exists with another configuration is an error.
#include <fmt/format.h>

#include <toml++/toml.h>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>

#include "commands.hpp"
#include "common.hpp"
#include "create_kinds.hpp"
#include "inspect/snapshot.hpp"
#include "lim/error.hpp"
#include "shm/names.hpp"

namespace limctl {
namespace {

std::string slurp_file(const std::string& file) {
    std::ifstream in(file, std::ios::binary);
    if (!in) throw UsageError(fmt::format("cannot read {}", file));
    std::ostringstream text;
    text << in.rdbuf();
    return text.str();
}

}  // namespace
// ---- the command ---------------------------------------------------------------------------

namespace {

// Removes a segment when it goes out of scope, unless released: the dry run's scratch segment,
// and a segment this run created if a later step fails.
class RemoveOnExit {
  public:
    explicit RemoveOnExit(std::string name) : name_(std::move(name)) {}
    ~RemoveOnExit() {
        if (name_.empty()) return;
        try {
            lim::Segment::remove(name_);
        } catch (const lim::Error&) {
        }
    }
    RemoveOnExit(const RemoveOnExit&) = delete;
    RemoveOnExit& operator=(const RemoveOnExit&) = delete;
    void release() { name_.clear(); }

  private:
    std::string name_;
};

// Creates every limiter of the plan in a private scratch segment of the same geometry: lim's own
// validation of every option (ranges, NaN, sizes that do not fit the table) runs before the
// real segment is touched.
void dry_run(const std::string& segment, const CreatePlan& plan) {
    lim::SegmentOptions scratch = plan.options;
    scratch.mode = 0600;
    scratch.max_processes = 1;
    scratch.reap_on_attach = false;
    const std::string name = fmt::format("limctl-dry-run.{}", ::getpid());
    lim::Segment::remove(name);
    RemoveOnExit remove(name);
    const lim::Segment seg = lim::Segment::open_or_create(name, scratch);
    for (const LimiterSpec& spec : plan.specs) {
        try {
            spec.open(seg);
        } catch (const lim::Error& e) {
            throw lim::Error(e.code(), fmt::format("segment '{}': limiter '{}' ({}): {} (nothing "
                                                   "was created)",
                                                   segment, spec.key, spec.kind, e.what()));
        }
    }
}

// An existing segment must have the geometry and mode the file asks for: anything else means the
// file and the segment disagree, which an operator must hear about.
void check_geometry(const std::string& segment, const lim::Segment& seg, const CreatePlan& plan) {
    const lim::SegmentInfo info = seg.info();
    std::vector<std::string> diffs;
    if (plan.max_limiters_given && info.max_limiters != plan.options.max_limiters)
        diffs.push_back(fmt::format("max_limiters {} (file: {})", info.max_limiters,
                                    plan.options.max_limiters));
    if (plan.max_processes_given && info.max_processes != plan.options.max_processes)
        diffs.push_back(fmt::format("max_processes {} (file: {})", info.max_processes,
                                    plan.options.max_processes));
    if (plan.mode_given) {
        struct stat st {};
        if (::fstat(seg.state()->fd(), &st) == 0 && (st.st_mode & 0777u) != plan.options.mode)
            diffs.push_back(
                fmt::format("mode {:04o} (file: {:04o})", st.st_mode & 0777u, plan.options.mode));
    }
    if (diffs.empty()) return;
    std::string list;
    for (const auto& d : diffs)
        list += (list.empty() ? "" : ", ") + d;
    throw lim::Error(lim::Errc::config_mismatch,
                     fmt::format("segment '{}' already exists with {}; remove it (limctl rm) to "
                                 "create it as the file says",
                                 segment, list));
}

int run_create(const std::string& segment, const std::string& file) {
    lim::detail::validate_segment_name(segment);
    // 1. Read and check the whole file; 2. create it all in a scratch segment; 3. check what
    // exists already; only then 4. create for real, removing a segment this run created if a
    // step still fails (another process raced us to a key, /dev/shm filled up).
    const CreatePlan plan = load_create_plan_text(slurp_file(file), file);
    dry_run(segment, plan);
    lim::Segment seg = lim::Segment::open_or_create(segment, plan.options);
    RemoveOnExit undo(seg.is_creator() ? segment : std::string());
    if (!seg.is_creator()) {
        check_geometry(segment, seg, plan);
        // Limiters that exist already must match the file before any new one is created.
        const auto existing = lim::detail::snapshot_segment(*seg.state(), lim::Clock::now());
        for (const LimiterSpec& spec : plan.specs) {
            const bool exists = std::any_of(existing.records.begin(), existing.records.end(),
                                            [&](const auto& r) { return r.key == spec.key; });
            if (exists) spec.open(seg);
        }
    }
    std::vector<std::string> lines;
    for (const LimiterSpec& spec : plan.specs) {
        const std::uint32_t before = seg.info().limiters;
        spec.open(seg);
        lines.push_back(fmt::format("  {:<24} {:<24} {}\n", spec.key, spec.kind,
                                    seg.info().limiters > before ? "created" : "exists"));
    }
    undo.release();
    fmt::print("segment {}: {}\n", segment, seg.is_creator() ? "created" : "already existed");
    for (const auto& line : lines)
        fmt::print("{}", line);
    return kExitOk;
}

}  // namespace

void add_create_command(CLI::App& app, Action& action) {
    struct Args {
        std::string segment;
        std::string config;
    };
    auto a = std::make_shared<Args>();
    auto* create =
        app.add_subcommand("create", "Create a segment and its limiters from a TOML file");
    create->add_option("segment", a->segment, "Segment name")->required();
    create->add_option("-c,--config", a->config, "TOML file: [segment] and [limiter.<key>] tables")
        ->required()
        ->check(CLI::ExistingFile);
    create->callback([&action, a] { action = [a] { return run_create(a->segment, a->config); }; });
}

}  // namespace limctl
