#include "shm/segment_state.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <new>
#include <optional>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "lim/error.hpp"
#include "recovery/reaper.hpp"
#include "shm/file_lock.hpp"
#include "shm/names.hpp"
#include "shm/process_identity.hpp"
#include "shm/process_table.hpp"

namespace lim::detail {
namespace {

std::atomic<std::uint64_t> g_next_uid{1};

// How long an attach waits for another process to finish initialising the segment before it
// concludes that process is stuck (stopped, or spinning) and gives up.
constexpr auto kInitTimeout = std::chrono::seconds{5};
// How long `open` (which cannot initialise) waits on a segment that nobody is initialising
// before it reports it as abandoned: covers the microseconds between a creator's shm_open and
// its taking the init lock.
constexpr auto kAbandonedGrace = std::chrono::milliseconds{500};

std::uint64_t file_size(int fd) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) throw_errno(errno, "cannot stat the segment");
    return static_cast<std::uint64_t>(st.st_size);
}

// The file descriptor of an open segment file; closes it unless released.
class Fd {
  public:
    explicit Fd(int fd = -1) noexcept : fd_(fd) {}
    Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    Fd& operator=(Fd&& o) noexcept {
        if (this != &o) {
            reset();
            fd_ = std::exchange(o.fd_, -1);
        }
        return *this;
    }
    ~Fd() { reset(); }
    int get() const noexcept { return fd_; }
    int release() noexcept { return std::exchange(fd_, -1); }
    void reset() noexcept {
        if (fd_ >= 0) ::close(fd_);
        fd_ = -1;
    }

  private:
    int fd_;
};

std::string path_of(std::string_view name) {
    return fmt::format("/dev/shm/{}", shm_object_name(name));
}

// Opens /dev/shm/lim.<name> the only way a segment may be opened: never through a symbolic link
// (O_NOFOLLOW), never blocking (O_NONBLOCK: opening a FIFO that another user planted there would
// otherwise wait forever for a writer), never inherited by exec (O_CLOEXEC). With `create_mode`,
// creates it exclusively (O_EXCL); returns -1 with errno EEXIST when it exists. The caller checks
// with fstat that it is a regular file before reading or mapping anything.
int open_segment_file(std::string_view name, bool read_write, const unsigned* create_mode) {
    const std::string path = path_of(name);
    int flags = (read_write ? O_RDWR : O_RDONLY) | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC;
    if (create_mode) flags |= O_CREAT | O_EXCL;
    for (;;) {
        const int fd = create_mode ? ::open(path.c_str(), flags, static_cast<mode_t>(*create_mode))
                                   : ::open(path.c_str(), flags);
        if (fd >= 0 || errno != EINTR) return fd;
    }
}

[[noreturn]] void throw_open_error(int err, std::string_view name, std::string_view action) {
    switch (err) {
        case ENOENT:
            throw Error(
                Errc::not_found,
                fmt::format("segment '{}' does not exist (no /dev/shm/lim.{})", name, name));
        case EEXIST:
            throw Error(Errc::already_exists, fmt::format("segment '{}' already exists", name));
        case EACCES:
        case EPERM:
            throw Error(Errc::permission_denied,
                        fmt::format("cannot {} segment '{}': permission denied (see the mode of "
                                    "/dev/shm/lim.{})",
                                    action, name, name));
        case EISDIR:
        case ENXIO:
        case ENODEV:
        case ETXTBSY:
            throw Error(Errc::permission_denied,
                        fmt::format("cannot {} segment '{}': /dev/shm/lim.{} is not a regular "
                                    "file ({}); lim uses only regular files (remove it)",
                                    action, name, name, std::strerror(err)));
        case ELOOP:
            throw Error(Errc::permission_denied,
                        fmt::format("cannot {} segment '{}': /dev/shm/lim.{} is a symbolic link; "
                                    "lim opens only regular files (remove it)",
                                    action, name, name));
        default:
            throw Error(Errc::system_error, fmt::format("cannot {} segment '{}': {}", action, name,
                                                        std::strerror(err)));
    }
}

const char* file_type(mode_t m) {
    if (S_ISDIR(m)) return "a directory";
    if (S_ISFIFO(m)) return "a FIFO";
    if (S_ISSOCK(m)) return "a socket";
    if (S_ISCHR(m)) return "a character device";
    if (S_ISBLK(m)) return "a block device";
    if (S_ISLNK(m)) return "a symbolic link";
    return "not a regular file";
}

