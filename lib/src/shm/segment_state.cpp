#include "shm/segment_state.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>
#include <boost/interprocess/exceptions.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <new>
#include <thread>
#include <vector>

#include "lim/error.hpp"
#include "recovery/reaper.hpp"
#include "shm/file_lock.hpp"
#include "shm/names.hpp"
#include "shm/process_identity.hpp"
#include "shm/process_table.hpp"

namespace lim::detail {
namespace bip = boost::interprocess;
namespace {

std::atomic<std::uint64_t> g_next_uid{1};

// How long an attach waits for another process to finish initialising the segment before it
// concludes that process is stuck (stopped, or spinning) and gives up.
constexpr auto kInitTimeout = std::chrono::seconds{5};
// How long `open` (which cannot initialise) waits on a segment that nobody is initialising
// before it reports it as abandoned: covers the microseconds between a creator's shm_open and
// its taking the init lock.
constexpr auto kAbandonedGrace = std::chrono::milliseconds{500};

int shm_fd(const bip::shared_memory_object& shm) {
    return shm.get_mapping_handle().handle;
}

std::uint64_t file_size(int fd) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) throw_errno(errno, "cannot stat the segment");
    return static_cast<std::uint64_t>(st.st_size);
}

[[noreturn]] void rethrow(const bip::interprocess_exception& e, std::string_view name,
                          std::string_view action) {
    const int err = e.get_native_error();
    switch (e.get_error_code()) {
        case bip::not_found_error:
            throw Error(
                Errc::not_found,
                fmt::format("segment '{}' does not exist (no /dev/shm/lim.{})", name, name));
        case bip::already_exists_error:
            throw Error(Errc::already_exists, fmt::format("segment '{}' already exists", name));
        case bip::security_error:
            throw Error(Errc::permission_denied,
                        fmt::format("cannot {} segment '{}': permission denied (see the mode of "
                                    "/dev/shm/lim.{})",
                                    action, name, name));
        default:
            if (err == EACCES || err == EPERM) {
                throw Error(Errc::permission_denied,
                            fmt::format("cannot {} segment '{}': permission denied", action, name));
            }
            throw Error(Errc::system_error,
                        fmt::format("cannot {} segment '{}': {}", action, name, e.what()));
    }
}

[[noreturn]] void corrupt(std::string_view name, const std::string& why) {
    throw Error(Errc::corrupt_segment,
                fmt::format("segment '{}' is not a valid lim segment: {}", name, why));
}

enum class Shape { ready, unready, corrupt };

struct Classified {
    Shape shape;
    std::string why;  // for corrupt
};

// Looks at the file through pread, without mapping it: a file of the wrong shape must be
// refused before anything is mapped or written.
Classified classify(int fd) {
    const std::uint64_t size = file_size(fd);
    if (size == 0) return {Shape::unready, {}};
    if (size < sizeof(HeaderPrefix)) {
        return {Shape::corrupt, fmt::format("it is {} bytes long, shorter than a header", size)};
    }
    HeaderPrefix prefix{};
    if (::pread(fd, &prefix, sizeof prefix, 0) != static_cast<ssize_t>(sizeof prefix)) {
        return {Shape::corrupt, "its header cannot be read"};
    }
    if (prefix.magic != 0 && prefix.magic != kMagic) {
        return {Shape::corrupt, fmt::format("bad magic number {:#018x}", prefix.magic)};
    }
    if (prefix.ready == kReady) return {Shape::ready, {}};
    if (prefix.ready != 0) {
        return {Shape::corrupt, fmt::format("its state word holds {:#x}", prefix.ready)};
    }
    // Not initialised. Only the shapes a creator leaves behind (zeroes, or a header being
    // written over a file of the size it recorded) may be initialised again; anything else is
    // somebody's damaged segment and stays untouched.
    if (size < sizeof(SegmentHeader)) {
        return {Shape::corrupt, fmt::format("it is {} bytes long, shorter than a header", size)};
    }
    if (prefix.size_bytes != 0 && prefix.size_bytes != size) {
        return {Shape::corrupt, fmt::format("its header says {} bytes but the file has {}",
                                            prefix.size_bytes, size)};
    }
    return {Shape::unready, {}};
}

