/* lim/lim.h: lim's C ABI, a thin layer over the C++ API for other languages.
 *
 * C11 (and valid C++). Every object is an opaque handle created by a `lim_*_open`-style call and
 * freed by its `lim_*_close`. Every call that can fail returns an `int` status: 0 (LIM_OK) or a
 * `lim_errc` value, the same numbers as C++'s `lim::Errc`; no C++ exception ever crosses this
 * boundary. On failure, lim_last_error() gives a sentence naming what went wrong, for this thread.
 * Outputs are written through pointer arguments, and only on success. A NULL handle or output
 * pointer is LIM_INVALID_ARGUMENT, and the call then has taken, received or changed nothing.
 *
 * Time: `now` and `deadline` arguments are CLOCK_MONOTONIC nanoseconds (lim_now_ns()); durations
 * are nanoseconds. Every call whose outcome depends on time has an `_at` variant taking `now_ns`;
 * the variant without it reads the clock. Blocking calls come in a `_until` form taking an
 * absolute deadline; the acquires that queue (Semaphore, WeightedSemaphore, Dispatch) also come in
 * an `_until_interruptible` form that calls the caller back while it waits (to handle signals,
 * say) without losing its place, which slices of `_until` calls would. Token amounts are
 * doubles (resolution 1/10,000, rounded up); an infinite quantity (an infinite hopper or fill
 * rate) is the double INFINITY, in and out.
 *
 * Threads and fork(): handles may be used from any thread; closing one frees it, as free() does:
 * not while another thread is in a call on it (a blocked _until call included), and only once.
 * A handle inherited across fork() works in the child without reopening (its first use registers
 * the child's own process slot), as in C++; a lim_permit acquired by the parent stays the
 * parent's (releasing the child's copy does nothing).
 *
 * Memory ordering: as the C++ call each function wraps (see the C++ headers): a successful
 * acquire or take happens-after the release, return or refill that made room for it, in whichever
 * process it ran.
 *
 * Stability (docs/c-api.md): within one SONAME (liblim.so.MAJOR.MINOR) the functions, the struct
 * layouts and every numeric value in this header only ever grow: new functions and new enum
 * values are appended; a struct that must change gets a new name and new functions.
 */
#ifndef LIM_LIM_H
#define LIM_LIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Status codes: 0 or a lim::Errc value (stable numbers, never reused) ------------------ */
typedef enum lim_errc {
    LIM_OK = 0,
    LIM_INVALID_NAME = 1,      /* a segment name or key outside the alphabet or length */
    LIM_INVALID_ARGUMENT = 2,  /* an option or amount out of range, a NULL handle */
    LIM_NOT_FOUND = 3,         /* the segment (or record) does not exist */
    LIM_ALREADY_EXISTS = 4,    /* the object exists and a new one was asked for */
    LIM_CORRUPT_SEGMENT = 5,   /* the segment's header or tables fail validation */
    LIM_VERSION_MISMATCH = 6,  /* a segment of another layout version */
    LIM_CONFIG_MISMATCH = 7,   /* the key exists with another configuration */
    LIM_TABLE_FULL = 8,        /* no free record or process slot */
    LIM_PERMISSION_DENIED = 9, /* the caller may not open or change the segment */
    LIM_OVER_RELEASE = 10,     /* more returned or released than is held */
    LIM_SYSTEM_ERROR = 11,     /* an OS call failed, memory ran out, or an unexpected error */
    LIM_BUSY = 12              /* refused while other processes are attached (reset), or a
                                  segment lock stayed held by a stopped or slow neighbour */
} lim_errc;

/* The message of the last failed call on this thread ("" if none). Valid until the thread's next
 * failing lim_ call. Never fails. */
const char* lim_last_error(void);

/* A short stable name for a status ("ok", "invalid_name", ...; "unknown" otherwise). */
const char* lim_errc_name(int code);

/* The library's version, "MAJOR.MINOR.PATCH". */
const char* lim_version(void);

/* CLOCK_MONOTONIC now, in nanoseconds: the clock every deadline and `now` here is read on. */
int64_t lim_now_ns(void);

/* Flags for the open calls (0 or LIM_ADOPT_EXISTING; any other bit is LIM_INVALID_ARGUMENT). */
#define LIM_ADOPT_EXISTING 1 /* on a configuration mismatch, attach with the stored one */

