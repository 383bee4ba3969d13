/* tests/c_api/c_api_test.c: lim.h from C: every family, the error path, explicit now, deadlines,
 * and a handle inherited across fork(). Exits nonzero on the first failed check. */
#define _POSIX_C_SOURCE 200809L /* sigaction, kill, nanosleep */
#include <lim/lim.h>

#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int failures = 0;
#define CHECK(cond)                                                                           \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__, __LINE__, \
                    #cond, lim_last_error());                                                 \
            failures++;                                                                       \
        }                                                                                     \
    } while (0)
#define OK(call) CHECK((call) == LIM_OK)

static const int64_t kSec = 1000000000LL;
static pid_t forked_child = 0; /* exited after releasing what it took */

static void test_errors(void) {
    lim_segment* seg = NULL;
    CHECK(lim_segment_open_or_create("bad/name", NULL, &seg) == LIM_INVALID_NAME);
    CHECK(seg == NULL);
    CHECK(strstr(lim_last_error(), "bad/name") != NULL);
    CHECK(lim_segment_open("c-api-test-absent", NULL, &seg) == LIM_NOT_FOUND);
    CHECK(lim_semaphore_release(NULL, 1) == LIM_INVALID_ARGUMENT);
    CHECK(strcmp(lim_errc_name(LIM_TABLE_FULL), "table_full") == 0);
    CHECK(strcmp(lim_errc_name(0), "ok") == 0);
    CHECK(strcmp(lim_errc_name(99), "unknown") == 0);
    CHECK(strlen(lim_version()) >= 5);
}

static void test_semaphore(lim_segment* seg) {
    lim_semaphore* sem = NULL;
    int ok = 0;
    uint64_t v = 0;
    OK(lim_semaphore_open(seg, "db", 2, 0, &sem));
    OK(lim_semaphore_try_acquire(sem, 2, &ok));
    CHECK(ok == 1);
    OK(lim_semaphore_try_acquire(sem, 1, &ok));
    CHECK(ok == 0);
    OK(lim_semaphore_acquire_until(sem, 1, lim_now_ns() + kSec / 100, &ok));
    CHECK(ok == 0);
    OK(lim_semaphore_in_use(sem, &v));
    CHECK(v == 2);
    OK(lim_semaphore_release(sem, 2));
    CHECK(lim_semaphore_release(sem, 1) == LIM_OVER_RELEASE);
    OK(lim_semaphore_capacity(sem, &v));
    CHECK(v == 2);

    /* Another capacity for the same key: a mismatch, unless adopted. */
    lim_semaphore* other = NULL;
    CHECK(lim_semaphore_open(seg, "db", 3, 0, &other) == LIM_CONFIG_MISMATCH);
    /* An unknown flag is refused, not ignored (a later flag must not be lost on an older lib). */
    CHECK(lim_semaphore_open(seg, "db", 2, 2, &other) == LIM_INVALID_ARGUMENT);
    CHECK(strstr(lim_last_error(), "flags") != NULL);
    CHECK(lim_semaphore_open(seg, "db", 2, LIM_ADOPT_EXISTING | 64, &other) ==
          LIM_INVALID_ARGUMENT);
    OK(lim_semaphore_open(seg, "db", 3, LIM_ADOPT_EXISTING, &other));
    OK(lim_semaphore_capacity(other, &v));
    CHECK(v == 2);
    lim_semaphore_close(other);

    /* A forked child uses the inherited handle; what it holds is its own. */
    /* The parent hands one unit to the child (the struct travels as plain bytes; here, in the
     * memory fork() copies); the child receives it once and releases it as its own. */
    OK(lim_semaphore_acquire(sem, 1));
    lim_hand_off parcel;
    memset(&parcel, 0, sizeof parcel);
    CHECK(lim_semaphore_hand_off(sem, 2, &parcel) == LIM_OVER_RELEASE);
    OK(lim_semaphore_hand_off(sem, 1, &parcel));
    pid_t pid = fork();
    if (pid == 0) {
        int got = 0, received = 0, again = 1;
        uint64_t used = 0;
        int rc = lim_semaphore_try_acquire(sem, 1, &got);
        rc |= lim_semaphore_in_use(sem, &used);
        rc |= lim_semaphore_release(sem, 1);
        rc |= lim_semaphore_receive(sem, &parcel, &received);
        rc |= lim_semaphore_receive(sem, &parcel, &again);
        rc |= lim_semaphore_release(sem, 1);
        _exit(rc == 0 && got == 1 && used == 2 && received == 1 && again == 0 ? 0 : 1);
    }
    forked_child = pid;
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    OK(lim_semaphore_in_use(sem, &v));
    CHECK(v == 0);
    CHECK(lim_semaphore_release(sem, 1) == LIM_OVER_RELEASE); /* handed off: not the parent's */
    lim_semaphore_close(sem);

    lim_weighted_semaphore* ws = NULL;
    OK(lim_weighted_semaphore_open(seg, "bytes", 100, 0, &ws));
    OK(lim_weighted_semaphore_try_acquire(ws, 1000, &ok)); /* clamped to the capacity */
    CHECK(ok == 1);
    OK(lim_weighted_semaphore_in_use(ws, &v));
    CHECK(v == 100);
    OK(lim_weighted_semaphore_release(ws, 1000));
    OK(lim_weighted_semaphore_in_use(ws, &v));
    CHECK(v == 0);
    lim_weighted_semaphore_close(ws);
}

