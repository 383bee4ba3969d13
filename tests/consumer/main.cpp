// Uses the installed lim as a user would: attach, inspect, remove. Prints what it saw, exits 0 only
// if the segment behaved.
#include <lim/lim.hpp>

#include <cstdio>
#include <string>

#include <unistd.h>

int main() {
    const std::string name = "lim-consumer-" + std::to_string(::getpid());
    auto seg = lim::Segment::open_or_create(
        name, lim::SegmentOptions{.max_limiters = 8, .max_processes = 16});
    const lim::SegmentInfo info = seg.info();
    std::printf("segment %s: %zu bytes, layout %u, %u process(es)\n", info.name.c_str(),
                info.size_bytes, info.layout_version, info.processes);
    const bool ok = seg.is_creator() && info.max_limiters == 8 && info.processes == 1;
    const bool removed = lim::Segment::remove(name);
    try {
        lim::Segment::open(name);
        return 1;  // must be gone
    } catch (const lim::Error& e) {
        if (e.code() != lim::Errc::not_found) return 1;
    }
    return ok && removed ? 0 : 1;
}
