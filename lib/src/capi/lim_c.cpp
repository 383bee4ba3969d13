// lib/src/capi/lim_c.cpp: the C ABI (lim/lim.h) over lim's public C++ API.
//
// A thin layer: each handle owns one C++ handle, each function converts its arguments, calls the
// C++ API inside `guarded`, which turns every exception into a status code and a thread-local
// message, and writes its outputs. It includes nothing from lib/src, so it survives changes to
// the library's internals. It adds no CAS loop and no shared state of its own.
#include "lim/lim.h"

#include <cxxabi.h>

#include <cmath>
#include <cstddef>
#include <exception>
#include <limits>
#include <new>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lim/lim.hpp"

#ifndef LIM_VERSION_STRING
#define LIM_VERSION_STRING "unknown"
#endif

// The C status values are the C++ Errc values: both are promised stable.
static_assert(LIM_INVALID_NAME == static_cast<int>(lim::Errc::invalid_name));
static_assert(LIM_INVALID_ARGUMENT == static_cast<int>(lim::Errc::invalid_argument));
static_assert(LIM_NOT_FOUND == static_cast<int>(lim::Errc::not_found));
static_assert(LIM_ALREADY_EXISTS == static_cast<int>(lim::Errc::already_exists));
static_assert(LIM_CORRUPT_SEGMENT == static_cast<int>(lim::Errc::corrupt_segment));
static_assert(LIM_VERSION_MISMATCH == static_cast<int>(lim::Errc::version_mismatch));
static_assert(LIM_CONFIG_MISMATCH == static_cast<int>(lim::Errc::config_mismatch));
static_assert(LIM_TABLE_FULL == static_cast<int>(lim::Errc::table_full));
static_assert(LIM_PERMISSION_DENIED == static_cast<int>(lim::Errc::permission_denied));
static_assert(LIM_OVER_RELEASE == static_cast<int>(lim::Errc::over_release));
static_assert(LIM_SYSTEM_ERROR == static_cast<int>(lim::Errc::system_error));
static_assert(LIM_BUSY == static_cast<int>(lim::Errc::busy));

struct lim_segment {
    lim::Segment seg;
};
struct lim_semaphore {
    lim::Semaphore sem;
};
struct lim_weighted_semaphore {
    lim::WeightedSemaphore sem;
};
struct lim_backoff_window {
    lim::BackoffWindow w;
};
struct lim_dispatch {
    lim::Dispatch d;
};
// A C++ Permit must not outlive every handle of its Dispatch; a C caller (or a garbage collector
// at interpreter exit) may free the lim_dispatch first, so the permit holds a handle of its own.
// Members are destroyed in reverse order: the permit releases before the owner goes.
struct lim_permit {
    std::optional<lim::Dispatch> owner;
    lim::Permit p;
};
struct lim_limiter {
    lim::Limiter l;
};
struct lim_token_bucket {
    lim::TokenBucket tb;
};
struct lim_throttle {
    lim::Throttle t;
};
struct lim_throttled_rate_limiter {
    lim::ThrottledRateLimiter t;
};
struct lim_reap_report {
    lim::ReapReport r;
};

