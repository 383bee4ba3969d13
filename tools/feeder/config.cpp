#include "config.hpp"

#include <toml++/toml.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string_view>
#include <utility>

namespace lim::feeder {
namespace {

[[noreturn]] void bad(const std::string& what) {
    throw std::invalid_argument(what);
}

bool valid_key(const std::string& k) {
    if (k.empty() || k.size() > 64) return false;
    for (const char c : k) {
        const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                        (c >= '0' && c <= '9') || c == '.' || c == '_' || c == ':' || c == '-';
        if (!ok) return false;
    }
    return true;
}

// A key this file does not know (`refesh`) would otherwise be ignored and leave the default in
// force, silently: refused, naming the keys the table may hold.
void only_known_keys(const toml::table& t, const std::string& where,
                     std::initializer_list<std::string_view> known) {
    for (const auto& [k, node] : t) {
        if (std::find(known.begin(), known.end(), k.str()) != known.end()) continue;
        std::string list;
        for (const std::string_view name : known) {
            list += list.empty() ? "" : ", ";
            list += name;
        }
        bad((where.empty() ? "" : where + ".") + std::string(k.str()) + " is not a known key (" +
            (where.empty() ? "the file holds " : where + " holds ") + list + ")");
    }
}

// A string key, or nothing when absent. A value of another type (`refresh = 100`, `lease_ttl =
// 5`) is refused: value_or would replace it by the default without a word.
std::optional<std::string> string_key(const toml::table& t, const std::string& where,
                                      const char* name, const char* example) {
    const toml::node* n = t.get(name);
    if (n == nullptr) return std::nullopt;
    if (const auto s = n->value_exact<std::string>()) return *s;
    bad(where + "." + name + " must be a string in quotes (e.g. " + name + " = " + example + ")");
}

double positive_number(const toml::table& t, const std::string& where, const char* name,
                       bool allow_zero) {
    const auto v = t[name].value<double>();
    if (!v) bad(where + "." + name + " is missing or not a number");
    if (!std::isfinite(*v) || *v < 0 || (!allow_zero && *v == 0) || *v > 1e9) {
        bad(where + "." + name + " must be a number " + (allow_zero ? "from 0" : "above 0") +
            " to 1e9");
    }
    return *v;
}

}  // namespace

std::chrono::microseconds parse_duration(const std::string& text) {
    static constexpr std::array<std::pair<const char*, double>, 5> kUnits{
        {{"us", 1.0}, {"ms", 1e3}, {"s", 1e6}, {"m", 60e6}, {"h", 3600e6}}};
    std::size_t used = 0;
    double n = 0;
    try {
        n = std::stod(text, &used);
    } catch (const std::exception&) {
        bad("'" + text + "' is not a duration (e.g. 100ms, 1s)");
    }
    const std::string unit = text.substr(used);
    for (const auto& [name, us] : kUnits) {
        if (unit == name) {
            const double v = n * us;
            if (!std::isfinite(v) || v < 1 || v > 3600e6) {
                bad("'" + text + "' must be from 1us to 1h");
            }
            return std::chrono::microseconds{static_cast<long long>(std::llround(v))};
        }
    }
    bad("'" + text + "' is not a duration: a number then a unit (us, ms, s, m, h), no space");
}

Config load_config(const std::string& path) {
    toml::table root;
    try {
        root = toml::parse_file(path);
    } catch (const toml::parse_error& e) {
        bad(path + ": " + std::string(e.description()));
    }
    Config c;
    only_known_keys(root, "", {"feeder", "global"});
    const toml::table* f = root["feeder"].as_table();
    if (f == nullptr) bad(path + ": no [feeder] table");
    only_known_keys(
        *f, "feeder",
        {"segment", "redis", "host", "refresh", "lease_ttl", "on_redis_down", "fail_open"});
    const auto segment = string_key(*f, "feeder", "segment", "\"myapp\"");
    if (!segment || segment->empty()) bad("feeder.segment is missing");
    c.segment = *segment;
    c.redis = parse_redis_url(string_key(*f, "feeder", "redis", "\"redis://127.0.0.1:6379\"")
                                  .value_or("redis://127.0.0.1:6379"));
    if (const auto h = string_key(*f, "feeder", "host", "\"web-1\"")) {
        c.host = *h;
    } else {
        std::array<char, 256> name{};
        if (gethostname(name.data(), name.size() - 1) != 0) bad("feeder.host: no hostname");
        c.host = name.data();
    }
    if (c.host.empty() || c.host.size() > 200 || c.host.find(':') != std::string::npos) {
        bad("feeder.host must be 1..200 characters without ':'");
    }
    c.refresh = parse_duration(string_key(*f, "feeder", "refresh", "\"100ms\"").value_or("100ms"));
    c.lease_ttl = parse_duration(string_key(*f, "feeder", "lease_ttl", "\"1s\"").value_or("1s"));
    if (c.lease_ttl < 2 * c.refresh) bad("feeder.lease_ttl must be at least twice feeder.refresh");
    const auto down = string_key(*f, "feeder", "on_redis_down", "\"closed\"");
    if (down && *down != "closed" && *down != "open")
        bad("feeder.on_redis_down must be \"closed\" or \"open\"");
    c.fail_open = down == "open";
    // Issue 12's name for the same choice: `fail_open = true` is on_redis_down = "open". Both
    // may be given only if they agree.
    if (const toml::node* n = f->get("fail_open")) {
        const auto open = n->value_exact<bool>();
        if (!open) bad("feeder.fail_open must be true or false (or use on_redis_down)");
        if (down && *open != c.fail_open) {
            bad(std::string("feeder.fail_open = ") + (*open ? "true" : "false") +
                " contradicts feeder.on_redis_down = \"" + *down + "\"");
        }
        c.fail_open = *open;
    }

    if (root.contains("global") && root["global"].as_table() == nullptr) {
        bad(path + ": global must hold tables, [global.<key>]");
    }
    if (const toml::table* g = root["global"].as_table()) {
        for (const auto& [k, node] : *g) {
            const std::string key(k.str());
            const std::string where = "global." + key;
            if (!valid_key(key)) bad(where + ": a key is 1..64 of [A-Za-z0-9._:-]");
            const toml::table* t = node.as_table();
            if (t == nullptr) bad(where + " is not a table");
            const std::string kind = string_key(*t, where, "kind", "\"rate\"").value_or("");
            if (kind == "rate") {
                only_known_keys(*t, where, {"kind", "burst_size", "sustained_rate_per_sec"});
                if (key.size() > 49) bad(where + ": a global rate's key is at most 49 characters");
                c.rates.push_back({key, positive_number(*t, where, "burst_size", false),
                                   positive_number(*t, where, "sustained_rate_per_sec", true)});
            } else if (kind == "backoff") {
                only_known_keys(*t, where, {"kind"});
                c.backoffs.push_back({key});
            } else {
                bad(where + ".kind must be \"rate\" or \"backoff\"");
            }
        }
    }
    if (c.rates.empty() && c.backoffs.empty()) bad(path + ": no [global.<key>] table");
    return c;
}

}  // namespace lim::feeder
