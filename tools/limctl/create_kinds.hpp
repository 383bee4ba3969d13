// How `limctl create` makes each kind of limiter from its TOML table.
#pragma once

#include <toml++/toml.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <set>
#include <string>

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
    std::optional<std::string> string(const std::string& key);
    std::optional<lim::InfiniteOrFinite<double>> maybe_infinite(const std::string& key);
    std::optional<std::chrono::nanoseconds> duration(const std::string& key);
    [[noreturn]] void fail(const std::string& key, const std::string& what) const;
    void finish() const;

  private:
    const toml::table& table_;
    std::string file_;
    std::string context_;
    std::set<std::string> used_;
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

}  // namespace limctl