static void test_dispatch(lim_segment* seg) {
    lim_backoff_window* w = NULL;
    OK(lim_backoff_window_for_key(seg, "api", &w));
    lim_dispatch_options o;
    lim_dispatch_options_init(&o);
    o.limiter = w;
    o.key = "api";
    o.concurrency = 2;
    o.throttled_concurrency = 1;
    o.byte_budget = 1000;
    lim_dispatch* d = NULL;
    OK(lim_dispatch_open(seg, &o, 0, &d));
    lim_permit* a = NULL;
    lim_permit* b = NULL;
    lim_permit* c = NULL;
    OK(lim_permit_create(&a));
    OK(lim_permit_create(&b));
    OK(lim_permit_create(&c));
    int ok = 0;
    OK(lim_dispatch_try_acquire(d, 300, a, &ok));
    CHECK(ok == 1 && lim_permit_held(a) && lim_permit_bytes(a) == 300);
    CHECK(lim_dispatch_try_acquire(d, 1, a, &ok) == LIM_INVALID_ARGUMENT); /* a holds one */
    OK(lim_dispatch_acquire(d, 200, b));
    OK(lim_dispatch_acquire_until(d, 1, lim_now_ns() + kSec / 100, c, &ok));
    CHECK(ok == 0 && !lim_permit_held(c));
    lim_dispatch_snapshot s;
    OK(lim_dispatch_snapshot_get(d, &s));
    CHECK(s.in_flight == 2 && s.concurrency == 2 && s.bytes_in_flight == 500 &&
          s.byte_budget == 1000 && !s.backoff_active);
    OK(lim_permit_release(a));
    OK(lim_permit_release(a)); /* idempotent */
    lim_permit_destroy(b);     /* releases */
    OK(lim_dispatch_set_backoff(d, kSec));
    OK(lim_dispatch_backoff_active(d, &ok));
    CHECK(ok == 1);
    OK(lim_dispatch_try_acquire(d, 10, a, &ok)); /* throttled, x20 bytes */
    CHECK(ok == 1 && lim_permit_throttled(a) && lim_permit_bytes(a) == 200);
    OK(lim_dispatch_snapshot_get(d, &s));
    CHECK(s.in_flight == 1 && s.throttled_in_flight == 1 && s.bytes_in_flight == 200 &&
          s.backoff_active && s.backoff_remaining_ns > 0);
    OK(lim_permit_release(a));
    lim_permit_destroy(c);
    int has = 0;
    int64_t until = 0;
    OK(lim_backoff_window_until(w, &has, &until));
    CHECK(has == 1 && until > lim_now_ns());
    OK(lim_backoff_window_clear(w));
    OK(lim_backoff_window_should_backoff(w, &ok));
    CHECK(ok == 0);
    OK(lim_backoff_window_set_at(w, kSec, 5 * kSec));
    OK(lim_backoff_window_should_backoff_at(w, 5 * kSec + 1, &ok));
    CHECK(ok == 1);
    int64_t rem = 0;
    OK(lim_backoff_window_remaining_at(w, 5 * kSec + kSec / 2, &rem));
    CHECK(rem == kSec / 2);
    OK(lim_backoff_window_wait_until(w, lim_now_ns(), &ok)); /* deadline long past: over */
    CHECK(ok == 1);
    uint64_t sets = 0;
    OK(lim_backoff_window_sets(w, &sets));
    CHECK(sets >= 2);
    /* A permit keeps its Dispatch alive: closing the handle first is allowed. */
    OK(lim_dispatch_acquire(d, 7, a));
    lim_dispatch_close(d);
    CHECK(lim_permit_held(a) && lim_permit_bytes(a) == 7);
    OK(lim_permit_release(a));
    lim_permit_destroy(a);
    lim_backoff_window_close(w);
}