namespace {

thread_local std::string last_error;

void set_error(const char* message) noexcept {
    try {
        last_error = message;
    } catch (...) {
        last_error.clear();  // out of memory: the code still says what happened
    }
}

// Runs `fn`; 0 if it returns, else the status its exception maps to. Not noexcept, for one
// thing only: a forced unwind (pthread_exit or a cancellation ending this thread) must go on
// through here, running the guards of the waits it leaves (their registrations and slots given
// back). It happens inside an _interruptible wait whose check calls into a runtime that ends the
// thread there: CPython calls pthread_exit in a daemon thread that takes the GIL while the
// interpreter finalizes. Swallowing it (catch (...)) or meeting a noexcept frame aborts the
// whole process ("FATAL: exception not rethrown") as it exits normally. The handler binds its
// reference to what __cxa_begin_catch returns for a forced unwind, a null pointer (it is no C++
// object, and the handler never reads it): UBSan's null check is off in this function only.
template <class F>
__attribute__((no_sanitize("null"))) int guarded(F&& fn) {
    try {
        fn();
        return LIM_OK;
    } catch (abi::__forced_unwind&) {
        throw;
    } catch (const lim::Error& e) {
        set_error(e.what());
        return static_cast<int>(e.code());
    } catch (const std::bad_alloc&) {
        set_error("out of memory");
        return LIM_SYSTEM_ERROR;
    } catch (const std::exception& e) {
        set_error(e.what());
        return LIM_SYSTEM_ERROR;
    } catch (...) {
        set_error("unknown exception");
        return LIM_SYSTEM_ERROR;
    }
}

// Checks an argument. A call with side effects binds its output with need() *before* the call
// (`int& out = need(acquired, ...); out = sem.try_acquire(n);`), never as `need(...) = f()`:
// C++17 sequences an assignment's right side first, so a NULL output would be found only after
// the units were taken, and the caller, told LIM_INVALID_ARGUMENT, would never give them back.
template <class T>
T& need(T* p, const char* what) {
    if (p == nullptr) throw lim::Error(lim::Errc::invalid_argument, std::string(what) + " is NULL");
    return *p;
}

const char* need_str(const char* s, const char* what) {
    if (s == nullptr) throw lim::Error(lim::Errc::invalid_argument, std::string(what) + " is NULL");
    return s;
}

lim::TimePoint tp(int64_t ns) {
    return lim::from_nanos(ns);
}
lim::Duration dur(int64_t ns) {
    return lim::Duration{ns};
}

lim::InfiniteOrFinite<double> to_iof(double x) {
    if (std::isinf(x) && x > 0) return lim::infinite;
    return x;
}
double from_iof(const lim::InfiniteOrFinite<double>& v) {
    return v.is_infinite() ? std::numeric_limits<double>::infinity() : v.value_or(0.0);
}

void fill_state(const lim::Limiter& l, lim::TimePoint now, lim_limiter_state* out) {
    lim_limiter_state s{};
    s.bucket_size = l.bucket_size();
    s.in_bucket = l.in_bucket(now);
    s.in_hopper = from_iof(l.in_hopper(now));
    s.in_flight = l.in_flight(now);
    s.in_limiter = from_iof(l.in_limiter(now));
    s.in_system = from_iof(l.in_system(now));
    s.hopper_to_bucket_rate_per_sec = from_iof(l.hopper_to_bucket_rate_per_sec());
    s.token_target_level = from_iof(l.token_target_level());
    s.waiters = l.waiters();
    *out = s;
}

void fill_availability(const lim::Availability& a, lim_availability* out) {
    lim_availability r{};
    switch (a.kind()) {
        case lim::Availability::Kind::at:
            r.kind = LIM_AVAILABLE_AT;
            r.time_ns = lim::to_nanos(a.time());
            break;
        case lim::Availability::Kind::never_because_greater_than_bucket_size:
            r.kind = LIM_AVAILABLE_NEVER_BECAUSE_GREATER_THAN_BUCKET_SIZE;
            break;
        case lim::Availability::Kind::when_return_to_hopper_is_called:
            r.kind = LIM_AVAILABLE_WHEN_RETURN_TO_HOPPER_IS_CALLED;
            break;
    }
    *out = r;
}

void fill_start_job(const lim::StartJob& s, lim_start_job* out) {
    lim_start_job r{};
    switch (s.kind()) {
        case lim::StartJob::Kind::start:
            r.kind = LIM_START_JOB_START;
            break;
        case lim::StartJob::Kind::max_concurrent_jobs_running:
            r.kind = LIM_START_JOB_MAX_CONCURRENT_JOBS_RUNNING;
            break;
        case lim::StartJob::Kind::unable_until_at_least:
            r.kind = LIM_START_JOB_UNABLE_UNTIL_AT_LEAST;
            r.time_ns = lim::to_nanos(s.time());
            break;
    }
    *out = r;
}

int try_take_code(lim::TryTake t) {
    switch (t) {
        case lim::TryTake::taken:
            return LIM_TRY_TAKE_TAKEN;
        case lim::TryTake::unable:
            return LIM_TRY_TAKE_UNABLE;
        case lim::TryTake::asked_for_more_than_bucket_size:
            return LIM_TRY_TAKE_ASKED_FOR_MORE_THAN_BUCKET_SIZE;
    }
    return LIM_TRY_TAKE_UNABLE;
}

// Unknown bits are refused, so that a flag added later cannot be silently ignored by an older
// liblim (a caller asking for it learns that this library does not have it).
bool adopt(int flags) {
    if ((flags & ~LIM_ADOPT_EXISTING) != 0) {
        throw lim::Error(
            lim::Errc::invalid_argument,
            "flags is " + std::to_string(flags) + "; the only flag is LIM_ADOPT_EXISTING (1)");
    }
    return (flags & LIM_ADOPT_EXISTING) != 0;
}

lim::SegmentOptions segment_options(const lim_segment_options* o) {
    lim::SegmentOptions s;
    if (o != nullptr) {
        s.max_limiters = o->max_limiters;
        s.max_processes = o->max_processes;
        s.mode = o->mode;
        s.reap_after = dur(o->reap_after_ns);
        s.reap_on_attach = o->reap_on_attach != 0;
    }
    return s;
}

std::chrono::system_clock::time_point unix_tp(int64_t ns) {
    return std::chrono::system_clock::time_point(
        std::chrono::duration_cast<std::chrono::system_clock::duration>(
            std::chrono::nanoseconds{ns}));
}

void put_retry(const std::optional<std::chrono::milliseconds>& r, int* found, int64_t* wait_ms) {
    need(found, "found") = r.has_value() ? 1 : 0;
    need(wait_ms, "wait_ms") = r ? static_cast<int64_t>(r->count()) : 0;
}

lim::Permit& empty_permit(lim_permit* p) {
    auto& permit = need(p, "permit").p;
    if (permit.held()) {
        throw lim::Error(lim::Errc::invalid_argument, "the permit passed in already holds one");
    }
    return permit;
}

// What a WaitCheck calls: the C caller's function, nonzero meaning stop.
struct StopCheck {
    lim_should_stop_fn fn;
    void* context;
};
bool call_stop_check(void* p) {
    const auto* c = static_cast<const StopCheck*>(p);
    return c->fn(c->context) != 0;
}

// The _interruptible calls: runs `wait` (true: acquired) on this thread under a WaitCheck that
// calls `should_stop`, and writes *result. WaitStopped leaves the C++ wait only after it has
// withdrawn its registration and given back what it took (lim/wait_check.hpp).
template <class F>
int interruptible(lim_should_stop_fn should_stop, void* context, int64_t check_interval_ns,
                  int* result, F&& wait) {  // not noexcept: see guarded
    return guarded([&] {
        int& out = need(result, "result");
        if (check_interval_ns <= 0) {
            throw lim::Error(
                lim::Errc::invalid_argument,
                "check_interval_ns must be positive, not " + std::to_string(check_interval_ns));
        }
        if (should_stop == nullptr) {
            out = wait() ? LIM_WAIT_ACQUIRED : LIM_WAIT_TIMED_OUT;
            return;
        }
        StopCheck c{should_stop, context};
        const lim::WaitCheck check(&call_stop_check, &c, lim::Duration{check_interval_ns});
        try {
            out = wait() ? LIM_WAIT_ACQUIRED : LIM_WAIT_TIMED_OUT;
        } catch (const lim::WaitStopped&) {
            out = LIM_WAIT_STOPPED;
        }
    });
}

lim::LimiterConfig limiter_config(const lim_limiter_config* c) {
    const auto& cc = need(c, "config");
    return lim::LimiterConfig{
        .hopper_to_bucket_rate_per_sec = to_iof(cc.hopper_to_bucket_rate_per_sec),
        .bucket_size = cc.bucket_size,
        .initial_bucket_level = cc.initial_bucket_level,
        .initial_hopper_level = to_iof(cc.initial_hopper_level)};
}

// ---- Hand-off: the C struct is the C++ one, field for field
static_assert(sizeof(lim_hand_off) == sizeof(lim::HandOff));
static_assert(offsetof(lim_hand_off, record) == offsetof(lim::HandOff, record));
static_assert(offsetof(lim_hand_off, owner) == offsetof(lim::HandOff, owner));
static_assert(offsetof(lim_hand_off, amount) == offsetof(lim::HandOff, amount));
static_assert(offsetof(lim_hand_off, layer) == offsetof(lim::HandOff, layer));

lim_hand_off to_c(const lim::HandOff& h) noexcept {
    return {h.slot, h.record, h.owner, h.amount, h.layer, h.reserved};
}

lim::HandOff from_c(const lim_hand_off& c) noexcept {
    return {.slot = c.slot,
            .record = c.record,
            .owner = c.owner,
            .amount = c.amount,
            .layer = c.layer,
            .reserved = c.reserved};
}

}  // namespace