/* ---- Segment --------------------------------------------------------------------------------- */
typedef struct lim_segment lim_segment;

typedef struct lim_segment_options {
    uint32_t max_limiters;  /* records; default 256 */
    uint32_t max_processes; /* process-table slots; default 1024 */
    uint32_t mode;          /* permission bits; default 0600 */
    int32_t reap_on_attach; /* nonzero: reap dead processes on attach; default 1 */
    int64_t reap_after_ns;  /* a blocking acquire reaps after waiting this long; default 1 s */
} lim_segment_options;

/* Fills `options` with the defaults. */
void lim_segment_options_init(lim_segment_options* options);

/* Attaches to segment `name`, creating it with `options` (NULL: defaults) if absent; safe to race.
 * Blocks only while another process initialises it. Errors as lim::Segment::open_or_create. */
int lim_segment_open_or_create(const char* name, const lim_segment_options* options,
                               lim_segment** out);
/* Attaches to an existing segment; LIM_NOT_FOUND if there is none. `options` (may be NULL) gives
 * this handle's reaping policy only. */
int lim_segment_open(const char* name, const lim_segment_options* options, lim_segment** out);
/* Unlinks the name; *removed = 0 if there was no such segment (`removed` may be NULL). */
int lim_segment_remove(const char* name, int* removed);
/* Frees the handle (the mapping stays while handles opened from it live). NULL is a no-op. */
void lim_segment_close(lim_segment* segment);

typedef struct lim_segment_info {
    char name[256];
    uint64_t size_bytes;
    uint32_t layout_version;
    uint32_t max_limiters;
    uint32_t max_processes;
    uint32_t limiters;  /* records in use */
    uint32_t processes; /* live processes with a slot */
    int64_t created_unix_ns;
} lim_segment_info;

int lim_segment_info_get(const lim_segment* segment, lim_segment_info* out);
/* *out = 1 when this handle's open_or_create created and initialised the segment. */
int lim_segment_is_creator(const lim_segment* segment, int* out);

/* What a reap found: one entry per dead process. Free with lim_reap_report_free. */
typedef struct lim_reap_report lim_reap_report;
typedef struct lim_returned_holding {
    const char* kind; /* "semaphore", "weighted_semaphore", "limiter", "dispatch" */
    const char* key;
    const char* layer; /* "units", "tokens", "slots", "throttled", "bytes" */
    double amount;
} lim_returned_holding; /* strings owned by the report */

/* Finds dead processes and gives back exactly what each held. Blocks while another reap or reset
 * runs. */
int lim_segment_reap(lim_segment* segment, lim_reap_report** out);
size_t lim_reap_report_count(const lim_reap_report* report);
int lim_reap_report_pid(const lim_reap_report* report, size_t i);
size_t lim_reap_report_returned_count(const lim_reap_report* report, size_t i);
/* Fills *out with holding j of process i; LIM_INVALID_ARGUMENT when out of range. */
int lim_reap_report_returned(const lim_reap_report* report, size_t i, size_t j,
                             lim_returned_holding* out);
size_t lim_reap_report_deferred_count(const lim_reap_report* report);
const char* lim_reap_report_deferred(const lim_reap_report* report, size_t i); /* NULL if >= n */
void lim_reap_report_free(lim_reap_report* report);

/* Re-initialises record `key` (NULL or "": every record). LIM_BUSY while other live processes are
 * attached unless `force`, and (even forced) for a record a live process stays in the middle of an
 * operation on for over a second: that record is left unchanged, the others reset (see
 * lim::Segment::reset); LIM_NOT_FOUND for an unknown key. */
int lim_segment_reset(lim_segment* segment, const char* key, int force);

/* ---- Semaphore and WeightedSemaphore ----------------------------------------------------------
 */
/* Counting semaphores in the segment. *acquired is 1 or 0. `_until` waits until the units are
 * free or the deadline passes (then holds nothing). lim_semaphore_acquire blocks with no limit.
 * The weighted one is FIFO among waiters, try_acquire fails while anyone is queued, and an amount
 * above the capacity is clamped to it. Release of more than held: LIM_OVER_RELEASE. */