// Writes a fresh segment into the object behind `shm`. Runs under the init lock, with nobody
// attached (nobody maps a segment before `ready` is published).
void initialise(bip::shared_memory_object& shm, std::string_view name,
                const SegmentOptions& options) {
    const int fd = shm_fd(shm);
    const Geometry g = geometry_for(options.max_limiters, options.max_processes);
    // Truncating to zero first discards whatever a creator that died half-way left behind.
    shm.truncate(0);
    shm.truncate(static_cast<bip::offset_t>(g.size_bytes));
    // Reserve the pages now: tmpfs allocates on first touch, and a touch that finds /dev/shm
    // full kills the process with SIGBUS. Failing here gives the creator a clear error instead.
    // (Boost.Interprocess has no fallocate.)
    if (const int err = ::posix_fallocate(fd, 0, static_cast<off_t>(g.size_bytes)); err != 0) {
        shm.truncate(0);
        throw Error(Errc::system_error,
                    fmt::format("cannot reserve {} bytes for segment '{}' in /dev/shm: {} (free "
                                "space in /dev/shm, or lower max_processes / max_limiters)",
                                g.size_bytes, name, std::strerror(err)));
    }
    bip::mapped_region region(shm, bip::read_write);
    auto* header = new (region.get_address()) SegmentHeader{};
    header->magic = kMagic;
    header->layout_version = kLayoutVersion;
    header->size_bytes = g.size_bytes;
    header->layout_hash = kLayoutHash;
    header->max_limiters = g.max_limiters;
    header->max_processes = g.max_processes;
    header->index_capacity = g.index_capacity;
    header->record_size = static_cast<std::uint32_t>(kRecordSize);
    header->slot_size = static_cast<std::uint32_t>(g.slot_size);
    header->mode = options.mode;
    header->index_offset = g.index_offset;
    header->records_offset = g.records_offset;
    header->slots_offset = g.slots_offset;
    header->created_wall_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                  std::chrono::system_clock::now().time_since_epoch())
                                  .count();
    header->created_mono_ns = to_nanos(Clock::now());
    header->creator_pid = ::getpid();
    // The index, records and process table are all-zero, which is their empty state.
    header->ready.store(kReady, std::memory_order_release);
}

}  // namespace

void validate_options(const SegmentOptions& options) {
    if (options.max_limiters < 1 || options.max_limiters > kMaxLimitersLimit) {
        throw Error(Errc::invalid_argument, fmt::format("max_limiters is {}; it must be 1..{}",
                                                        options.max_limiters, kMaxLimitersLimit));
    }
    if (options.max_processes < 1 || options.max_processes > kMaxProcessesLimit) {
        throw Error(Errc::invalid_argument, fmt::format("max_processes is {}; it must be 1..{}",
                                                        options.max_processes, kMaxProcessesLimit));
    }
    if ((options.mode & ~0777u) != 0 || (options.mode & 0600u) != 0600u) {
        throw Error(Errc::invalid_argument,
                    fmt::format("mode is {:#o}; it must be permission bits (<= 0777) that let the "
                                "owner read and write",
                                options.mode));
    }
    if (options.reap_after < Duration::zero()) {
        throw Error(Errc::invalid_argument, "reap_after must not be negative");
    }
    const Geometry g = geometry_for(options.max_limiters, options.max_processes);
    if (g.size_bytes > kMaxSegmentBytes) {
        throw Error(Errc::invalid_argument,
                    fmt::format("a segment of {} limiters and {} process slots would take {} "
                                "bytes; the limit is {}",
                                options.max_limiters, options.max_processes, g.size_bytes,
                                kMaxSegmentBytes));
    }
}

SegmentState::SegmentState(std::string name, Access access)
    : name_(std::move(name)), access_(access), uid_(g_next_uid.fetch_add(1)) {}

SegmentState::~SegmentState() {
    release_own_slots();
}

int SegmentState::fd() const noexcept {
    return shm_fd(shm_);
}

std::shared_ptr<SegmentState> SegmentState::attach(std::string_view name,
                                                   const SegmentOptions& options, bool create_it,
                                                   Access access) {
    validate_segment_name(name);
    const SegmentOptions* create = create_it ? &options : nullptr;
    if (create) validate_options(*create);
    if (options.reap_after < Duration::zero()) {
        throw Error(Errc::invalid_argument, "reap_after must not be negative");
    }
    install_fork_hook();
    const std::string object = shm_object_name(name);
    const auto mode = access == Access::read_only ? bip::read_only : bip::read_write;
    std::shared_ptr<SegmentState> state(new SegmentState(std::string(name), access));
    state->reap_after_ = options.reap_after;

    const auto deadline = std::chrono::steady_clock::now() + kInitTimeout;
    std::optional<std::chrono::steady_clock::time_point> unready_since;
    for (;;) {
        bip::shared_memory_object shm;
        try {
            if (create) {
                bip::permissions perms;
                perms.set_permissions(static_cast<int>(create->mode));
                try {
                    shm = bip::shared_memory_object(bip::create_only, object.c_str(), mode, perms);
                } catch (const bip::interprocess_exception& e) {
                    if (e.get_error_code() != bip::already_exists_error) throw;
                    shm = bip::shared_memory_object(bip::open_only, object.c_str(), mode);
                }
            } else {
                shm = bip::shared_memory_object(bip::open_only, object.c_str(), mode);
            }
        } catch (const bip::interprocess_exception& e) {
            // Removed between our create attempt and our open: try again from the top.
            if (create && e.get_error_code() == bip::not_found_error) continue;
            rethrow(e, name, "open");
        }

        for (;;) {
            const Classified c = classify(shm_fd(shm));
            if (c.shape == Shape::corrupt) corrupt(name, c.why);
            if (c.shape == Shape::ready) {
                state->validate_and_map(std::move(shm));
                if (access == Access::read_write) {
                    register_holder(*state);
                    if (options.reap_on_attach) reap_quietly(*state);
                }
                return state;
            }
            // Unready. Whoever holds the init lock is initialising it; whoever gets the lock
            // and still finds it unready initialises it (exactly one does: the check and the
            // initialisation happen under the lock).
            if (std::chrono::steady_clock::now() > deadline) {
                throw Error(Errc::system_error,
                            fmt::format("segment '{}' has been initialising for over {} s; the "
                                        "process doing it may be stopped",
                                        name, kInitTimeout.count()));
            }
            if (create && access == Access::read_write) {
                if (auto lock = FileLock::try_lock(shm_fd(shm), LockByte::init)) {
                    if (classify(shm_fd(shm)).shape == Shape::unready) {
                        initialise(shm, name, *create);
                        state->created_ = true;
                    }
                    continue;  // ready now (or corrupt): classify again, lock released
                }
            } else if (!FileLock::is_locked(shm_fd(shm), LockByte::init)) {
                // Nobody is initialising it and we may not. A segment that stays unready with
                // nobody at work on it was abandoned by a creator that died half-way.
                const auto now = std::chrono::steady_clock::now();
                if (!unready_since) unready_since = now;
                if (now - *unready_since > kAbandonedGrace) {
                    corrupt(name,
                            "it was never initialised (its creator died before finishing); "
                            "open_or_create initialises it again, or remove it");
                }
            }
            std::this_thread::sleep_for(std::chrono::microseconds{200});
        }
    }
}