extern "C" {

// ---- errors, version, clock --------------------------------------------------------------------

const char* lim_last_error(void) {
    return last_error.c_str();
}

const char* lim_errc_name(int code) {
    if (code == LIM_OK) return "ok";
    if (code < LIM_INVALID_NAME || code > LIM_BUSY) return "unknown";
    return lim::to_string(static_cast<lim::Errc>(code)).data();
}

const char* lim_version(void) {
    return LIM_VERSION_STRING;
}

int64_t lim_now_ns(void) {
    return lim::to_nanos(lim::Clock::now());
}

// ---- Segment
// -------------------------------------------------------------------------------------

void lim_segment_options_init(lim_segment_options* options) {
    if (options == nullptr) return;
    const lim::SegmentOptions d;
    options->max_limiters = d.max_limiters;
    options->max_processes = d.max_processes;
    options->mode = d.mode;
    options->reap_on_attach = d.reap_on_attach ? 1 : 0;
    options->reap_after_ns = d.reap_after.count();
}

int lim_segment_open_or_create(const char* name, const lim_segment_options* options,
                               lim_segment** out) {
    return guarded([&] {
        need(out, "out");
        auto seg = lim::Segment::open_or_create(need_str(name, "name"), segment_options(options));
        *out = new lim_segment{std::move(seg)};
    });
}

int lim_segment_open(const char* name, const lim_segment_options* options, lim_segment** out) {
    return guarded([&] {
        need(out, "out");
        auto seg = options ? lim::Segment::open(need_str(name, "name"), segment_options(options))
                           : lim::Segment::open(need_str(name, "name"));
        *out = new lim_segment{std::move(seg)};
    });
}

int lim_segment_remove(const char* name, int* removed) {
    return guarded([&] {
        const bool r = lim::Segment::remove(need_str(name, "name"));
        if (removed) *removed = r ? 1 : 0;
    });
}

void lim_segment_close(lim_segment* segment) {
    delete segment;
}

int lim_segment_info_get(const lim_segment* segment, lim_segment_info* out) {
    return guarded([&] {
        const lim::SegmentInfo i = need(segment, "segment").seg.info();
        lim_segment_info r{};
        const std::size_t n = std::min(i.name.size(), sizeof r.name - 1);
        i.name.copy(r.name, n);
        r.name[n] = '\0';
        r.size_bytes = i.size_bytes;
        r.layout_version = i.layout_version;
        r.max_limiters = i.max_limiters;
        r.max_processes = i.max_processes;
        r.limiters = i.limiters;
        r.processes = i.processes;
        r.created_unix_ns =
            std::chrono::duration_cast<std::chrono::nanoseconds>(i.created.time_since_epoch())
                .count();
        need(out, "out") = r;
    });
}

int lim_segment_is_creator(const lim_segment* segment, int* out) {
    return guarded([&] { need(out, "out") = need(segment, "segment").seg.is_creator() ? 1 : 0; });
}

int lim_segment_reap(lim_segment* segment, lim_reap_report** out) {
    return guarded([&] {
        need(out, "out");
        auto r = need(segment, "segment").seg.reap();
        *out = new lim_reap_report{std::move(r)};
    });
}

size_t lim_reap_report_count(const lim_reap_report* report) {
    return report ? report->r.reaped.size() : 0;
}

int lim_reap_report_pid(const lim_reap_report* report, size_t i) {
    if (report == nullptr || i >= report->r.reaped.size()) return 0;
    return report->r.reaped[i].pid;
}

size_t lim_reap_report_returned_count(const lim_reap_report* report, size_t i) {
    if (report == nullptr || i >= report->r.reaped.size()) return 0;
    return report->r.reaped[i].returned.size();
}

int lim_reap_report_returned(const lim_reap_report* report, size_t i, size_t j,
                             lim_returned_holding* out) {
    return guarded([&] {
        const auto& r = need(report, "report").r;
        if (i >= r.reaped.size() || j >= r.reaped[i].returned.size()) {
            throw lim::Error(lim::Errc::invalid_argument, "reap report index out of range");
        }
        const lim::ReturnedHolding& h = r.reaped[i].returned[j];
        need(out, "out") =
            lim_returned_holding{h.kind.c_str(), h.key.c_str(), h.layer.c_str(), h.amount};
    });
}

size_t lim_reap_report_deferred_count(const lim_reap_report* report) {
    return report ? report->r.deferred.size() : 0;
}

const char* lim_reap_report_deferred(const lim_reap_report* report, size_t i) {
    if (report == nullptr || i >= report->r.deferred.size()) return nullptr;
    return report->r.deferred[i].c_str();
}

void lim_reap_report_free(lim_reap_report* report) {
    delete report;
}

int lim_segment_reset(lim_segment* segment, const char* key, int force) {
    return guarded([&] {
        lim::ResetOptions o;
        if (key != nullptr) o.key = key;
        o.force = force != 0;
        need(segment, "segment").seg.reset(o);
    });
}

// ---- Semaphore, WeightedSemaphore
// ----------------------------------------------------------------

#define LIM_C_SEMAPHORE(prefix, Type, Options)                                                  \
    int prefix##_open(lim_segment* segment, const char* key, uint64_t capacity, int flags,      \
                      prefix** out) {                                                           \
        return guarded([&] {                                                                    \
            need(out, "out");                                                                   \
            const auto& seg = need(segment, "segment").seg;                                     \
            const char* k = need_str(key, "key");                                               \
            auto s = adopt(flags)                                                               \
                         ? lim::Type::open(seg, k, lim::Options{capacity}, lim::adopt_existing) \
                         : lim::Type::open(seg, k, lim::Options{capacity});                     \
            *out = new prefix{std::move(s)};                                                    \
        });                                                                                     \
    }                                                                                           \
    int prefix##_try_acquire(prefix* sem, uint64_t n, int* acquired) {                          \
        return guarded([&] {                                                                    \
            int& out = need(acquired, "acquired");                                              \
            out = need(sem, "semaphore").sem.try_acquire(n) ? 1 : 0;                            \
        });                                                                                     \
    }                                                                                           \
    int prefix##_acquire(prefix* sem, uint64_t n) {                                             \
        return guarded([&] { need(sem, "semaphore").sem.acquire(n); });                         \
    }                                                                                           \
    int prefix##_acquire_until(prefix* sem, uint64_t n, int64_t deadline_ns, int* acquired) {   \
        return guarded([&] {                                                                    \
            need(acquired, "acquired");                                                         \
            *acquired = need(sem, "semaphore").sem.acquire_until(n, tp(deadline_ns)) ? 1 : 0;   \
        });                                                                                     \
    }                                                                                           \
    int prefix##_acquire_until_interruptible(prefix* sem, uint64_t n, int64_t deadline_ns,      \
                                             lim_should_stop_fn should_stop, void* context,     \
                                             int64_t check_interval_ns, int* result) {          \
        return interruptible(should_stop, context, check_interval_ns, result, [&] {             \
            auto& s = need(sem, "semaphore").sem;                                               \
            if (deadline_ns == INT64_MAX) {                                                     \
                s.acquire(n);                                                                   \
                return true;                                                                    \
            }                                                                                   \
            return s.acquire_until(n, tp(deadline_ns));                                         \
        });                                                                                     \
    }                                                                                           \
    int prefix##_release(prefix* sem, uint64_t n) {                                             \
        return guarded([&] { need(sem, "semaphore").sem.release(n); });                         \
    }                                                                                           \
    int prefix##_in_use(const prefix* sem, uint64_t* out) {                                     \
        return guarded([&] { need(out, "out") = need(sem, "semaphore").sem.in_use(); });        \
    }                                                                                           \
    int prefix##_capacity(const prefix* sem, uint64_t* out) {                                   \
        return guarded([&] { need(out, "out") = need(sem, "semaphore").sem.capacity(); });      \
    }                                                                                           \
    int prefix##_waiters(const prefix* sem, uint32_t* out) {                                    \
        return guarded([&] { need(out, "out") = need(sem, "semaphore").sem.waiters(); });       \
    }                                                                                           \
    int prefix##_hand_off(prefix* sem, uint64_t n, lim_hand_off* out) {                         \
        return guarded([&] {                                                                    \
            lim_hand_off& o = need(out, "out");                                                 \
            o = to_c(need(sem, "semaphore").sem.hand_off(n));                                   \
        });                                                                                     \
    }                                                                                           \
    int prefix##_receive(prefix* sem, const lim_hand_off* h, int* received) {                   \
        return guarded([&] {                                                                    \
            const lim::HandOff ticket = from_c(need(h, "hand_off"));                            \
            int& out = need(received, "received");                                              \
            out = need(sem, "semaphore").sem.receive(ticket) ? 1 : 0;                           \
        });                                                                                     \
    }                                                                                           \
    void prefix##_close(prefix* sem) {                                                          \
        delete sem;                                                                             \
    }