static void test_limiters(lim_segment* seg) {
    const int64_t t0 = 1000 * kSec;
    lim_token_bucket_options tbo = {
        .burst_size = 2, .sustained_rate_per_sec = 1, .initial_bucket_level = 2};
    lim_token_bucket* tb = NULL;
    int r = -1;
    OK(lim_token_bucket_open_at(seg, "emails", &tbo, 0, t0, &tb));
    OK(lim_token_bucket_try_take_at(tb, t0, 2, &r));
    CHECK(r == LIM_TRY_TAKE_TAKEN);
    OK(lim_token_bucket_try_take_at(tb, t0, 1, &r));
    CHECK(r == LIM_TRY_TAKE_UNABLE);
    OK(lim_token_bucket_try_take_at(tb, t0, 3, &r));
    CHECK(r == LIM_TRY_TAKE_ASKED_FOR_MORE_THAN_BUCKET_SIZE);
    lim_availability av;
    OK(lim_token_bucket_tokens_may_be_available_when_at(tb, t0, 1, &av));
    CHECK(av.kind == LIM_AVAILABLE_AT && av.time_ns == t0 + kSec);
    OK(lim_token_bucket_try_take_at(tb, t0 + kSec, 1, &r));
    CHECK(r == LIM_TRY_TAKE_TAKEN);
    lim_limiter_state st;
    OK(lim_token_bucket_state_get_at(tb, t0 + kSec, &st));
    CHECK(st.bucket_size == 2 && st.in_bucket == 0 && isinf(st.in_hopper) &&
          st.hopper_to_bucket_rate_per_sec == 1);
    lim_token_bucket_close(tb);

    lim_throttle* th = NULL;
    lim_start_job sj;
    OK(lim_throttle_open(seg, "jobs", 1, 0, &th));
    OK(lim_throttle_try_start_job(th, &sj));
    CHECK(sj.kind == LIM_START_JOB_START);
    OK(lim_throttle_try_start_job(th, &sj));
    CHECK(sj.kind == LIM_START_JOB_MAX_CONCURRENT_JOBS_RUNNING);
    int started = 0;
    OK(lim_throttle_start_job_until(th, lim_now_ns() + kSec / 100, &started));
    CHECK(started == 0);
    /* A running job handed off and received (here by this process itself) is finished once. */
    lim_hand_off job;
    int received = 0;
    CHECK(lim_throttle_hand_off_jobs(th, 0, &job) == LIM_INVALID_ARGUMENT);
    CHECK(lim_throttle_hand_off_jobs(th, 2, &job) == LIM_OVER_RELEASE);
    OK(lim_throttle_hand_off_jobs(th, 1, &job));
    CHECK(lim_throttle_finish_job(th) == LIM_OVER_RELEASE); /* in the parcel: no one's yet */
    OK(lim_throttle_receive(th, &job, &received));
    CHECK(received == 1);
    OK(lim_throttle_receive(th, &job, &received));
    CHECK(received == 0);
    OK(lim_throttle_finish_job(th));
    lim_throttle_close(th);

    lim_throttled_rate_limiter_options tro = {
        .burst_size = 1, .sustained_rate_per_sec = 1, .max_concurrent_jobs = 2};
    lim_throttled_rate_limiter* trl = NULL;
    OK(lim_throttled_rate_limiter_open_at(seg, "trl", &tro, 0, t0, &trl));
    OK(lim_throttled_rate_limiter_try_start_job_at(trl, t0, &sj));
    CHECK(sj.kind == LIM_START_JOB_START);
    OK(lim_throttled_rate_limiter_try_start_job_at(trl, t0, &sj));
    CHECK(sj.kind == LIM_START_JOB_UNABLE_UNTIL_AT_LEAST && sj.time_ns == t0 + kSec);
    OK(lim_throttled_rate_limiter_finish_job_at(trl, t0));
    lim_throttled_rate_limiter_close(trl);

    lim_limiter_config lc = {.hopper_to_bucket_rate_per_sec = INFINITY,
                             .bucket_size = 10,
                             .initial_bucket_level = 0,
                             .initial_hopper_level = 4};
    lim_limiter* l = NULL;
    OK(lim_limiter_open_at(seg, "raw", &lc, 0, t0, &l));
    OK(lim_limiter_try_take_at(l, t0, 4, &r));
    CHECK(r == LIM_TRY_TAKE_TAKEN);
    OK(lim_limiter_tokens_may_be_available_when_at(l, t0, 1, &av));
    CHECK(av.kind == LIM_AVAILABLE_WHEN_RETURN_TO_HOPPER_IS_CALLED);
    CHECK(lim_limiter_return_to_hopper_at(l, t0, 5) == LIM_OVER_RELEASE);
    OK(lim_limiter_return_to_hopper_at(l, t0, 4));
    OK(lim_limiter_set_token_target_level_at(l, t0, 6));
    OK(lim_limiter_state_get_at(l, t0, &st));
    CHECK(st.in_system == 6 && st.token_target_level == 6 && st.in_flight == 0);
    OK(lim_limiter_set_bucket_size_at(l, t0, 3));
    OK(lim_limiter_set_hopper_to_bucket_rate_per_sec_at(l, t0, 2));
    OK(lim_limiter_state_get_at(l, t0, &st));
    CHECK(st.bucket_size == 3 && st.hopper_to_bucket_rate_per_sec == 2);
    OK(lim_limiter_invariant(l));
    lim_limiter_close(l);
}

static void test_retry_after(void) {
    int found = 0;
    int64_t ms = 0;
    OK(lim_parse_retry_after("120", &found, &ms));
    CHECK(found == 1 && ms == 120000);
    OK(lim_parse_retry_after("soon", &found, &ms));
    CHECK(found == 0);
    /* 1994-11-06 08:49:37 UTC is 784111777 s after the epoch. */
    OK(lim_parse_retry_after_at("Sun, 06 Nov 1994 08:49:37 GMT", 784111767LL * kSec, &found, &ms));
    CHECK(found == 1 && ms == 10000);
    const char* names[] = {"Retry-After", "retry-after-MS"};
    const char* values[] = {"5", " 250 "};
    OK(lim_parse_retry_after_headers(names, values, 2, &found, &ms));
    CHECK(found == 1 && ms == 250);
}

/* A NULL output pointer is LIM_INVALID_ARGUMENT, and the call must then have done nothing: a
 * try_acquire/try_take/try_start_job/receive that took its units before finding no place to say
 * so would leave them taken with the caller told it failed. */