/* A holding on its way from one process to another (lim/hand_off.hpp): plain bytes, to send by
 * any means (a pipe, a socket, shared memory) to a process attached to the same segment. The
 * _hand_off calls move `n` units (jobs for the job limiters) that this process holds into a
 * parcel owned by this process (LIM_OVER_RELEASE if it holds fewer; LIM_INVALID_ARGUMENT for 0);
 * they stay in use, and a reap gives them back if this process dies before they are received.
 * The _receive calls make a parcel's units the calling process's: *received is 1, or 0 if the
 * parcel is gone (received already, or its giver died); LIM_INVALID_ARGUMENT for a parcel of
 * another limiter. Both block only briefly, while a reap or reset runs. Units acquired by one
 * process are released by that process only (LIM_OVER_RELEASE otherwise): hand them off. */
typedef struct lim_hand_off {
    uint32_t slot;
    uint32_t record;
    uint64_t owner;
    int64_t amount;
    int32_t layer;
    uint32_t reserved;
} lim_hand_off;

typedef struct lim_semaphore lim_semaphore;
int lim_semaphore_open(lim_segment* segment, const char* key, uint64_t capacity, int flags,
                       lim_semaphore** out);
int lim_semaphore_try_acquire(lim_semaphore* sem, uint64_t n, int* acquired);
int lim_semaphore_acquire(lim_semaphore* sem, uint64_t n);
int lim_semaphore_acquire_until(lim_semaphore* sem, uint64_t n, int64_t deadline_ns, int* acquired);
int lim_semaphore_release(lim_semaphore* sem, uint64_t n);
int lim_semaphore_in_use(const lim_semaphore* sem, uint64_t* out);
int lim_semaphore_capacity(const lim_semaphore* sem, uint64_t* out);
int lim_semaphore_waiters(const lim_semaphore* sem, uint32_t* out);
int lim_semaphore_hand_off(lim_semaphore* sem, uint64_t n, lim_hand_off* out);
int lim_semaphore_receive(lim_semaphore* sem, const lim_hand_off* h, int* received);
void lim_semaphore_close(lim_semaphore* sem);

typedef struct lim_weighted_semaphore lim_weighted_semaphore;
int lim_weighted_semaphore_open(lim_segment* segment, const char* key, uint64_t capacity, int flags,
                                lim_weighted_semaphore** out);
int lim_weighted_semaphore_try_acquire(lim_weighted_semaphore* sem, uint64_t n, int* acquired);
int lim_weighted_semaphore_acquire(lim_weighted_semaphore* sem, uint64_t n);
int lim_weighted_semaphore_acquire_until(lim_weighted_semaphore* sem, uint64_t n,
                                         int64_t deadline_ns, int* acquired);
int lim_weighted_semaphore_release(lim_weighted_semaphore* sem, uint64_t n);
int lim_weighted_semaphore_in_use(const lim_weighted_semaphore* sem, uint64_t* out);
int lim_weighted_semaphore_capacity(const lim_weighted_semaphore* sem, uint64_t* out);
int lim_weighted_semaphore_waiters(const lim_weighted_semaphore* sem, uint32_t* out);
int lim_weighted_semaphore_hand_off(lim_weighted_semaphore* sem, uint64_t n, lim_hand_off* out);
int lim_weighted_semaphore_receive(lim_weighted_semaphore* sem, const lim_hand_off* h,
                                   int* received);
void lim_weighted_semaphore_close(lim_weighted_semaphore* sem);

/* ---- BackoffWindow ------------------------------------------------------------------------- */
typedef struct lim_backoff_window lim_backoff_window;
int lim_backoff_window_for_key(lim_segment* segment, const char* key, lim_backoff_window** out);
/* Moves the deadline to now + duration unless it is later already (a CAS max). */
int lim_backoff_window_set(lim_backoff_window* w, int64_t duration_ns);
int lim_backoff_window_set_at(lim_backoff_window* w, int64_t duration_ns, int64_t now_ns);
int lim_backoff_window_should_backoff(const lim_backoff_window* w, int* out);
int lim_backoff_window_should_backoff_at(const lim_backoff_window* w, int64_t now_ns, int* out);
int lim_backoff_window_remaining(const lim_backoff_window* w, int64_t* out_ns);
int lim_backoff_window_remaining_at(const lim_backoff_window* w, int64_t now_ns, int64_t* out_ns);
/* *has_deadline = 0 when none was set since creation or the last clear. */
int lim_backoff_window_until(const lim_backoff_window* w, int* has_deadline, int64_t* until_ns);
int lim_backoff_window_sets(const lim_backoff_window* w, uint64_t* out);
/* Sleeps until the backoff is over (*over = 1) or `deadline_ns` comes first (*over = 0). */
int lim_backoff_window_wait_until(const lim_backoff_window* w, int64_t deadline_ns, int* over);
int lim_backoff_window_clear(lim_backoff_window* w);
void lim_backoff_window_close(lim_backoff_window* w);

