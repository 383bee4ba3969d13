// lim/error.hpp: the one exception type lim throws, and its error codes.
//
// lim throws for conditions a caller must fix (a bad name, a segment of another layout, a full
// table) and returns values for conditions that are part of normal operation (no capacity right
// now, a deadline that passed). Every throwing call documents which `Errc` values it uses.
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>

namespace lim {

// What went wrong, independent of the message text. Values are stable: tools and tests switch on
// them, so new codes are only ever appended.
enum class Errc {
    invalid_name = 1,   // a segment name or record key outside the allowed alphabet or length
    invalid_argument,   // an option or amount out of range (negative, NaN, zero capacity, ...)
    not_found,          // the named segment (or record) does not exist
    already_exists,     // the named object exists and the call asked for a new one
    corrupt_segment,    // the segment's header or tables fail validation
    version_mismatch,   // the segment was written by another layout version of lim
    config_mismatch,    // a record exists with a configuration other than the one asked for
    table_full,         // no free record or process slot is left in the segment
    permission_denied,  // the caller may not open or change the segment
    over_release,       // more returned or released than is held
    system_error,       // an operating-system call failed for another reason
    busy,               // refused while other processes are attached (reset without force), or
                        // a segment lock stayed held (a neighbour stopped holding it)
};

// A short, stable name for `code` ("invalid_name", "table_full", ...), as limctl prints it.
std::string_view to_string(Errc code) noexcept;

// The exception thrown by every lim call that throws. `what()` is a full sentence naming the
// object involved (segment name, key) so that a log line alone tells an operator what to fix.
class Error : public std::runtime_error {
  public:
    Error(Errc code, const std::string& message);

    Errc code() const noexcept { return code_; }

  private:
    Errc code_;
};

// Throws Error(Errc::system_error or permission_denied, "<what>: <strerror(err)>"). EACCES and
// EPERM map to permission_denied, ENOENT to not_found; every other errno to system_error.
[[noreturn]] void throw_errno(int err, const std::string& what);

}  // namespace lim