static void test_null_output_takes_nothing(lim_segment* seg) {
    lim_semaphore* sem = NULL;
    OK(lim_semaphore_open(seg, "null-out", 2, 0, &sem));
    uint64_t v = 99;
    CHECK(lim_semaphore_try_acquire(sem, 1, NULL) == LIM_INVALID_ARGUMENT);
    OK(lim_semaphore_in_use(sem, &v));
    CHECK(v == 0);
    lim_weighted_semaphore* ws = NULL;
    OK(lim_weighted_semaphore_open(seg, "null-out-bytes", 100, 0, &ws));
    CHECK(lim_weighted_semaphore_try_acquire(ws, 10, NULL) == LIM_INVALID_ARGUMENT);
    OK(lim_weighted_semaphore_in_use(ws, &v));
    CHECK(v == 0);
    /* receive with no `received`: the parcel stays there for a receive that can say so. */
    int ok = 0;
    OK(lim_semaphore_try_acquire(sem, 1, &ok));
    lim_hand_off parcel;
    OK(lim_semaphore_hand_off(sem, 1, &parcel));
    CHECK(lim_semaphore_receive(sem, &parcel, NULL) == LIM_INVALID_ARGUMENT);
    ok = 0;
    OK(lim_semaphore_receive(sem, &parcel, &ok));
    CHECK(ok == 1);
    OK(lim_semaphore_release(sem, 1));
    lim_limiter_config c = {.hopper_to_bucket_rate_per_sec = INFINITY,
                            .bucket_size = 5,
                            .initial_bucket_level = 5,
                            .initial_hopper_level = 0};
    lim_limiter* l = NULL;
    OK(lim_limiter_open_at(seg, "null-out-limiter", &c, 0, lim_now_ns(), &l));
    CHECK(lim_limiter_try_take(l, 1, NULL) == LIM_INVALID_ARGUMENT);
    CHECK(lim_limiter_try_take_at(l, lim_now_ns(), 1, NULL) == LIM_INVALID_ARGUMENT);
    lim_limiter_state st;
    OK(lim_limiter_state_get_at(l, lim_now_ns(), &st));
    CHECK(st.in_flight == 0 && st.in_bucket == 5);
    lim_token_bucket_options tbo = {
        .burst_size = 3, .sustained_rate_per_sec = 0.001, .initial_bucket_level = 3};
    lim_token_bucket* tb = NULL;
    OK(lim_token_bucket_open_at(seg, "null-out-bucket", &tbo, 0, lim_now_ns(), &tb));
    CHECK(lim_token_bucket_try_take(tb, 1, NULL) == LIM_INVALID_ARGUMENT);
    CHECK(lim_token_bucket_try_take_at(tb, lim_now_ns(), 1, NULL) == LIM_INVALID_ARGUMENT);
    OK(lim_token_bucket_state_get_at(tb, lim_now_ns(), &st));
    CHECK(st.in_bucket >= 3);
    lim_throttle* th = NULL;
    OK(lim_throttle_open_at(seg, "null-out-jobs", 1, 0, lim_now_ns(), &th));
    lim_start_job sj;
    OK(lim_throttle_try_start_job(th, &sj));
    CHECK(sj.kind == LIM_START_JOB_START);
    OK(lim_throttle_hand_off_jobs(th, 1, &parcel));
    CHECK(lim_throttle_receive(th, &parcel, NULL) == LIM_INVALID_ARGUMENT);
    ok = 0;
    OK(lim_throttle_receive(th, &parcel, &ok));
    CHECK(ok == 1);
    OK(lim_throttle_finish_job(th));
    lim_throttle_close(th);
    lim_token_bucket_close(tb);
    lim_limiter_close(l);
    lim_weighted_semaphore_close(ws);
    lim_semaphore_close(sem);
}

/* `now` is the caller's: the ends of int64 give sane answers (no wrapped sum; the UBSan build
 * reports any signed overflow). */
static void test_extreme_now(lim_segment* seg) {
    const int64_t lo = INT64_MIN, hi = INT64_MAX;
    lim_backoff_window* w = NULL;
    OK(lim_backoff_window_for_key(seg, "extreme-now", &w));
    OK(lim_backoff_window_set(w, 60 * kSec));
    int64_t left = -1;
    OK(lim_backoff_window_remaining_at(w, lo, &left));
    CHECK(left > 0); /* a deadline after `now`, however far: never negative */
    OK(lim_backoff_window_remaining_at(w, hi, &left));
    CHECK(left == 0);
    int on = -1;
    OK(lim_backoff_window_should_backoff_at(w, lo, &on));
    CHECK(on == 1);
    OK(lim_backoff_window_should_backoff_at(w, hi, &on));
    CHECK(on == 0);
    OK(lim_backoff_window_set_at(w, hi, hi));
    OK(lim_backoff_window_remaining_at(w, lo, &left));
    CHECK(left > 0);
    OK(lim_backoff_window_clear(w));
    lim_backoff_window_close(w);
    lim_token_bucket_options tbo = {
        .burst_size = 2, .sustained_rate_per_sec = 1, .initial_bucket_level = 2};
    lim_token_bucket* tb = NULL;
    OK(lim_token_bucket_open_at(seg, "extreme-now-bucket", &tbo, 0, lim_now_ns(), &tb));
    int result = -1;
    OK(lim_token_bucket_try_take_at(tb, lo, 1, &result));
    CHECK(result == LIM_TRY_TAKE_TAKEN);
    OK(lim_token_bucket_try_take_at(tb, hi, 1, &result));
    CHECK(result == LIM_TRY_TAKE_TAKEN);
    lim_availability a;
    OK(lim_token_bucket_tokens_may_be_available_when_at(tb, hi, 2, &a));
    OK(lim_token_bucket_tokens_may_be_available_when_at(tb, lo, 2, &a));
    lim_limiter_state st;
    OK(lim_token_bucket_state_get_at(tb, lo, &st));
    CHECK(st.in_bucket >= 0 && st.in_bucket <= 2);
    lim_token_bucket_close(tb);
    lim_throttle* th = NULL;
    OK(lim_throttle_open_at(seg, "extreme-now-jobs", 1, 0, lim_now_ns(), &th));
    lim_start_job sj;
    OK(lim_throttle_try_start_job_at(th, lo, &sj));
    CHECK(sj.kind == LIM_START_JOB_START);
    OK(lim_throttle_finish_job_at(th, hi));
    lim_throttle_close(th);
}