/* ---- Dispatch ---------------------------------------------------------------------------------
 */
typedef struct lim_dispatch lim_dispatch;
typedef struct lim_permit lim_permit;

typedef struct lim_dispatch_options {
    const lim_backoff_window* limiter; /* required; same segment */
    const char* key;                   /* default "default" */
    uint64_t concurrency;              /* default 400 */
    uint64_t throttled_concurrency;    /* default 10 */
    uint64_t byte_budget;              /* default 5,000,000 */
    int64_t backoff_window_ns;         /* default 10 s */
    uint64_t byte_penalty_multiplier;  /* default 20 */
    int64_t acquire_backoff_base_ns;   /* re-check pacing; default 2 ms */
    int64_t acquire_backoff_max_ns;    /* default 50 ms */
    double acquire_backoff_jitter;     /* default 0.25 */
} lim_dispatch_options;

typedef struct lim_dispatch_snapshot {
    int32_t backoff_active;
    int64_t backoff_remaining_ns;
    int64_t throttle_remaining_ns;
    uint64_t in_flight;
    uint64_t concurrency;
    uint64_t throttled_in_flight;
    uint64_t throttled_concurrency;
    uint64_t bytes_in_flight; /* as charged, penalty included */
    uint64_t byte_budget;
    uint32_t waiters;
    uint32_t concurrency_waiters;
    uint32_t throttled_waiters;
    uint32_t bytes_waiters;
} lim_dispatch_snapshot;

/* Fills `options` with the defaults (limiter NULL: the caller must set it). */
void lim_dispatch_options_init(lim_dispatch_options* options);
int lim_dispatch_open(lim_segment* segment, const lim_dispatch_options* options, int flags,
                      lim_dispatch** out);
/* The acquire calls fill `permit` (from lim_permit_create, holding nothing, else
 * LIM_INVALID_ARGUMENT): a concurrency slot, a throttled slot under backoff, and the bytes
 * (x penalty under backoff, clamped to the budget). try_ never sleeps; *acquired = 0 (holding
 * nothing) when a layer is full or anyone is queued for bytes. _until gives up at the deadline.
 * lim_dispatch_acquire blocks with no limit. */
int lim_dispatch_acquire(lim_dispatch* d, uint64_t bytes, lim_permit* permit);
int lim_dispatch_try_acquire(lim_dispatch* d, uint64_t bytes, lim_permit* permit, int* acquired);
int lim_dispatch_acquire_until(lim_dispatch* d, uint64_t bytes, int64_t deadline_ns,
                               lim_permit* permit, int* acquired);
/* Sets the shared backoff deadline to now + duration unless later already. Sleeps no one. */
int lim_dispatch_set_backoff(lim_dispatch* d, int64_t duration_ns);
int lim_dispatch_backoff_active(const lim_dispatch* d, int* out);
int lim_dispatch_snapshot_get(const lim_dispatch* d, lim_dispatch_snapshot* out);
void lim_dispatch_close(lim_dispatch* d);

/* A reusable holder for what one request holds. Never allocates after creation. A permit that
 * holds something keeps its Dispatch alive: lim_dispatch_close may come first. */
int lim_permit_create(lim_permit** out);
/* Gives back everything held (idempotent; never fails on a valid permit). */
int lim_permit_release(lim_permit* p);
int lim_permit_held(const lim_permit* p);       /* 1 or 0 */
uint64_t lim_permit_bytes(const lim_permit* p); /* bytes charged */
int lim_permit_throttled(const lim_permit* p);  /* 1 if it started under backoff */
void lim_permit_destroy(lim_permit* p);         /* releases, then frees; NULL is a no-op */

/* ---- Interruptible waits (Semaphore, WeightedSemaphore, Dispatch) -----------------------------
 */
