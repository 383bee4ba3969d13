#include "lim/error.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <cstring>

namespace lim {

std::string_view to_string(Errc code) noexcept {
    switch (code) {
        case Errc::invalid_name:
            return "invalid_name";
        case Errc::invalid_argument:
            return "invalid_argument";
        case Errc::not_found:
            return "not_found";
        case Errc::already_exists:
            return "already_exists";
        case Errc::corrupt_segment:
            return "corrupt_segment";
        case Errc::version_mismatch:
            return "version_mismatch";
        case Errc::config_mismatch:
            return "config_mismatch";
        case Errc::table_full:
            return "table_full";
        case Errc::permission_denied:
            return "permission_denied";
        case Errc::over_release:
            return "over_release";
        case Errc::system_error:
            return "system_error";
        case Errc::busy:
            return "busy";
    }
    return "unknown";
}

Error::Error(Errc code, const std::string& message) : std::runtime_error(message), code_(code) {}

void throw_errno(int err, const std::string& what) {
    Errc code = Errc::system_error;
    if (err == EACCES || err == EPERM) code = Errc::permission_denied;
    if (err == ENOENT) code = Errc::not_found;
    throw Error(code, fmt::format("{}: {}", what, std::strerror(err)));
}

}  // namespace lim