/* ---- The _interruptible waits ------------------------------------------------------------- */
/* What a should_stop callback sees: how often it ran, and the waiters count each time (the
 * waiter must stay registered through every check: it never leaves and rejoins the queue). */
struct watch {
    int kind; /* 0 semaphore, 1 weighted semaphore, 2 dispatch (its bytes waiters) */
    void* h;
    int calls;
    int stop_at;      /* stop on this call (0: never) */
    int release_at;   /* on this call, give back what `release` names (0: never) */
    uint64_t release; /* units to give back (kinds 0 and 1), or a lim_permit* (kind 2) */
    lim_permit* permit;
    uint32_t min_waiters, max_waiters;
    volatile sig_atomic_t* flag; /* stop when set (a signal handler sets it) */
    int fork_at;                 /* on this call, fork; the parent waits for the child */
    int in_child;                /* set in the child */
    int child_status;
    lim_semaphore* nested; /* when set, each check makes a blocking acquire on it (refused) */
    int nested_refused;    /* checks whose nested acquire failed with LIM_INVALID_ARGUMENT */
};

static uint32_t watched_waiters(const struct watch* w) {
    uint32_t n = 0;
    if (w->kind == 0) {
        OK(lim_semaphore_waiters(w->h, &n));
    } else if (w->kind == 1) {
        OK(lim_weighted_semaphore_waiters(w->h, &n));
    } else {
        lim_dispatch_snapshot s;
        OK(lim_dispatch_snapshot_get(w->h, &s));
        n = s.waiters;
    }
    return n;
}

static int watch_check(void* context) {
    struct watch* w = context;
    w->calls++;
    const uint32_t n = watched_waiters(w);
    if (w->calls == 1 || n < w->min_waiters) w->min_waiters = n;
    if (n > w->max_waiters) w->max_waiters = n;
    if (w->release_at != 0 && w->calls == w->release_at) {
        /* A non-blocking call from inside the check: allowed. */
        if (w->kind == 0) OK(lim_semaphore_release(w->h, w->release));
        if (w->kind == 1) OK(lim_weighted_semaphore_release(w->h, w->release));
        if (w->kind == 2) OK(lim_permit_release(w->permit));
    }
    if (w->nested != NULL) {
        /* A blocking call from inside the check: forbidden; refused before it registers. */
        int got = 0;
        if (lim_semaphore_acquire_until(w->nested, 1, lim_now_ns() + kSec / 100, &got) ==
            LIM_INVALID_ARGUMENT) {
            w->nested_refused++;
        }
    }
    if (w->fork_at != 0 && w->calls == w->fork_at) {
        const pid_t pid = fork();
        if (pid == 0) {
            w->in_child = 1;
            return 0; /* go on waiting: the library must not, in the child */
        }
        waitpid(pid, &w->child_status, 0);
    }
    if (w->flag != NULL && *w->flag) return 1;
    return w->stop_at != 0 && w->calls >= w->stop_at;
}

/* In the child of a check that forked: its copy of the wait must have ended (LIM_WAIT_STOPPED,
 * on the check that forked) leaving the parent's registration and holdings as they were. */
static void exit_child_of_fork(const struct watch* w, int r, uint32_t waiters_then,
                               uint64_t in_use_then) {
    if (!w->in_child) return;
    const int ok = r == LIM_WAIT_STOPPED && w->calls == w->fork_at &&
                   watched_waiters(w) == waiters_then && failures == 0;
    uint64_t v = 0;
    int in_use_ok = 1;
    if (w->kind == 0) {
        in_use_ok = lim_semaphore_in_use(w->h, &v) == LIM_OK && v == in_use_then;
    } else if (w->kind == 1) {
        in_use_ok = lim_weighted_semaphore_in_use(w->h, &v) == LIM_OK && v == in_use_then;
    } else if (w->kind == 2) {
        lim_dispatch_snapshot s;
        in_use_ok = lim_dispatch_snapshot_get(w->h, &s) == LIM_OK && s.in_flight == in_use_then;
    }
    _exit(ok && in_use_ok ? 0 : 3);
}

/* A thread whose check ends it (pthread_exit, as CPython does to a daemon thread calling back
 * while the interpreter exits) on its 2nd call: the unwind must pass through the library (no
 * abort) and withdraw the registration, giving back what the wait took, on its way out. */
struct exit_waiter {
    int kind; /* 1 weighted semaphore (4 units), 2 dispatch (50 bytes) */
    void* h;
    lim_permit* permit;
    int calls;
    int returned; /* set if the call ever returned: it must not */
};

static int exit_check(void* context) {
    struct exit_waiter* e = context;
    if (++e->calls == 2) pthread_exit(NULL);
    return 0;
}

static void* exit_waiter_main(void* context) {
    struct exit_waiter* e = context;
    int r = -1;
    const int64_t ms = kSec / 1000;
    if (e->kind == 1) {
        lim_weighted_semaphore_acquire_until_interruptible(e->h, 4, INT64_MAX, exit_check, e, ms,
                                                           &r);
    } else {
        lim_dispatch_acquire_until_interruptible(e->h, 50, INT64_MAX, e->permit, exit_check, e, ms,
                                                 &r);
    }
    e->returned = 1;
    return NULL;
}

