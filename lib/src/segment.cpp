#include "lim/segment.hpp"

#include <sys/mman.h>

#include <cerrno>

#include <fmt/format.h>

#include "lim/error.hpp"
#include "recovery/reaper.hpp"
#include "shm/names.hpp"
#include "shm/segment_state.hpp"

namespace lim {

Segment::Segment(std::shared_ptr<detail::SegmentState> state) : state_(std::move(state)) {}

Segment Segment::open_or_create(std::string_view name, const SegmentOptions& options) {
    return Segment(detail::SegmentState::attach(name, options, true, detail::Access::read_write));
}

Segment Segment::open(std::string_view name) {
    return Segment(
        detail::SegmentState::attach(name, SegmentOptions{}, false, detail::Access::read_write));
}

Segment Segment::open(std::string_view name, const SegmentOptions& options) {
    return Segment(detail::SegmentState::attach(name, options, false, detail::Access::read_write));
}

bool Segment::remove(std::string_view name) {
    detail::validate_segment_name(name);
    // shm_unlink directly rather than Boost's remove(), which folds "permission denied" into
    // "absent" by returning false for both.
    const std::string path = "/" + detail::shm_object_name(name);
    if (::shm_unlink(path.c_str()) == 0) return true;
    if (errno == ENOENT) return false;
    throw_errno(errno, fmt::format("cannot remove segment '{}'", name));
}

SegmentInfo Segment::info() const {
    return state_->info();
}

const std::string& Segment::name() const {
    return state_->name();
}

bool Segment::is_creator() const {
    return state_->created();
}

ReapReport Segment::reap() {
    return detail::reap(*state_, detail::ReapLock::wait);
}

void Segment::reset(const ResetOptions& options) {
    detail::reset(*state_, options);
}

}  // namespace lim