// The checks every open file gets before a byte of it is read: it is a regular file. And, for a
// read-write attach (`trust` set), that it is not someone else's trap: see docs/security.md,
// "Who can attach". `requested_mode` is SegmentOptions::mode.
struct Trust {
    bool check_owner;
    unsigned requested_mode;
};

struct stat checked_stat(int fd, std::string_view name, const Trust* trust) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) throw_errno(errno, fmt::format("cannot stat segment '{}'", name));
    if (!S_ISREG(st.st_mode)) {
        throw Error(Errc::permission_denied,
                    fmt::format("segment '{}': /dev/shm/lim.{} is {}; lim uses only regular files "
                                "(remove it)",
                                name, name, file_type(st.st_mode)));
    }
    if (trust == nullptr) return st;
    const unsigned mode = st.st_mode & 07777u;
    if ((mode & S_IWOTH) != 0 && (trust->requested_mode & S_IWOTH) == 0) {
        throw Error(Errc::permission_denied,
                    fmt::format("segment '{}' is writable by every user (mode {:#o}) and the "
                                "options ask for mode {:#o}; refusing to trust it (remove it, or "
                                "ask for that mode explicitly)",
                                name, mode, trust->requested_mode));
    }
    if (trust->check_owner && st.st_uid != ::geteuid() && st.st_uid != 0 &&
        (trust->requested_mode & 0077u) == 0) {
        throw Error(Errc::permission_denied,
                    fmt::format("segment '{}' belongs to uid {}, not to this user (uid {}) nor "
                                "root, and the options ask for a private mode {:#o}; refusing to "
                                "trust it (to share a segment, ask for a group mode such as 0660)",
                                name, st.st_uid, ::geteuid(), trust->requested_mode));
    }
    return st;
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

// Writes a fresh segment into the file `fd`. Runs under the init lock, with nobody attached
// (nobody maps a segment before `ready` is published). The file must be ours: a file that another
// user created under the name (squatting: they would keep write access to what we then trust) is
// refused, and the requested mode is applied, whatever mode the file had (and whatever the
// umask took away).
void initialise(int fd, std::string_view name, const SegmentOptions& options) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) throw_errno(errno, fmt::format("cannot stat segment '{}'", name));
    if (st.st_uid != ::geteuid()) {
        throw Error(Errc::permission_denied,
                    fmt::format("segment '{}' is not initialised and /dev/shm/lim.{} belongs to "
                                "uid {}, not to this user (uid {}); refusing to initialise a file "
                                "another user controls (remove it)",
                                name, name, st.st_uid, ::geteuid()));
    }
    if (::fchmod(fd, static_cast<mode_t>(options.mode)) != 0) {
        throw_errno(errno, fmt::format("cannot set the mode of segment '{}'", name));
    }
    const Geometry g = geometry_for(options.max_limiters, options.max_processes);
    // Truncating to zero first discards whatever a creator that died half-way left behind.
    if (::ftruncate(fd, 0) != 0 || ::ftruncate(fd, static_cast<off_t>(g.size_bytes)) != 0) {
        throw_errno(errno, fmt::format("cannot size segment '{}'", name));
    }
    // Reserve the pages now: tmpfs allocates on first touch, and a touch that finds /dev/shm
    // full kills the process with SIGBUS. Failing here gives the creator a clear error instead.
    if (const int err = ::posix_fallocate(fd, 0, static_cast<off_t>(g.size_bytes)); err != 0) {
        (void)::ftruncate(fd, 0);
        throw Error(Errc::system_error,
                    fmt::format("cannot reserve {} bytes for segment '{}' in /dev/shm: {} (free "
                                "space in /dev/shm, or lower max_processes / max_limiters)",
                                g.size_bytes, name, std::strerror(err)));
    }
    void* addr = ::mmap(nullptr, static_cast<std::size_t>(g.size_bytes), PROT_READ | PROT_WRITE,
                        MAP_SHARED, fd, 0);
    if (addr == MAP_FAILED) throw_errno(errno, fmt::format("cannot map segment '{}'", name));
    auto* header = new (addr) SegmentHeader{};
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
    ::munmap(addr, static_cast<std::size_t>(g.size_bytes));
}

