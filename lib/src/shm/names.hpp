// Validation of the two kinds of names lim accepts from users: segment names (which become a
// file name under /dev/shm) and record keys (which live in the segment).
#pragma once

#include <string>
#include <string_view>

namespace lim::detail {

// Throws Error(invalid_name) unless `name` is 1..200 characters of [A-Za-z0-9._-] and contains no
// "..". The message quotes the name (with non-printable characters escaped) and says which rule
// it breaks.
void validate_segment_name(std::string_view name);

// Throws Error(invalid_name) unless `key` is 1..64 characters of [A-Za-z0-9._:-].
void validate_key(std::string_view key);

// The POSIX shared-memory object name for a segment: "lim.<name>" (Boost adds the leading '/',
// so the object appears as /dev/shm/lim.<name>).
std::string shm_object_name(std::string_view segment_name);

// `text` with every byte outside printable ASCII (and the backslash) written as \xNN, for error
// messages and limctl's output, which must stay one readable line of valid UTF-8 whatever the
// caller or a damaged segment or file name holds.
std::string printable(std::string_view text);

}  // namespace lim::detail