static void run_exit_waiter(struct exit_waiter* e) {
    pthread_t t;
    CHECK(pthread_create(&t, NULL, exit_waiter_main, e) == 0);
    CHECK(pthread_join(t, NULL) == 0);
    CHECK(e->calls == 2 && e->returned == 0);
}

static volatile sig_atomic_t got_usr1 = 0;
static void on_usr1(int signum) {
    (void)signum;
    got_usr1 = 1;
}

static void test_interruptible(lim_segment* seg) {
    const int64_t ms = kSec / 1000;
    int r = -1;
    uint32_t n = 0;
    uint64_t v = 0;

    /* Weighted: queued for 4 of 10 held here; 20 checks, 1 ms apart, all see it queued; the stop
     * withdraws the ticket once: nothing queued, nothing taken. */
    lim_weighted_semaphore* ws = NULL;
    OK(lim_weighted_semaphore_open(seg, "intr-bytes", 10, 0, &ws));
    OK(lim_weighted_semaphore_try_acquire(ws, 10, &r));
    CHECK(r == 1);
    struct watch w = {.kind = 1, .h = ws, .stop_at = 20};
    OK(lim_weighted_semaphore_acquire_until_interruptible(ws, 4, INT64_MAX, watch_check, &w, ms,
                                                          &r));
    CHECK(r == LIM_WAIT_STOPPED && w.calls == 20 && w.min_waiters == 1 && w.max_waiters == 1);
    OK(lim_weighted_semaphore_waiters(ws, &n));
    OK(lim_weighted_semaphore_in_use(ws, &v));
    CHECK(n == 0 && v == 10);

    /* The deadline still ends it (the check ran, said go on). */
    struct watch w2 = {.kind = 1, .h = ws};
    OK(lim_weighted_semaphore_acquire_until_interruptible(ws, 4, lim_now_ns() + 30 * ms,
                                                          watch_check, &w2, 5 * ms, &r));
    CHECK(r == LIM_WAIT_TIMED_OUT && w2.calls >= 1 && w2.min_waiters == 1);
    OK(lim_weighted_semaphore_waiters(ws, &n));
    CHECK(n == 0);

    /* The check itself gives the units back on its 3rd call: the wait, still queued, takes 4. */
    struct watch w3 = {.kind = 1, .h = ws, .release_at = 3, .release = 10};
    OK(lim_weighted_semaphore_acquire_until_interruptible(ws, 4, INT64_MAX, watch_check, &w3, ms,
                                                          &r));
    CHECK(r == LIM_WAIT_ACQUIRED && w3.calls >= 3 && w3.min_waiters == 1);
    OK(lim_weighted_semaphore_in_use(ws, &v));
    OK(lim_weighted_semaphore_waiters(ws, &n));
    CHECK(v == 4 && n == 0);

    /* Free units: no check at all. NULL check: the plain deadline wait. Bad arguments. */
    struct watch w4 = {.kind = 1, .h = ws, .stop_at = 1};
    OK(lim_weighted_semaphore_acquire_until_interruptible(ws, 6, INT64_MAX, watch_check, &w4, ms,
                                                          &r));
    CHECK(r == LIM_WAIT_ACQUIRED && w4.calls == 0);
    OK(lim_weighted_semaphore_acquire_until_interruptible(ws, 1, lim_now_ns() + ms, NULL, NULL, ms,
                                                          &r));
    CHECK(r == LIM_WAIT_TIMED_OUT);
    CHECK(lim_weighted_semaphore_acquire_until_interruptible(ws, 1, INT64_MAX, watch_check, &w4, 0,
                                                             &r) == LIM_INVALID_ARGUMENT);
    CHECK(lim_weighted_semaphore_acquire_until_interruptible(ws, 1, INT64_MAX, watch_check, &w4, ms,
                                                             NULL) == LIM_INVALID_ARGUMENT);
    CHECK(lim_weighted_semaphore_acquire_until_interruptible(NULL, 1, INT64_MAX, watch_check, &w4,
                                                             ms, &r) == LIM_INVALID_ARGUMENT);

    /* check_interval_ns INT64_MAX: checked once before the first sleep, never again (now +
     * interval saturates; wrapped, it lay in the past and every sleep after the first checked:
     * a weighted wait sleeps up to 100 ms at a time, several times before this deadline). */
    struct watch w6 = {.kind = 1, .h = ws};
    OK(lim_weighted_semaphore_acquire_until_interruptible(ws, 4, lim_now_ns() + 400 * ms,
                                                          watch_check, &w6, INT64_MAX, &r));
    CHECK(r == LIM_WAIT_TIMED_OUT && w6.calls == 1 && w6.min_waiters == 1);
    OK(lim_weighted_semaphore_waiters(ws, &n));
    CHECK(n == 0);

    /* A check that blocks in lim (forbidden): its acquire on a full semaphore is refused with
     * LIM_INVALID_ARGUMENT each time, registering nothing there; the outer ticket stays. */
    lim_semaphore* full = NULL;
    OK(lim_semaphore_open(seg, "intr-full", 1, 0, &full));
    OK(lim_semaphore_try_acquire(full, 1, &r));
    CHECK(r == 1);
    struct watch w7 = {.kind = 1, .h = ws, .stop_at = 3, .nested = full};
    OK(lim_weighted_semaphore_acquire_until_interruptible(ws, 4, INT64_MAX, watch_check, &w7, ms,
                                                          &r));
    CHECK(r == LIM_WAIT_STOPPED && w7.calls == 3 && w7.nested_refused == 3 && w7.min_waiters == 1);
    OK(lim_semaphore_waiters(full, &n));
    CHECK(n == 0);
    OK(lim_weighted_semaphore_waiters(ws, &n));
    CHECK(n == 0);
    OK(lim_semaphore_release(full, 1));
    lim_semaphore_close(full);

    /* The waiting thread ends inside its check: its ticket is withdrawn by the unwind. */
    struct exit_waiter x1 = {.kind = 1, .h = ws};
    run_exit_waiter(&x1);
    OK(lim_weighted_semaphore_waiters(ws, &n));
    OK(lim_weighted_semaphore_in_use(ws, &v));
    CHECK(n == 0 && v == 10);

    /* A signal cuts the sleep short and the check runs at once: with a 60 s interval, only that
     * path can see the flag before the child stops sending (SIGUSR1 every 5 ms, up to 20 s). */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1; /* no SA_RESTART: the futex wait returns EINTR */
    sigemptyset(&sa.sa_mask);
    struct sigaction old_sa;
    CHECK(sigaction(SIGUSR1, &sa, &old_sa) == 0);
    const pid_t parent = getpid();
    const pid_t sender = fork();
    if (sender == 0) {
        const struct timespec five_ms = {0, 5000000L};
        for (int i = 0; i < 4000; ++i) {
            nanosleep(&five_ms, NULL);
            kill(parent, SIGUSR1);
        }
        _exit(0);
    }
    got_usr1 = 0;
    struct watch w5 = {.kind = 1, .h = ws, .flag = &got_usr1};
    const int64_t start = lim_now_ns();
    OK(lim_weighted_semaphore_acquire_until_interruptible(ws, 4, INT64_MAX, watch_check, &w5,
                                                          60 * kSec, &r));
    const int64_t took = lim_now_ns() - start;
    kill(sender, SIGKILL);
    waitpid(sender, NULL, 0);
    CHECK(sigaction(SIGUSR1, &old_sa, NULL) == 0);
    CHECK(r == LIM_WAIT_STOPPED && w5.calls >= 1 && w5.calls <= 2 && took < 15 * kSec);
    OK(lim_weighted_semaphore_waiters(ws, &n));
    OK(lim_weighted_semaphore_in_use(ws, &v));
    CHECK(n == 0 && v == 10);

    /* A check that forks: the child's copy of the wait leaves without touching the parent's
     * ticket (still queued in every later check), the parent stops later, exactly once. */
    struct watch f1 = {.kind = 1, .h = ws, .fork_at = 2, .stop_at = 5};
    OK(lim_weighted_semaphore_acquire_until_interruptible(ws, 4, INT64_MAX, watch_check, &f1, ms,
                                                          &r));
    exit_child_of_fork(&f1, r, 1, 10);
    CHECK(r == LIM_WAIT_STOPPED && f1.calls == 5 && f1.min_waiters == 1 && f1.max_waiters == 1);
    CHECK(WIFEXITED(f1.child_status) && WEXITSTATUS(f1.child_status) == 0);
    OK(lim_weighted_semaphore_waiters(ws, &n));
    OK(lim_weighted_semaphore_in_use(ws, &v));
    CHECK(n == 0 && v == 10);
    OK(lim_weighted_semaphore_release(ws, 10));
    lim_weighted_semaphore_close(ws);

    /* Semaphore: the same stop, and the check that frees the unit. */
    lim_semaphore* sem = NULL;
    OK(lim_semaphore_open(seg, "intr-sem", 1, 0, &sem));
    OK(lim_semaphore_try_acquire(sem, 1, &r));
    struct watch s1 = {.kind = 0, .h = sem, .stop_at = 5};
    OK(lim_semaphore_acquire_until_interruptible(sem, 1, INT64_MAX, watch_check, &s1, ms, &r));
    CHECK(r == LIM_WAIT_STOPPED && s1.calls == 5 && s1.min_waiters == 1);
    OK(lim_semaphore_waiters(sem, &n));
    OK(lim_semaphore_in_use(sem, &v));
    CHECK(n == 0 && v == 1);
    struct watch sf = {.kind = 0, .h = sem, .fork_at = 2, .stop_at = 4};
    OK(lim_semaphore_acquire_until_interruptible(sem, 1, INT64_MAX, watch_check, &sf, ms, &r));
    exit_child_of_fork(&sf, r, 1, 1);
    CHECK(r == LIM_WAIT_STOPPED && sf.calls == 4 && sf.min_waiters == 1 && sf.max_waiters == 1);
    CHECK(WIFEXITED(sf.child_status) && WEXITSTATUS(sf.child_status) == 0);
    OK(lim_semaphore_waiters(sem, &n));
    CHECK(n == 0);
    struct watch s2 = {.kind = 0, .h = sem, .release_at = 2, .release = 1};
    OK(lim_semaphore_acquire_until_interruptible(sem, 1, lim_now_ns() + 60 * kSec, watch_check, &s2,
                                                 ms, &r));
    CHECK(r == LIM_WAIT_ACQUIRED && s2.calls >= 2);
    OK(lim_semaphore_release(sem, 1));
    lim_semaphore_close(sem);

    /* Dispatch: a request that took its slot and queued for bytes; the stop gives the slot back
     * too. Then the check releases the holder's permit and the request gets in. */
    lim_backoff_window* win = NULL;
    OK(lim_backoff_window_for_key(seg, "intr-api", &win));
    lim_dispatch_options o;
    lim_dispatch_options_init(&o);
    o.limiter = win;
    o.key = "intr-api";
    o.concurrency = 4;
    o.byte_budget = 100;
    lim_dispatch* d = NULL;
    OK(lim_dispatch_open(seg, &o, 0, &d));
    lim_permit* holder = NULL;
    lim_permit* p = NULL;
    OK(lim_permit_create(&holder));
    OK(lim_permit_create(&p));
    OK(lim_dispatch_try_acquire(d, 100, holder, &r));
    CHECK(r == 1);
    struct watch d1 = {.kind = 2, .h = d, .stop_at = 10};
    OK(lim_dispatch_acquire_until_interruptible(d, 50, INT64_MAX, p, watch_check, &d1, ms, &r));
    CHECK(r == LIM_WAIT_STOPPED && d1.calls == 10 && d1.min_waiters == 1 && !lim_permit_held(p));
    lim_dispatch_snapshot snap;
    OK(lim_dispatch_snapshot_get(d, &snap));
    CHECK(snap.waiters == 0 && snap.in_flight == 1 && snap.bytes_in_flight == 100);
    /* Ended inside the check (pthread_exit): the unwind gives back the slot it took and leaves
     * the byte queue. */
    lim_permit* px = NULL;
    OK(lim_permit_create(&px));
    struct exit_waiter x2 = {.kind = 2, .h = d, .permit = px};
    run_exit_waiter(&x2);
    CHECK(!lim_permit_held(px));
    lim_permit_destroy(px);
    OK(lim_dispatch_snapshot_get(d, &snap));
    CHECK(snap.waiters == 0 && snap.in_flight == 1 && snap.bytes_in_flight == 100);
    /* Forked in the check: the child must neither give back the slot the parent's wait took
     * (2 in flight) nor withdraw its byte ticket. */
    struct watch f2 = {.kind = 2, .h = d, .fork_at = 3, .stop_at = 6};
    OK(lim_dispatch_acquire_until_interruptible(d, 50, INT64_MAX, p, watch_check, &f2, ms, &r));
    exit_child_of_fork(&f2, r, 1, 2);
    CHECK(r == LIM_WAIT_STOPPED && f2.calls == 6 && f2.min_waiters == 1 && !lim_permit_held(p));
    CHECK(WIFEXITED(f2.child_status) && WEXITSTATUS(f2.child_status) == 0);
    OK(lim_dispatch_snapshot_get(d, &snap));
    CHECK(snap.waiters == 0 && snap.in_flight == 1 && snap.bytes_in_flight == 100);
    struct watch d2 = {.kind = 2, .h = d, .release_at = 2, .permit = holder};
    OK(lim_dispatch_acquire_until_interruptible(d, 50, INT64_MAX, p, watch_check, &d2, ms, &r));
    CHECK(r == LIM_WAIT_ACQUIRED && lim_permit_held(p) && lim_permit_bytes(p) == 50);
    CHECK(lim_dispatch_acquire_until_interruptible(d, 1, INT64_MAX, p, watch_check, &d2, ms, &r) ==
          LIM_INVALID_ARGUMENT); /* p holds one */
    OK(lim_dispatch_snapshot_get(d, &snap));
    CHECK(snap.waiters == 0 && snap.in_flight == 1 && snap.bytes_in_flight == 50);
    lim_permit_destroy(p);
    lim_permit_destroy(holder);
    lim_dispatch_close(d);
    lim_backoff_window_close(win);
}