// Every header field and table offset checked against the file's size; returns the geometry.
Geometry validate_header(std::string_view name, const SegmentHeader& h, std::uint64_t size) {
    if (h.magic != kMagic) corrupt(name, fmt::format("bad magic number {:#018x}", h.magic));
    if (h.layout_version != kLayoutVersion) {
        throw Error(Errc::version_mismatch,
                    fmt::format("segment '{}' has layout version {}, but this lim reads layout "
                                "version {}; processes built against different lim layouts cannot "
                                "share a segment (remove it once nothing uses it)",
                                name, h.layout_version, kLayoutVersion));
    }
    if (h.ready.load(std::memory_order_acquire) != kReady) corrupt(name, "it is not initialised");
    if (h.layout_hash != kLayoutHash) {
        throw Error(Errc::version_mismatch,
                    fmt::format("segment '{}' has layout version {} but layout hash {:#x}, and "
                                "this build of lim expects {:#x} (a build with another ABI)",
                                name, h.layout_version, h.layout_hash, kLayoutHash));
    }
    if (h.size_bytes != size) {
        corrupt(name, fmt::format("its header says {} bytes but the file has {} (truncated?)",
                                  h.size_bytes, size));
    }
    if (h.max_limiters < 1 || h.max_limiters > kMaxLimitersLimit || h.max_processes < 1 ||
        h.max_processes > kMaxProcessesLimit) {
        corrupt(name, fmt::format("its geometry ({} limiters, {} processes) is out of range",
                                  h.max_limiters, h.max_processes));
    }
    const Geometry g = geometry_for(h.max_limiters, h.max_processes);
    if (h.index_capacity != g.index_capacity || h.index_offset != g.index_offset ||
        h.records_offset != g.records_offset || h.slots_offset != g.slots_offset ||
        h.slot_size != g.slot_size || h.record_size != kRecordSize || g.size_bytes != size ||
        size > kMaxSegmentBytes) {
        corrupt(name, "its table offsets do not match its geometry");
    }
    if (h.records_used.load(std::memory_order_acquire) > h.max_limiters) {
        corrupt(name, fmt::format("it claims {} records in a table of {}", h.records_used.load(),
                                  h.max_limiters));
    }
    return g;
}

// Reads exactly `size` bytes at `offset`; false if the file ended first (it shrank).
bool pread_all(int fd, void* buf, std::uint64_t size, std::uint64_t offset) {
    auto* p = static_cast<char*>(buf);
    std::uint64_t done = 0;
    while (done < size) {
        const ssize_t n = ::pread(fd, p + done, static_cast<std::size_t>(size - done),
                                  static_cast<off_t>(offset + done));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) throw_errno(errno, "cannot read the segment");
        if (n == 0) return false;
        done += static_cast<std::uint64_t>(n);
    }
    return true;
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
    if (base_ != nullptr) ::munmap(base_, static_cast<std::size_t>(size_));
    if (fd_ >= 0) ::close(fd_);
}

int SegmentState::fd() const noexcept {
    return fd_;
}

std::shared_ptr<SegmentState> SegmentState::attach(std::string_view name,
                                                   const SegmentOptions& options, bool create_it,
                                                   Access access) {
    // Whatever a library or the system throws on the way (a thread that cannot start, an
    // allocation) reaches the caller as a lim::Error with a code, as every lim call promises.
    try {
        return attach_file(name, options, create_it, access);
    } catch (const Error&) {
        throw;
    } catch (const std::system_error& e) {
        const int err = e.code().value();
        throw Error(err == EACCES || err == EPERM ? Errc::permission_denied : Errc::system_error,
                    fmt::format("cannot attach segment '{}': {}", printable(name), e.what()));
    } catch (const std::bad_alloc&) {
        throw Error(Errc::system_error,
                    fmt::format("cannot attach segment '{}': out of memory", printable(name)));
    } catch (const std::exception& e) {
        throw Error(Errc::system_error,
                    fmt::format("cannot attach segment '{}': {}", printable(name), e.what()));
    }
}