/* A wait that keeps its place: waiting in slices of _until calls withdraws the registration at
 * each slice's end (a byte-budget request leaves the FIFO queue and joins it again at the back),
 * so these calls instead wait up to `deadline_ns` in one call (INT64_MAX: no deadline) and call
 * `should_stop(context)` on the calling thread while they wait: before the first sleep, then at
 * least every `check_interval_ns` (each sleep is cut short to keep to it), and at once when a
 * signal interrupts a sleep. It is never called when the units are free at once, nor inside the
 * library's critical steps: only where the waiter would sleep, holding nothing it is taking but
 * still registered. A nonzero return stops the wait: the call withdraws the registration exactly
 * once, gives back whatever it took (a Dispatch's slots), and sets *result = LIM_WAIT_STOPPED.
 * Otherwise *result is LIM_WAIT_ACQUIRED (the units, or the filled permit, are held) or
 * LIM_WAIT_TIMED_OUT (holding nothing). `should_stop` NULL: never stops (the _until call).
 * `should_stop` may call lim's non-blocking functions (try_acquire, release, snapshots) but must
 * not block in lim (the thread is registered as a waiter, and its process slot records one wait
 * at a time: a Semaphore, WeightedSemaphore or Dispatch acquire there that would have to wait
 * fails with LIM_INVALID_ARGUMENT before registering; a Limiter take is not caught), must not
 * longjmp out, and must return. If it forks, the call returns LIM_WAIT_STOPPED in the child
 * (holding nothing; the registration is the parent's, untouched). If the thread ends inside it
 * (pthread_exit), the unwind withdraws the registration and gives back what the call took.
 * `check_interval_ns` <= 0: LIM_INVALID_ARGUMENT (below 1 ms it is raised to 1 ms; INT64_MAX:
 * checked before the first sleep and on signals only). Thread-safety:
 * as the _until calls (any thread; the handle must stay open for the whole call). Memory ordering:
 * as the _until calls. */
typedef enum lim_wait_result {
    LIM_WAIT_TIMED_OUT = 0, /* the deadline passed; nothing held */
    LIM_WAIT_ACQUIRED = 1,  /* held */
    LIM_WAIT_STOPPED = 2    /* should_stop returned nonzero; nothing held, nothing queued */
} lim_wait_result;
typedef int (*lim_should_stop_fn)(void* context);

int lim_semaphore_acquire_until_interruptible(lim_semaphore* sem, uint64_t n, int64_t deadline_ns,
                                              lim_should_stop_fn should_stop, void* context,
                                              int64_t check_interval_ns, int* result);
int lim_weighted_semaphore_acquire_until_interruptible(lim_weighted_semaphore* sem, uint64_t n,
                                                       int64_t deadline_ns,
                                                       lim_should_stop_fn should_stop,
                                                       void* context, int64_t check_interval_ns,
                                                       int* result);
/* `permit` as for lim_dispatch_acquire_until: from lim_permit_create, holding nothing. */
int lim_dispatch_acquire_until_interruptible(lim_dispatch* d, uint64_t bytes, int64_t deadline_ns,
                                             lim_permit* permit, lim_should_stop_fn should_stop,
                                             void* context, int64_t check_interval_ns, int* result);

/* ---- Limiter family (Jane Street's token bucket + hopper) ------------------------------------ */
typedef enum lim_try_take {
    LIM_TRY_TAKE_TAKEN = 0,
    LIM_TRY_TAKE_UNABLE = 1,
    LIM_TRY_TAKE_ASKED_FOR_MORE_THAN_BUCKET_SIZE = 2
} lim_try_take;

typedef enum lim_availability_kind {
    LIM_AVAILABLE_AT = 0, /* time_ns: the earliest time (a lower bound) */
    LIM_AVAILABLE_NEVER_BECAUSE_GREATER_THAN_BUCKET_SIZE = 1,
    LIM_AVAILABLE_WHEN_RETURN_TO_HOPPER_IS_CALLED = 2
} lim_availability_kind;
typedef struct lim_availability {
    int32_t kind; /* lim_availability_kind */
    int64_t time_ns;
} lim_availability;

typedef enum lim_start_job_kind {
    LIM_START_JOB_START = 0,
    LIM_START_JOB_MAX_CONCURRENT_JOBS_RUNNING = 1,
    LIM_START_JOB_UNABLE_UNTIL_AT_LEAST = 2 /* time_ns: not before then */
} lim_start_job_kind;
typedef struct lim_start_job {
    int32_t kind; /* lim_start_job_kind */
    int64_t time_ns;
} lim_start_job;