LIM_C_SEMAPHORE(lim_semaphore, Semaphore, SemaphoreOptions)
LIM_C_SEMAPHORE(lim_weighted_semaphore, WeightedSemaphore, WeightedSemaphoreOptions)
#undef LIM_C_SEMAPHORE

// ---- BackoffWindow
// -------------------------------------------------------------------------------

int lim_backoff_window_for_key(lim_segment* segment, const char* key, lim_backoff_window** out) {
    return guarded([&] {
        need(out, "out");
        auto w = lim::BackoffWindow::for_key(need(segment, "segment").seg, need_str(key, "key"));
        *out = new lim_backoff_window{std::move(w)};
    });
}

int lim_backoff_window_set(lim_backoff_window* w, int64_t duration_ns) {
    return guarded([&] { need(w, "window").w.set(dur(duration_ns)); });
}

int lim_backoff_window_set_at(lim_backoff_window* w, int64_t duration_ns, int64_t now_ns) {
    return guarded([&] { need(w, "window").w.set(dur(duration_ns), tp(now_ns)); });
}

int lim_backoff_window_should_backoff(const lim_backoff_window* w, int* out) {
    return guarded([&] { need(out, "out") = need(w, "window").w.should_backoff() ? 1 : 0; });
}

int lim_backoff_window_should_backoff_at(const lim_backoff_window* w, int64_t now_ns, int* out) {
    return guarded(
        [&] { need(out, "out") = need(w, "window").w.should_backoff(tp(now_ns)) ? 1 : 0; });
}