std::shared_ptr<SegmentState> SegmentState::attach_file(std::string_view name,
                                                        const SegmentOptions& options,
                                                        bool create_it, Access access) {
    validate_segment_name(name);
    const SegmentOptions* create = create_it ? &options : nullptr;
    if (create) validate_options(*create);
    if (options.reap_after < Duration::zero()) {
        throw Error(Errc::invalid_argument, "reap_after must not be negative");
    }
    const bool read_write = access == Access::read_write;
    if (read_write) install_fork_hook();
    std::shared_ptr<SegmentState> state(new SegmentState(std::string(name), access));
    state->reap_after_ = options.reap_after;
    // A read-write attacher trusts the file's contents and lets others write what it reads:
    // check whose file it is. A read-only attach copies and validates, and trusts nothing.
    const Trust trust{true, options.mode};
    const Trust* const trusted = read_write ? &trust : nullptr;

    const auto deadline = std::chrono::steady_clock::now() + kInitTimeout;
    std::optional<std::chrono::steady_clock::time_point> unready_since;
    for (;;) {
        Fd fd;
        if (create) {
            fd = Fd(open_segment_file(name, read_write, &create->mode));
            if (fd.get() < 0 && errno != EEXIST) throw_open_error(errno, name, "create");
        }
        if (fd.get() < 0) {
            fd = Fd(open_segment_file(name, read_write, nullptr));
            // Removed between our create attempt and our open: try again from the top.
            if (fd.get() < 0 && create && errno == ENOENT) continue;
            if (fd.get() < 0) throw_open_error(errno, name, "open");
        }
        checked_stat(fd.get(), name, trusted);

        for (;;) {
            const Classified c = classify(fd.get());
            if (c.shape == Shape::corrupt) corrupt(name, c.why);
            if (c.shape == Shape::ready) {
                state->validate_and_map(fd.get());
                state->fd_ = fd.release();
                if (read_write) {
                    register_holder(*state);
                    if (options.reap_on_attach) reap_quietly(*state);
                }
                return state;
            }
            if (!read_write) {
                // A read command never waits: it reports what it found.
                throw UnreadySegment(Errc::corrupt_segment,
                                     fmt::format("segment '{}' is not initialised (being created, "
                                                 "or abandoned by a creator that died)",
                                                 name));
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
            if (create) {
                if (auto lock = FileLock::try_lock(fd.get(), LockByte::init)) {
                    if (classify(fd.get()).shape == Shape::unready) {
                        initialise(fd.get(), name, *create);
                        state->created_ = true;
                    }
                    continue;  // ready now (or corrupt): classify again, lock released
                }
            } else if (!FileLock::is_locked(fd.get(), LockByte::init)) {
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

void SegmentState::validate_and_map(int fd) {
    const std::uint64_t size = file_size(fd);
    if (size < sizeof(SegmentHeader)) {
        corrupt(name_, fmt::format("it is {} bytes long, shorter than a header", size));
    }
    // The header first, through pread: a file of the wrong shape (or a planted sparse file of a
    // gigabyte) is refused before anything is mapped or copied.
    alignas(SegmentHeader) std::byte raw[sizeof(SegmentHeader)];
    if (!pread_all(fd, raw, sizeof raw, 0)) corrupt(name_, "it shrank while being read");
    validate_header(name_, *reinterpret_cast<const SegmentHeader*>(raw), size);

    const auto length = static_cast<std::size_t>(size);
    std::byte* base = nullptr;
    if (access_ == Access::read_only) {
        // A private copy: whatever the file's owner does to it now (shrink it, rewrite it), this
        // process reads only what it validated, and cannot receive SIGBUS.
        void* addr =
            ::mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (addr == MAP_FAILED) throw_errno(errno, fmt::format("cannot copy segment '{}'", name_));
        base = static_cast<std::byte*>(addr);
        if (!pread_all(fd, base, size, 0) || file_size(fd) != size) {
            ::munmap(addr, length);
            corrupt(name_, "its size changed while it was being read");
        }
        ::mprotect(addr, length, PROT_READ);
    } else {
        void* addr = ::mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (addr == MAP_FAILED) throw_errno(errno, fmt::format("cannot map segment '{}'", name_));
        base = static_cast<std::byte*>(addr);
    }
    Geometry g{};
    try {
        g = validate_header(name_, *reinterpret_cast<const SegmentHeader*>(base), size);
    } catch (...) {
        ::munmap(base, length);
        throw;
    }
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