/* Every read of a limiter at one `now` (INFINITY where infinite). */
typedef struct lim_limiter_state {
    double bucket_size;
    double in_bucket;
    double in_hopper;
    double in_flight;
    double in_limiter;
    double in_system;
    double hopper_to_bucket_rate_per_sec;
    double token_target_level;
    uint32_t waiters;
} lim_limiter_state;

typedef struct lim_limiter_config {
    double hopper_to_bucket_rate_per_sec; /* INFINITY allowed */
    double bucket_size;
    double initial_bucket_level;
    double initial_hopper_level; /* INFINITY allowed */
} lim_limiter_config;

typedef struct lim_token_bucket_options {
    double burst_size;
    double sustained_rate_per_sec;
    double initial_bucket_level;
} lim_token_bucket_options;

typedef struct lim_throttled_rate_limiter_options {
    double burst_size;
    double sustained_rate_per_sec;
    int64_t max_concurrent_jobs;
} lim_throttled_rate_limiter_options;

/* Limiter: the general form and its expert calls. `open` counts the fill from now (`_at`: from
 * now_ns). try_take's *result is a lim_try_take. take blocks with no limit; take_until returns
 * *taken = 0 at the deadline (holding nothing). return_to_hopper of more than in flight:
 * LIM_OVER_RELEASE. invariant: LIM_CORRUPT_SEGMENT (or another code) when inconsistent. */
typedef struct lim_limiter lim_limiter;
int lim_limiter_open(lim_segment* segment, const char* key, const lim_limiter_config* config,
                     int flags, lim_limiter** out);
int lim_limiter_open_at(lim_segment* segment, const char* key, const lim_limiter_config* config,
                        int flags, int64_t now_ns, lim_limiter** out);
int lim_limiter_try_take(lim_limiter* l, double n, int* result);
int lim_limiter_try_take_at(lim_limiter* l, int64_t now_ns, double n, int* result);
int lim_limiter_take(lim_limiter* l, double n);
int lim_limiter_take_until(lim_limiter* l, double n, int64_t deadline_ns, int* taken);
int lim_limiter_return_to_hopper(lim_limiter* l, double n);
int lim_limiter_return_to_hopper_at(lim_limiter* l, int64_t now_ns, double n);
int lim_limiter_tokens_may_be_available_when(const lim_limiter* l, double n, lim_availability* out);
int lim_limiter_tokens_may_be_available_when_at(const lim_limiter* l, int64_t now_ns, double n,
                                                lim_availability* out);
int lim_limiter_set_token_target_level(lim_limiter* l, double level);
int lim_limiter_set_token_target_level_at(lim_limiter* l, int64_t now_ns, double level);
int lim_limiter_set_bucket_size(lim_limiter* l, double size);
int lim_limiter_set_bucket_size_at(lim_limiter* l, int64_t now_ns, double size);
int lim_limiter_set_hopper_to_bucket_rate_per_sec(lim_limiter* l, double rate);
int lim_limiter_set_hopper_to_bucket_rate_per_sec_at(lim_limiter* l, int64_t now_ns, double rate);
int lim_limiter_state_get(const lim_limiter* l, lim_limiter_state* out);
int lim_limiter_state_get_at(const lim_limiter* l, int64_t now_ns, lim_limiter_state* out);
int lim_limiter_invariant(const lim_limiter* l);
void lim_limiter_close(lim_limiter* l);

/* TokenBucket: infinite hopper, finite rate. */
typedef struct lim_token_bucket lim_token_bucket;
int lim_token_bucket_open(lim_segment* segment, const char* key,
                          const lim_token_bucket_options* options, int flags,
                          lim_token_bucket** out);
int lim_token_bucket_open_at(lim_segment* segment, const char* key,
                             const lim_token_bucket_options* options, int flags, int64_t now_ns,
                             lim_token_bucket** out);
int lim_token_bucket_try_take(lim_token_bucket* tb, double n, int* result);
int lim_token_bucket_try_take_at(lim_token_bucket* tb, int64_t now_ns, double n, int* result);
int lim_token_bucket_take(lim_token_bucket* tb, double n);
int lim_token_bucket_take_until(lim_token_bucket* tb, double n, int64_t deadline_ns, int* taken);
int lim_token_bucket_tokens_may_be_available_when_at(const lim_token_bucket* tb, int64_t now_ns,
                                                     double n, lim_availability* out);