int lim_backoff_window_remaining(const lim_backoff_window* w, int64_t* out_ns) {
    return guarded([&] { need(out_ns, "out") = need(w, "window").w.remaining().count(); });
}

int lim_backoff_window_remaining_at(const lim_backoff_window* w, int64_t now_ns, int64_t* out_ns) {
    return guarded(
        [&] { need(out_ns, "out") = need(w, "window").w.remaining(tp(now_ns)).count(); });
}

int lim_backoff_window_until(const lim_backoff_window* w, int* has_deadline, int64_t* until_ns) {
    return guarded([&] {
        const auto u = need(w, "window").w.until();
        need(has_deadline, "has_deadline") = u ? 1 : 0;
        need(until_ns, "until_ns") = u ? lim::to_nanos(*u) : 0;
    });
}

int lim_backoff_window_sets(const lim_backoff_window* w, uint64_t* out) {
    return guarded([&] { need(out, "out") = need(w, "window").w.sets(); });
}

int lim_backoff_window_wait_until(const lim_backoff_window* w, int64_t deadline_ns, int* over) {
    return guarded([&] {
        need(over, "over");
        *over = need(w, "window").w.wait_until(tp(deadline_ns)) ? 1 : 0;
    });
}

int lim_backoff_window_clear(lim_backoff_window* w) {
    return guarded([&] { need(w, "window").w.clear(); });
}

void lim_backoff_window_close(lim_backoff_window* w) {
    delete w;
}

// ---- Dispatch and Permit
// -------------------------------------------------------------------------

void lim_dispatch_options_init(lim_dispatch_options* options) {
    if (options == nullptr) return;
    const lim::ExponentialBackoff b;
    options->limiter = nullptr;
    options->key = "default";
    options->concurrency = 400;
    options->throttled_concurrency = 10;
    options->byte_budget = 5'000'000;
    options->backoff_window_ns = std::chrono::nanoseconds(std::chrono::seconds{10}).count();
    options->byte_penalty_multiplier = 20;
    options->acquire_backoff_base_ns = b.base.count();
    options->acquire_backoff_max_ns = b.max.count();
    options->acquire_backoff_jitter = b.jitter;
}

int lim_dispatch_open(lim_segment* segment, const lim_dispatch_options* options, int flags,
                      lim_dispatch** out) {
    return guarded([&] {
        need(out, "out");
        const auto& o = need(options, "options");
        lim::DispatchOptions d{.limiter = need(o.limiter, "options.limiter").w,
                               .key = need_str(o.key, "options.key"),
                               .concurrency = o.concurrency,
                               .throttled_concurrency = o.throttled_concurrency,
                               .byte_budget = o.byte_budget,
                               .backoff_window = dur(o.backoff_window_ns),
                               .byte_penalty_multiplier = o.byte_penalty_multiplier,
                               .acquire_backoff = {.base = dur(o.acquire_backoff_base_ns),
                                                   .max = dur(o.acquire_backoff_max_ns),
                                                   .jitter = o.acquire_backoff_jitter}};
        const auto& seg = need(segment, "segment").seg;
        auto disp = adopt(flags) ? lim::Dispatch::open(seg, d, lim::adopt_existing)
                                 : lim::Dispatch::open(seg, d);
        *out = new lim_dispatch{std::move(disp)};
    });
}

int lim_dispatch_acquire(lim_dispatch* d, uint64_t bytes, lim_permit* permit) {
    return guarded([&] {
        auto& p = empty_permit(permit);
        auto& disp = need(d, "dispatch").d;
        p = disp.acquire(bytes);
        permit->owner = disp;
    });
}

int lim_dispatch_try_acquire(lim_dispatch* d, uint64_t bytes, lim_permit* permit, int* acquired) {
    return guarded([&] {
        need(acquired, "acquired");
        auto& p = empty_permit(permit);
        auto& disp = need(d, "dispatch").d;
        auto r = disp.try_acquire(bytes);
        *acquired = r ? 1 : 0;
        if (r) {
            p = std::move(*r);
            permit->owner = disp;
        }
    });
}

int lim_dispatch_acquire_until(lim_dispatch* d, uint64_t bytes, int64_t deadline_ns,
                               lim_permit* permit, int* acquired) {
    return guarded([&] {
        need(acquired, "acquired");
        auto& p = empty_permit(permit);
        auto& disp = need(d, "dispatch").d;
        auto r = disp.acquire_until(bytes, tp(deadline_ns));
        *acquired = r ? 1 : 0;
        if (r) {
            p = std::move(*r);
            permit->owner = disp;
        }
    });
}

