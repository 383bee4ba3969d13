// limctl create <segment> --config <file.toml>: declares a segment and its limiters from a file in
// the SPEC's format. Every key is an option name of the API; unknown keys are errors (a typo must
// not silently become a default). Idempotent: limiters that exist with the same configuration
// are left alone; one that exists with another configuration is an error.
#include <fmt/format.h>

#include <toml++/toml.h>

#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>

#include "commands.hpp"
#include "common.hpp"
#include "create_kinds.hpp"
#include "lim/error.hpp"

namespace limctl {
namespace {

std::string where(const toml::node& node, const std::string& file) {
    const auto& src = node.source();
    return fmt::format("{}:{}", file, src.begin.line);
}

}  // namespace

// ---- TableReader ---------------------------------------------------------------------------

TableReader::TableReader(const toml::table& table, std::string file, std::string context)
    : table_(table), file_(std::move(file)), context_(std::move(context)) {}

[[noreturn]] void TableReader::fail(const std::string& key, const std::string& what) const {
    const toml::node* node = table_.get(key);
    if (node == nullptr) {
        // A required option is missing: a misspelt key is the likelier story, so name it first.
        for (const auto& [k, v] : table_) {
            const std::string other(k.str());
            if (used_.count(other) || other == key) continue;
            throw UsageError(fmt::format("{}: {}.{}: unknown option ({}.{} is {})", where(v, file_),
                                         context_, other, context_, key, what));
        }
    }
    throw UsageError(
        fmt::format("{}: {}.{}: {}", node ? where(*node, file_) : file_, context_, key, what));
}

std::optional<double> TableReader::number(const std::string& key) {
    used_.insert(key);
    const toml::node* node = table_.get(key);
    if (!node) return std::nullopt;
    if (auto v = node->value<double>()) return *v;
    fail(key, "must be a number");
}

std::optional<std::int64_t> TableReader::integer(const std::string& key) {
    used_.insert(key);
    const toml::node* node = table_.get(key);
    if (!node) return std::nullopt;
    if (node->is_integer()) return node->value<std::int64_t>();
    fail(key, "must be an integer");
}

std::optional<std::string> TableReader::string(const std::string& key) {
    used_.insert(key);
    const toml::node* node = table_.get(key);
    if (!node) return std::nullopt;
    if (auto v = node->value<std::string>()) return *v;
    fail(key, "must be a string");
}

std::optional<lim::InfiniteOrFinite<double>> TableReader::maybe_infinite(const std::string& key) {
    used_.insert(key);
    const toml::node* node = table_.get(key);
    if (!node) return std::nullopt;
    if (auto s = node->value<std::string>()) {
        if (*s == "infinite" || *s == "inf") return lim::InfiniteOrFinite<double>(lim::infinite);
        fail(key, "must be a number or \"infinite\"");
    }
    if (auto v = node->value<double>()) return lim::InfiniteOrFinite<double>(*v);
    fail(key, "must be a number or \"infinite\"");
}

std::optional<std::chrono::nanoseconds> TableReader::duration(const std::string& key) {
    used_.insert(key);
    const toml::node* node = table_.get(key);
    if (!node) return std::nullopt;
    if (auto s = node->value<std::string>()) return parse_duration(*s);
    if (auto v = node->value<double>()) return parse_duration(fmt::format("{}s", *v));
    fail(key, "must be a duration such as \"10s\" or a number of seconds");
}

void TableReader::finish() const {
    for (const auto& [k, v] : table_) {
        const std::string key(k.str());
        if (!used_.count(key)) fail(key, "unknown option");
    }
}

// ---- the command ---------------------------------------------------------------------------

namespace {

int run_create(const std::string& segment, const std::string& file) {
    toml::table doc;
    try {
        doc = toml::parse_file(file);
    } catch (const toml::parse_error& e) {
        const auto& src = e.source();
        throw UsageError(
            fmt::format("{}:{}:{}: {}", file, src.begin.line, src.begin.column, e.description()));
    }
    lim::SegmentOptions options;
    if (const toml::table* seg = doc["segment"].as_table()) {
        TableReader r(*seg, file, "segment");
        if (auto v = r.integer("max_limiters"))
            options.max_limiters = static_cast<std::uint32_t>(*v);
        if (auto v = r.integer("max_processes"))
            options.max_processes = static_cast<std::uint32_t>(*v);
        if (auto v = r.string("mode")) {
            try {
                options.mode = static_cast<unsigned>(std::stoul(*v, nullptr, 8));
            } catch (const std::exception&) {
                r.fail("mode", "must be an octal string such as \"0660\"");
            }
        }
        if (auto v = r.duration("reap_after")) options.reap_after = *v;
        r.finish();
    }
    for (const auto& [k, v] : doc) {
        const std::string section(k.str());
        if (section != "segment" && section != "limiter") {
            throw UsageError(
                fmt::format("{}: unknown section [{}] (expected [segment] and [limiter.<key>])",
                            where(v, file), section));
        }
    }
    std::vector<LimiterSpec> specs;
    if (const toml::table* limiters = doc["limiter"].as_table()) {
        for (const auto& [k, v] : *limiters) {
            const std::string key(k.str());
            const toml::table* t = v.as_table();
            if (!t)
                throw UsageError(
                    fmt::format("{}: limiter.{} must be a table", where(v, file), key));
            TableReader r(*t, file, "limiter." + key);
            const auto kind = r.string("kind");
            if (!kind) {
                r.fail("kind",
                       "missing (dispatch, token_bucket, throttle, throttled_rate_limiter, "
                       "limiter, semaphore, weighted_semaphore)");
            }
            specs.push_back(read_limiter(key, *kind, r));
        }
    }
    // The whole file is valid: now create.
    lim::Segment seg = lim::Segment::open_or_create(segment, options);
    fmt::print("segment {}: {}\n", segment, seg.is_creator() ? "created" : "already existed");
    for (const LimiterSpec& spec : specs) {
        const std::uint32_t before = seg.info().limiters;
        spec.open(seg);
        fmt::print("  {:<24} {:<24} {}\n", spec.key, spec.kind,
                   seg.info().limiters > before ? "created" : "exists");
    }
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