int lim_token_bucket_state_get_at(const lim_token_bucket* tb, int64_t now_ns,
                                  lim_limiter_state* out);
void lim_token_bucket_close(lim_token_bucket* tb);

/* Throttle (a counting semaphore of jobs) and ThrottledRateLimiter (both at once). try_start_job
 * fills a lim_start_job; finish_job returns one token to the hopper. */
typedef struct lim_throttle lim_throttle;
int lim_throttle_open(lim_segment* segment, const char* key, int64_t max_concurrent_jobs, int flags,
                      lim_throttle** out);
int lim_throttle_open_at(lim_segment* segment, const char* key, int64_t max_concurrent_jobs,
                         int flags, int64_t now_ns, lim_throttle** out);
int lim_throttle_try_start_job(lim_throttle* t, lim_start_job* out);
int lim_throttle_try_start_job_at(lim_throttle* t, int64_t now_ns, lim_start_job* out);
int lim_throttle_start_job_until(lim_throttle* t, int64_t deadline_ns, int* started);
int lim_throttle_finish_job(lim_throttle* t);
int lim_throttle_finish_job_at(lim_throttle* t, int64_t now_ns);
int lim_throttle_state_get_at(const lim_throttle* t, int64_t now_ns, lim_limiter_state* out);
int lim_throttle_hand_off_jobs(lim_throttle* t, int64_t n, lim_hand_off* out);
int lim_throttle_receive(lim_throttle* t, const lim_hand_off* h, int* received);
void lim_throttle_close(lim_throttle* t);

typedef struct lim_throttled_rate_limiter lim_throttled_rate_limiter;
int lim_throttled_rate_limiter_open(lim_segment* segment, const char* key,
                                    const lim_throttled_rate_limiter_options* options, int flags,
                                    lim_throttled_rate_limiter** out);
int lim_throttled_rate_limiter_open_at(lim_segment* segment, const char* key,
                                       const lim_throttled_rate_limiter_options* options, int flags,
                                       int64_t now_ns, lim_throttled_rate_limiter** out);
int lim_throttled_rate_limiter_try_start_job(lim_throttled_rate_limiter* t, lim_start_job* out);
int lim_throttled_rate_limiter_try_start_job_at(lim_throttled_rate_limiter* t, int64_t now_ns,
                                                lim_start_job* out);
int lim_throttled_rate_limiter_start_job_until(lim_throttled_rate_limiter* t, int64_t deadline_ns,
                                               int* started);
int lim_throttled_rate_limiter_finish_job(lim_throttled_rate_limiter* t);
int lim_throttled_rate_limiter_finish_job_at(lim_throttled_rate_limiter* t, int64_t now_ns);
int lim_throttled_rate_limiter_state_get_at(const lim_throttled_rate_limiter* t, int64_t now_ns,
                                            lim_limiter_state* out);
int lim_throttled_rate_limiter_hand_off_jobs(lim_throttled_rate_limiter* t, int64_t n,
                                             lim_hand_off* out);
int lim_throttled_rate_limiter_receive(lim_throttled_rate_limiter* t, const lim_hand_off* h,
                                       int* received);
void lim_throttled_rate_limiter_close(lim_throttled_rate_limiter* t);

/* ---- Retry-After ---------------------------------------------------------------------------- */
/* Parses one Retry-After value (delta-seconds or an HTTP-date). *found = 0 for garbage, a negative
 * number or an empty value; else *wait_ms is the wait (0 for a date in the past). `_at` takes the
 * wall-clock now as Unix nanoseconds. */
int lim_parse_retry_after(const char* value, int* found, int64_t* wait_ms);
int lim_parse_retry_after_at(const char* value, int64_t now_unix_ns, int* found, int64_t* wait_ms);
/* Over `count` header (name, value) pairs: retry-after-ms first, then retry-after, names matched
 * ignoring case. */
int lim_parse_retry_after_headers(const char* const* names, const char* const* values, size_t count,
                                  int* found, int64_t* wait_ms);

#ifdef __cplusplus
}
#endif

#endif /* LIM_LIM_H */