int lim_dispatch_acquire_until_interruptible(lim_dispatch* d, uint64_t bytes, int64_t deadline_ns,
                                             lim_permit* permit, lim_should_stop_fn should_stop,
                                             void* context, int64_t check_interval_ns,
                                             int* result) {
    return interruptible(should_stop, context, check_interval_ns, result, [&] {
        auto& p = empty_permit(permit);
        auto& disp = need(d, "dispatch").d;
        std::optional<lim::Permit> r;
        if (deadline_ns == INT64_MAX) {
            r = disp.acquire(bytes);
        } else {
            r = disp.acquire_until(bytes, tp(deadline_ns));
        }
        if (!r) return false;
        p = std::move(*r);
        permit->owner = disp;
        return true;
    });
}

int lim_dispatch_set_backoff(lim_dispatch* d, int64_t duration_ns) {
    return guarded([&] { need(d, "dispatch").d.set_backoff(dur(duration_ns)); });
}

int lim_dispatch_backoff_active(const lim_dispatch* d, int* out) {
    return guarded([&] { need(out, "out") = need(d, "dispatch").d.backoff_active() ? 1 : 0; });
}

int lim_dispatch_snapshot_get(const lim_dispatch* d, lim_dispatch_snapshot* out) {
    return guarded([&] {
        const lim::DispatchSnapshot s = need(d, "dispatch").d.snapshot();
        lim_dispatch_snapshot r{};
        r.backoff_active = s.backoff_active ? 1 : 0;
        r.backoff_remaining_ns = s.backoff_remaining.count();
        r.throttle_remaining_ns = s.throttle_remaining.count();
        r.in_flight = s.in_flight;
        r.concurrency = s.concurrency;
        r.throttled_in_flight = s.throttled_in_flight;
        r.throttled_concurrency = s.throttled_concurrency;
        r.bytes_in_flight = s.bytes_in_flight;
        r.byte_budget = s.byte_budget;
        r.waiters = s.waiters;
        r.concurrency_waiters = s.concurrency_waiters;
        r.throttled_waiters = s.throttled_waiters;
        r.bytes_waiters = s.bytes_waiters;
        need(out, "out") = r;
    });
}

void lim_dispatch_close(lim_dispatch* d) {
    delete d;
}

int lim_permit_create(lim_permit** out) {
    return guarded([&] {
        lim_permit*& o = need(out, "out");  // first: a NULL out must not leak a new permit
        o = new lim_permit{};
    });
}

int lim_permit_release(lim_permit* p) {
    return guarded([&] {
        auto& permit = need(p, "permit");
        permit.p.release();
        // Drop the Dispatch it kept alive, unless it still holds (a fork child's copy of the
        // parent's permit, which release leaves alone and which must keep its Dispatch).
        if (!permit.p.held()) permit.owner.reset();
    });
}

int lim_permit_held(const lim_permit* p) {
    return p && p->p.held() ? 1 : 0;
}

uint64_t lim_permit_bytes(const lim_permit* p) {
    return p && p->p.held() ? p->p.bytes() : 0;
}

int lim_permit_throttled(const lim_permit* p) {
    return p && p->p.held() && p->p.throttled() ? 1 : 0;
}

void lim_permit_destroy(lim_permit* p) {
    delete p;  // ~Permit releases what it holds
}

// ---- Limiter family
// ------------------------------------------------------------------------------

int lim_limiter_open_at(lim_segment* segment, const char* key, const lim_limiter_config* config,
                        int flags, int64_t now_ns, lim_limiter** out) {
    return guarded([&] {
        need(out, "out");
        const auto& seg = need(segment, "segment").seg;
        const char* k = need_str(key, "key");
        const auto c = limiter_config(config);
        auto l = adopt(flags) ? lim::Limiter::open(seg, k, c, lim::adopt_existing, tp(now_ns))
                              : lim::Limiter::open(seg, k, c, tp(now_ns));
        *out = new lim_limiter{std::move(l)};
    });
}

int lim_limiter_open(lim_segment* segment, const char* key, const lim_limiter_config* config,
                     int flags, lim_limiter** out) {
    return lim_limiter_open_at(segment, key, config, flags, lim_now_ns(), out);
}

int lim_limiter_try_take_at(lim_limiter* l, int64_t now_ns, double n, int* result) {
    return guarded([&] {
        int& out = need(result, "result");  // first: a NULL result must take nothing
        out = try_take_code(need(l, "limiter").l.try_take(tp(now_ns), n));
    });
}

int lim_limiter_try_take(lim_limiter* l, double n, int* result) {
    return guarded([&] {
        int& out = need(result, "result");
        out = try_take_code(need(l, "limiter").l.try_take(n));
    });
}

int lim_limiter_take(lim_limiter* l, double n) {
    return guarded([&] { need(l, "limiter").l.take(n); });
}

int lim_limiter_take_until(lim_limiter* l, double n, int64_t deadline_ns, int* taken) {
    return guarded([&] {
        need(taken, "taken");
        *taken = need(l, "limiter").l.take_until(n, tp(deadline_ns)) ? 1 : 0;
    });
}

int lim_limiter_return_to_hopper(lim_limiter* l, double n) {
    return guarded([&] { need(l, "limiter").l.return_to_hopper(n); });
}

int lim_limiter_return_to_hopper_at(lim_limiter* l, int64_t now_ns, double n) {
    return guarded([&] { need(l, "limiter").l.return_to_hopper(tp(now_ns), n); });
}

int lim_limiter_tokens_may_be_available_when(const lim_limiter* l, double n,
                                             lim_availability* out) {
    return lim_limiter_tokens_may_be_available_when_at(l, lim_now_ns(), n, out);
}

