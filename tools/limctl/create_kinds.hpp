// How `limctl create` makes each kind of limiter from its TOML table.
#pragma once

#include <toml++/toml.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "lim/segment.hpp"
#include "lim/tokens.hpp"

namespace limctl {

// Reads typed options out of a TOML table, remembering which keys were read so that finish()
// can reject the ones nobody asked for. Errors name file:line and the dotted key.
class TableReader {
  public:
    TableReader(const toml::table& table, std::string file, std::string context);
    std::optional<double> number(const std::string& key);
    std::optional<std::int64_t> integer(const std::string& key);
    // An integer in [lo, hi]; anything outside is an error naming the range.
    std::optional<std::int64_t> integer(const std::string& key, std::int64_t lo, std::int64_t hi);
    std::optional<std::string> string(const std::string& key);
    std::optional<lim::InfiniteOrFinite<double>> maybe_infinite(const std::string& key);
    std::optional<std::chrono::nanoseconds> duration(const std::string& key);
    // Permission bits: a TOML octal integer (0o660, as TOML suggests for file modes) or octal
    // digits in a string ("0660"). A decimal integer is refused (660 is not 0660).
    std::optional<unsigned> mode(const std::string& key);
    [[noreturn]] void fail(const std::string& key, const std::string& what) const;
    // Notes a required option that is absent; finish() reports it (named as missing).
    void missing(const std::string& key);
    // Throws UsageError for the first key nobody read, else for the first missing option.
    void finish() const;

  private:
    const toml::table& table_;
    std::string file_;
    std::string context_;
    std::set<std::string> used_;
    std::vector<std::string> missing_;
};

// A limiter read from the file, ready to be created: reading validates every option (types,
// unknown keys), so a bad file is refused before anything is created.
struct LimiterSpec {
    std::string key;
    std::string kind;
    std::function<void(const lim::Segment&)> open;  // creates it, or checks the existing one
};

// Reads limiter `key` of `kind` from `r`. Throws UsageError for an unknown kind or option.
LimiterSpec read_limiter(const std::string& key, const std::string& kind, TableReader& r);

// A whole `limctl create` file, read and checked: the segment options (and which of them the
// file names) and every limiter. Nothing is created by reading it.
struct CreatePlan {
    lim::SegmentOptions options;
    bool max_limiters_given = false;
    bool max_processes_given = false;
    bool mode_given = false;
    std::vector<LimiterSpec> specs;
};

// Reads and checks a parsed file: sections are [segment] and [limiter.<key>] tables only, keys
// are valid lim keys, integers fit their option, `mode` is octal digits, the segment options
// pass lim's validation, and every limiter's options are known and typed. Throws UsageError
// naming file:line and the dotted key.
CreatePlan load_create_plan(const toml::table& doc, const std::string& file);

// As load_create_plan, from the file's text (TOML syntax errors are UsageErrors too). The
// limctl create fuzzer calls this.
CreatePlan load_create_plan_text(std::string_view text, const std::string& file);

}  // namespace limctl