void SegmentState::validate_and_map(bip::shared_memory_object shm) {
    const std::uint64_t size = file_size(shm_fd(shm));
    if (size < sizeof(SegmentHeader)) {
        corrupt(name_, fmt::format("it is {} bytes long, shorter than a header", size));
    }
    bip::mapped_region region;
    try {
        region =
            bip::mapped_region(shm, access_ == Access::read_only ? bip::read_only : bip::read_write,
                               0, static_cast<std::size_t>(size));
    } catch (const bip::interprocess_exception& e) {
        rethrow(e, name_, "map");
    }
    auto* base = static_cast<std::byte*>(region.get_address());
    const auto& h = *reinterpret_cast<const SegmentHeader*>(base);

    if (h.magic != kMagic) corrupt(name_, fmt::format("bad magic number {:#018x}", h.magic));
    if (h.layout_version != kLayoutVersion) {
        throw Error(Errc::version_mismatch,
                    fmt::format("segment '{}' has layout version {}, but this lim reads layout "
                                "version {}; processes built against different lim layouts cannot "
                                "share a segment (remove it once nothing uses it)",
                                name_, h.layout_version, kLayoutVersion));
    }
    if (h.ready.load(std::memory_order_acquire) != kReady) corrupt(name_, "it is not initialised");
    if (h.layout_hash != kLayoutHash) {
        throw Error(Errc::version_mismatch,
                    fmt::format("segment '{}' has layout version {} but layout hash {:#x}, and "
                                "this build of lim expects {:#x} (a build with another ABI)",
                                name_, h.layout_version, h.layout_hash, kLayoutHash));
    }
    if (h.size_bytes != size) {
        corrupt(name_, fmt::format("its header says {} bytes but the file has {} (truncated?)",
                                   h.size_bytes, size));
    }
    if (h.max_limiters < 1 || h.max_limiters > kMaxLimitersLimit || h.max_processes < 1 ||
        h.max_processes > kMaxProcessesLimit) {
        corrupt(name_, fmt::format("its geometry ({} limiters, {} processes) is out of range",
                                   h.max_limiters, h.max_processes));
    }
    const Geometry g = geometry_for(h.max_limiters, h.max_processes);
    if (h.index_capacity != g.index_capacity || h.index_offset != g.index_offset ||
        h.records_offset != g.records_offset || h.slots_offset != g.slots_offset ||
        h.slot_size != g.slot_size || h.record_size != kRecordSize || g.size_bytes != size) {
        corrupt(name_, "its table offsets do not match its geometry");
    }
    if (h.records_used.load(std::memory_order_acquire) > h.max_limiters) {
        corrupt(name_, fmt::format("it claims {} records in a table of {}", h.records_used.load(),
                                   h.max_limiters));
    }
    shm_ = std::move(shm);
    region_ = std::move(region);
    base_ = base;
    size_ = size;
    geometry_ = g;
}

std::uint32_t SegmentState::records_used() const noexcept {
    return std::min(header().records_used.load(std::memory_order_acquire), geometry_.max_limiters);
}

SegmentInfo SegmentState::info() const {
    const SegmentHeader& h = header();
    SegmentInfo info;
    info.name = name_;
    info.size_bytes = size_;
    info.layout_version = h.layout_version;
    info.max_limiters = h.max_limiters;
    info.max_processes = h.max_processes;
    info.limiters = records_used();
    info.processes = count_live_processes(*this);
    info.created = std::chrono::system_clock::time_point{
        std::chrono::duration_cast<std::chrono::system_clock::duration>(
            std::chrono::nanoseconds{h.created_wall_ns})};
    return info;
}

void SegmentState::release_own_slots() noexcept {
    if (base_ == nullptr || access_ == Access::read_only) return;
    release_slots_of_mapping(*this);
}

}  // namespace lim::detail