int lim_limiter_tokens_may_be_available_when_at(const lim_limiter* l, int64_t now_ns, double n,
                                                lim_availability* out) {
    return guarded([&] {
        need(out, "out");
        fill_availability(need(l, "limiter").l.tokens_may_be_available_when(tp(now_ns), n), out);
    });
}

int lim_limiter_set_token_target_level(lim_limiter* l, double level) {
    return lim_limiter_set_token_target_level_at(l, lim_now_ns(), level);
}

int lim_limiter_set_token_target_level_at(lim_limiter* l, int64_t now_ns, double level) {
    return guarded([&] { need(l, "limiter").l.set_token_target_level(tp(now_ns), to_iof(level)); });
}

int lim_limiter_set_bucket_size(lim_limiter* l, double size) {
    return lim_limiter_set_bucket_size_at(l, lim_now_ns(), size);
}

int lim_limiter_set_bucket_size_at(lim_limiter* l, int64_t now_ns, double size) {
    return guarded([&] { need(l, "limiter").l.set_bucket_size(tp(now_ns), size); });
}

int lim_limiter_set_hopper_to_bucket_rate_per_sec(lim_limiter* l, double rate) {
    return lim_limiter_set_hopper_to_bucket_rate_per_sec_at(l, lim_now_ns(), rate);
}

int lim_limiter_set_hopper_to_bucket_rate_per_sec_at(lim_limiter* l, int64_t now_ns, double rate) {
    return guarded(
        [&] { need(l, "limiter").l.set_hopper_to_bucket_rate_per_sec(tp(now_ns), to_iof(rate)); });
}

int lim_limiter_state_get(const lim_limiter* l, lim_limiter_state* out) {
    return lim_limiter_state_get_at(l, lim_now_ns(), out);
}

int lim_limiter_state_get_at(const lim_limiter* l, int64_t now_ns, lim_limiter_state* out) {
    return guarded([&] { fill_state(need(l, "limiter").l, tp(now_ns), &need(out, "out")); });
}

int lim_limiter_invariant(const lim_limiter* l) {
    return guarded([&] { need(l, "limiter").l.invariant(); });
}

void lim_limiter_close(lim_limiter* l) {
    delete l;
}

int lim_token_bucket_open_at(lim_segment* segment, const char* key,
                             const lim_token_bucket_options* options, int flags, int64_t now_ns,
                             lim_token_bucket** out) {
    return guarded([&] {
        need(out, "out");
        const auto& seg = need(segment, "segment").seg;
        const char* k = need_str(key, "key");
        const auto& o = need(options, "options");
        const lim::TokenBucketOptions t{.burst_size = o.burst_size,
                                        .sustained_rate_per_sec = o.sustained_rate_per_sec,
                                        .initial_bucket_level = o.initial_bucket_level};
        auto tb = adopt(flags) ? lim::TokenBucket::open(seg, k, t, lim::adopt_existing, tp(now_ns))
                               : lim::TokenBucket::open(seg, k, t, tp(now_ns));
        *out = new lim_token_bucket{std::move(tb)};
    });
}

int lim_token_bucket_open(lim_segment* segment, const char* key,
                          const lim_token_bucket_options* options, int flags,
                          lim_token_bucket** out) {
    return lim_token_bucket_open_at(segment, key, options, flags, lim_now_ns(), out);
}

int lim_token_bucket_try_take(lim_token_bucket* tb, double n, int* result) {
    return guarded([&] {
        int& out = need(result, "result");
        out = try_take_code(need(tb, "token bucket").tb.try_take(n));
    });
}

int lim_token_bucket_try_take_at(lim_token_bucket* tb, int64_t now_ns, double n, int* result) {
    return guarded([&] {
        int& out = need(result, "result");
        out = try_take_code(need(tb, "token bucket").tb.try_take(tp(now_ns), n));
    });
}

int lim_token_bucket_take(lim_token_bucket* tb, double n) {
    return guarded([&] { need(tb, "token bucket").tb.take(n); });
}

int lim_token_bucket_take_until(lim_token_bucket* tb, double n, int64_t deadline_ns, int* taken) {
    return guarded([&] {
        need(taken, "taken");
        *taken = need(tb, "token bucket").tb.take_until(n, tp(deadline_ns)) ? 1 : 0;
    });
}

int lim_token_bucket_tokens_may_be_available_when_at(const lim_token_bucket* tb, int64_t now_ns,
                                                     double n, lim_availability* out) {
    return guarded([&] {
        need(out, "out");
        fill_availability(need(tb, "token bucket").tb.tokens_may_be_available_when(tp(now_ns), n),
                          out);
    });
}

int lim_token_bucket_state_get_at(const lim_token_bucket* tb, int64_t now_ns,
                                  lim_limiter_state* out) {
    return guarded(
        [&] { fill_state(need(tb, "token bucket").tb.limiter(), tp(now_ns), &need(out, "out")); });
}

void lim_token_bucket_close(lim_token_bucket* tb) {
    delete tb;
}

int lim_throttle_open_at(lim_segment* segment, const char* key, int64_t max_concurrent_jobs,
                         int flags, int64_t now_ns, lim_throttle** out) {
    return guarded([&] {
        need(out, "out");
        const auto& seg = need(segment, "segment").seg;
        const char* k = need_str(key, "key");
        const lim::ThrottleOptions o{.max_concurrent_jobs = max_concurrent_jobs};
        auto t = adopt(flags) ? lim::Throttle::open(seg, k, o, lim::adopt_existing, tp(now_ns))
                              : lim::Throttle::open(seg, k, o, tp(now_ns));
        *out = new lim_throttle{std::move(t)};
    });
}

