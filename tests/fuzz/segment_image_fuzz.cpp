// libFuzzer target: a segment image, as anyone with write access to /dev/shm/lim.<name> could
// leave it. The image is written to a file of its own in /dev/shm and then
//   - attached read-only (what limctl's read commands do): validate, snapshot, every renderer;
//   - attached read-write (what a library process does): open (which reaps), reap, each family's
//     non-blocking calls on every record the snapshot lists, and reset.
// Nothing may crash, hang or throw anything but lim::Error. See docs/security.md for how to run
// it at length.
#include <fcntl.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "inspect/snapshot.hpp"
#include "lim/lim.hpp"
#include "render.hpp"
#include "shm/segment_state.hpp"

namespace {

const std::string& segment_name() {
    static const std::string name = "fuzz-image-" + std::to_string(::getpid());
    return name;
}

bool write_image(const std::uint8_t* data, std::size_t size) {
    const std::string path = "/dev/shm/lim." + segment_name();
    ::unlink(path.c_str());
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return false;
    std::size_t done = 0;
    while (done < size) {
        const ssize_t n = ::write(fd, data + done, size - done);
        if (n <= 0) break;
        done += static_cast<std::size_t>(n);
    }
    ::close(fd);
    return done == size;
}

void read_only() {
    try {
        const auto state = lim::detail::SegmentState::attach(
            segment_name(), lim::SegmentOptions{.reap_on_attach = false}, false,
            lim::detail::Access::read_only);
        const auto s = lim::detail::snapshot_segment(*state, lim::Clock::now());
        (void)limctl::render_overview(s);
        (void)limctl::render_processes(s);
        (void)limctl::render_prometheus(s);
        (void)limctl::to_json(s).dump(2, ' ', false, nlohmann::json::error_handler_t::replace);
        for (const auto& r : s.records)
            (void)limctl::render_record_detail(s, r.key);
    } catch (const lim::Error&) {
    }
}

void read_write() {
    try {
        lim::Segment seg = lim::Segment::open(segment_name());
        (void)seg.reap();
        const auto s = lim::detail::snapshot_segment(*seg.state(), lim::Clock::now());
        for (const auto& r : s.records) {
            try {
                if (r.kind == "semaphore") {
                    auto sem =
                        lim::Semaphore::open(seg, r.key, {.capacity = 1}, lim::adopt_existing);
                    if (sem.try_acquire(1)) sem.release(1);
                } else if (r.kind == "weighted_semaphore") {
                    auto ws = lim::WeightedSemaphore::open(seg, r.key, {.capacity = 1},
                                                           lim::adopt_existing);
                    if (ws.try_acquire(1)) ws.release(1);
                } else if (r.kind == "limiter") {
                    const auto now = lim::Clock::now();
                    auto l = lim::Limiter::open(seg, r.key, {.bucket_size = 1}, lim::adopt_existing,
                                                now);
                    if (l.try_take(now, 1) == lim::TryTake::taken) l.return_to_hopper(now, 1);
                    // The lazy clock (a rebase re-reading it could spin on a damaged rate), the
                    // reads (sums of damaged words), the drip's inverse, a switch (-cap).
                    if (l.try_take(1) == lim::TryTake::taken) l.return_to_hopper(1);
                    (void)l.in_system(now);
                    (void)l.in_limiter(now);
                    (void)l.tokens_may_be_available_when(now, 1);
                    l.set_token_target_level(now, 1.0);
                }
            } catch (const lim::Error&) {
            }
        }
        seg.reset({.force = true});
    } catch (const lim::Error&) {
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size > (std::size_t{1} << 20)) return -1;  // seeds are small geometries
    if (!write_image(data, size)) return 0;
    read_only();
    read_write();
    ::unlink(("/dev/shm/lim." + segment_name()).c_str());
    return 0;
}