int main(void) {
    char name[64];
    snprintf(name, sizeof name, "c-api-test-%d", (int)getpid());
    test_errors();
    lim_segment* seg = NULL;
    OK(lim_segment_open_or_create(name, NULL, &seg));
    if (seg == NULL) return 1;
    lim_segment_info info;
    OK(lim_segment_info_get(seg, &info));
    CHECK(strcmp(info.name, name) == 0 && info.max_limiters == 256 && info.processes == 1);
    int creator = 0;
    OK(lim_segment_is_creator(seg, &creator));
    CHECK(creator == 1);
    test_semaphore(seg);
    test_dispatch(seg);
    test_interruptible(seg);
    test_limiters(seg);
    test_retry_after();
    test_null_output_takes_nothing(seg);
    test_extreme_now(seg);
    lim_reap_report* rep = NULL;
    OK(lim_segment_reap(seg, &rep));
    /* The forked child's slot is the only dead one (if the library has not freed it already);
     * it held nothing when it exited. */
    CHECK(lim_reap_report_count(rep) <= 1 && lim_reap_report_deferred(rep, 0) == NULL);
    if (lim_reap_report_count(rep) == 1) {
        CHECK(lim_reap_report_pid(rep, 0) == forked_child);
        CHECK(lim_reap_report_returned_count(rep, 0) == 0);
    }
    lim_reap_report_free(rep);
    OK(lim_segment_reset(seg, NULL, 0));
    CHECK(lim_segment_reset(seg, "no-such-key", 0) == LIM_NOT_FOUND);
    lim_segment_close(seg);
    int removed = 0;
    OK(lim_segment_remove(name, &removed));
    CHECK(removed == 1);
    if (failures) fprintf(stderr, "%d checks failed\n", failures);
    return failures ? 1 : 0;
}