int lim_throttle_open(lim_segment* segment, const char* key, int64_t max_concurrent_jobs, int flags,
                      lim_throttle** out) {
    return lim_throttle_open_at(segment, key, max_concurrent_jobs, flags, lim_now_ns(), out);
}

int lim_throttled_rate_limiter_open_at(lim_segment* segment, const char* key,
                                       const lim_throttled_rate_limiter_options* options, int flags,
                                       int64_t now_ns, lim_throttled_rate_limiter** out) {
    return guarded([&] {
        need(out, "out");
        const auto& seg = need(segment, "segment").seg;
        const char* k = need_str(key, "key");
        const auto& oo = need(options, "options");
        const lim::ThrottledRateLimiterOptions o{
            .burst_size = oo.burst_size,
            .sustained_rate_per_sec = oo.sustained_rate_per_sec,
            .max_concurrent_jobs = oo.max_concurrent_jobs};
        auto t = adopt(flags)
                     ? lim::ThrottledRateLimiter::open(seg, k, o, lim::adopt_existing, tp(now_ns))
                     : lim::ThrottledRateLimiter::open(seg, k, o, tp(now_ns));
        *out = new lim_throttled_rate_limiter{std::move(t)};
    });
}

int lim_throttled_rate_limiter_open(lim_segment* segment, const char* key,
                                    const lim_throttled_rate_limiter_options* options, int flags,
                                    lim_throttled_rate_limiter** out) {
    return lim_throttled_rate_limiter_open_at(segment, key, options, flags, lim_now_ns(), out);
}

#define LIM_C_JOBS(prefix)                                                                       \
    int prefix##_try_start_job(prefix* t, lim_start_job* out) {                                  \
        /* The no-time overload: an infinite-rate Throttle then reads no clock at all. */        \
        return guarded([&] {                                                                     \
            need(out, "out");                                                                    \
            fill_start_job(need(t, "limiter").t.try_start_job(), out);                           \
        });                                                                                      \
    }                                                                                            \
    int prefix##_try_start_job_at(prefix* t, int64_t now_ns, lim_start_job* out) {               \
        return guarded([&] {                                                                     \
            need(out, "out");                                                                    \
            fill_start_job(need(t, "limiter").t.try_start_job(tp(now_ns)), out);                 \
        });                                                                                      \
    }                                                                                            \
    int prefix##_start_job_until(prefix* t, int64_t deadline_ns, int* started) {                 \
        return guarded([&] {                                                                     \
            need(started, "started");                                                            \
            *started = need(t, "limiter").t.start_job_until(tp(deadline_ns)) ? 1 : 0;            \
        });                                                                                      \
    }                                                                                            \
    int prefix##_hand_off_jobs(prefix* t, int64_t n, lim_hand_off* out) {                        \
        return guarded([&] {                                                                     \
            lim_hand_off& o = need(out, "out");                                                  \
            o = to_c(need(t, "limiter").t.hand_off_jobs(n));                                     \
        });                                                                                      \
    }                                                                                            \
    int prefix##_receive(prefix* t, const lim_hand_off* h, int* received) {                      \
        return guarded([&] {                                                                     \
            const lim::HandOff ticket = from_c(need(h, "hand_off"));                             \
            int& out = need(received, "received");                                               \
            out = need(t, "limiter").t.receive(ticket) ? 1 : 0;                                  \
        });                                                                                      \
    }                                                                                            \
    int prefix##_finish_job(prefix* t) {                                                         \
        return guarded([&] { need(t, "limiter").t.finish_job(); });                              \
    }                                                                                            \
    int prefix##_finish_job_at(prefix* t, int64_t now_ns) {                                      \
        return guarded([&] { need(t, "limiter").t.finish_job(tp(now_ns)); });                    \
    }                                                                                            \
    int prefix##_state_get_at(const prefix* t, int64_t now_ns, lim_limiter_state* out) {         \
        return guarded(                                                                          \
            [&] { fill_state(need(t, "limiter").t.limiter(), tp(now_ns), &need(out, "out")); }); \
    }                                                                                            \
    void prefix##_close(prefix* t) {                                                             \
        delete t;                                                                                \
    }

LIM_C_JOBS(lim_throttle)
LIM_C_JOBS(lim_throttled_rate_limiter)
#undef LIM_C_JOBS

// ---- Retry-After
// ---------------------------------------------------------------------------------

int lim_parse_retry_after(const char* value, int* found, int64_t* wait_ms) {
    return guarded(
        [&] { put_retry(lim::parse_retry_after(need_str(value, "value")), found, wait_ms); });
}

int lim_parse_retry_after_at(const char* value, int64_t now_unix_ns, int* found, int64_t* wait_ms) {
    return guarded([&] {
        put_retry(lim::parse_retry_after(need_str(value, "value"), unix_tp(now_unix_ns)), found,
                  wait_ms);
    });
}

int lim_parse_retry_after_headers(const char* const* names, const char* const* values, size_t count,
                                  int* found, int64_t* wait_ms) {
    return guarded([&] {
        std::vector<std::pair<std::string_view, std::string_view>> headers;
        headers.reserve(count);
        if (count > 0) {
            need(names, "names");
            need(values, "values");
        }
        for (size_t i = 0; i < count; ++i) {
            headers.emplace_back(need_str(names[i], "header name"),
                                 need_str(values[i], "header value"));
        }
        put_retry(lim::parse_retry_after(headers), found, wait_ms);
    });
}

}  // extern "C"
