#include "shm/names.hpp"

#include <fmt/format.h>

#include "lim/error.hpp"
#include "shm/layout.hpp"

namespace lim::detail {
namespace {

bool is_alnum(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

void check(std::string_view what, std::string_view name, std::size_t max_length,
           std::string_view extra_chars) {
    if (name.empty()) throw Error(Errc::invalid_name, fmt::format("{} must not be empty", what));
    if (name.size() > max_length) {
        throw Error(Errc::invalid_name,
                    fmt::format("{} '{}...' is {} characters long; the limit is {}", what,
                                printable(name.substr(0, 32)), name.size(), max_length));
    }
    for (char c : name) {
        if (!is_alnum(c) && extra_chars.find(c) == std::string_view::npos) {
            throw Error(
                Errc::invalid_name,
                fmt::format("{} '{}' contains '{}'; allowed are letters, digits and '{}'", what,
                            printable(name), printable(std::string_view(&c, 1)), extra_chars));
        }
    }
}

}  // namespace

std::string printable(std::string_view text) {
    std::string out;
    out.reserve(text.size());
    for (unsigned char c : text) {
        if (c >= 0x20 && c < 0x7F && c != '\\') {
            out.push_back(static_cast<char>(c));
        } else {
            out += fmt::format("\\x{:02x}", c);
        }
    }
    return out;
}

void validate_segment_name(std::string_view name) {
    // SPEC: [A-Za-z0-9._-], 1..200. Dots anywhere ("..", "a..b") are fine: the object is
    // "/lim.<name>", one path component under /dev/shm, which a name without '/' cannot leave.
    check("segment name", name, kMaxSegmentNameLength, "._-");
}

void validate_key(std::string_view key) {
    check("key", key, kMaxKeyLength, "._:-");
}

std::string shm_object_name(std::string_view segment_name) {
    return fmt::format("lim.{}", segment_name);
}

}  // namespace lim::detail
