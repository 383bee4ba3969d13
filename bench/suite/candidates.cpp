#include "suite/candidates.hpp"

#include <semaphore.h>

#include <boost/interprocess/sync/interprocess_semaphore.hpp>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <stdexcept>

#include "baselines/mutex_baselines.hpp"
#include "lim/lim.hpp"
#ifdef LIM_BENCH_HAVE_REDIS
#include "baselines/redis_gcra.hpp"
#endif

namespace lim_bench {

const Candidate* Family::first(const std::string& kind) const {
    for (const auto& c : baselines)
        if (c.kind == kind) return &c;
    return nullptr;
}

namespace {

constexpr std::uint64_t kBig = std::uint64_t{1} << 20;
constexpr double kBurst = 1e6;  // tokens: a try never finds the bucket empty...
constexpr double kRate = 1e7;   // ...at 10 tokens per us

// The TokenBucket family's rate: 1,000 tokens/s, a vendor API's limit (SPEC's examples are 2-50
// tokens/s), with a burst of 10^8 tokens so that no take in a run finds the bucket empty. The
// rate decides the take's drip arithmetic: up to 5,124 tokens/s its short form (kept by a
// re-anchor at most every 6 minutes), above it the long form (docs/benchmarks.md, the
// TokenBucket breakdown). LIM_BENCH_TB_RATE=R (tokens/s) measures another rate.
constexpr double kTbBurst = 1e8;
double tb_rate() {
    static const double rate = [] {
        const char* e = std::getenv("LIM_BENCH_TB_RATE");
        const double r = e != nullptr ? std::atof(e) : 0;
        return r > 0 && r <= 1e9 ? r : 1000.0;
    }();
    return rate;
}

std::string fresh_key(const char* base) {
    static int n = 0;
    return std::string(base) + "." + std::to_string(++n);
}

// Where explicit times start: 1,000 s behind the clock, so that advancing 1 us per call never
// runs ahead of Clock::now() (lim holds an explicit `now` more than 10 ms ahead of the clock to
// the clock, reading it, which would time the clamp instead of the algorithm). The limiters and
// their mutex versions are created at this time too.
std::int64_t epoch_ns() {
    static const std::int64_t epoch = lim::to_nanos(lim::Clock::now()) - 1'000'000'000'000;
    return epoch;
}
lim::TimePoint epoch() {
    return lim::from_nanos(epoch_ns());
}

// A per-process time source for the limiter families: lim::Clock, or (explicit_now) a private
// time that advances 1 us per call from epoch(), so the op times the algorithm without the
// clock read.
struct Now {
    bool explicit_now;
    std::int64_t t = 0;
    lim::TimePoint operator()() {
        if (!explicit_now) return lim::Clock::now();
        if (t == 0) t = epoch_ns();
        t += 1000;
        return lim::from_nanos(t);
    }
};

sem_t* make_sem_t(unsigned value) {
    auto* s = static_cast<sem_t*>(shared_memory(sizeof(sem_t)));
    if (::sem_init(s, 1, value) != 0) throw std::runtime_error("sem_init");
    return s;
}

using BoostSem = boost::interprocess::interprocess_semaphore;

Candidate floor_cas_pair() {
    auto* f = make_shared_object<FloorWord>();
    return {"CAS pair", "floor", [f] {
                return Op([f] {
                    if (!f->cas_take(kBig)) return false;
                    f->cas_give_back();
                    return true;
                });
            }};
}

Candidate sem_t_pair() {
    sem_t* s = make_sem_t(static_cast<unsigned>(kBig));
    return {"sem_t", "sem_t", [s] {
                return Op([s] {
                    if (::sem_trywait(s) != 0) return false;
                    ::sem_post(s);
                    return true;
                });
            }};
}

Candidate boost_pair() {
    auto* s = make_shared_object<BoostSem>(static_cast<unsigned>(kBig));
    return {"boost interprocess_semaphore", "boost", [s] {
                return Op([s] {
                    if (!s->try_wait()) return false;
                    s->post();
                    return true;
                });
            }};
}

Candidate mutex_semaphore_pair(std::uint64_t capacity, std::uint64_t n) {
    auto* m = make_shared_object<MutexSemaphore>(capacity);
    return {"robust mutex", "mutex", [m, n] {
                return Op([m, n] {
                    if (!m->try_acquire(n)) return false;
                    m->release(n);
                    return true;
                });
            }};
}

Candidate mutex_limiter_pair(const Env& env, double rate) {
    auto* m = make_shared_object<MutexLimiter>(kBurst, rate, kBurst, -1.0, epoch_ns());
    const bool e = env.explicit_now;
    return {"robust mutex (seed algorithm)", "mutex", [m, e] {
                return Op([m, now = Now{e}]() mutable {
                    const std::int64_t t = lim::to_nanos(now());
                    if (!m->try_take(t, 1)) return false;
                    m->return_to_hopper(t, 1);
                    return true;
                });
            }};
}

}  // namespace

std::vector<Family> try_families(const Env& env) {
    lim::Segment& seg = *env.segment;
    const bool e = env.explicit_now;
    std::vector<Family> out;

    {  // Semaphore
        auto sem = std::make_shared<lim::Semaphore>(
            lim::Semaphore::open(seg, fresh_key("sem"), {.capacity = kBig}));
        out.push_back(
            {"Semaphore",
             "try_acquire(1) + release(1)",
             {"lim::Semaphore", "lim",
              [sem] {
                  return Op([sem] {
                      if (!sem->try_acquire(1)) return false;
                      sem->release(1);
                      return true;
                  });
              }},
             {floor_cas_pair(), mutex_semaphore_pair(kBig, 1), sem_t_pair(), boost_pair()}});
    }
    {  // WeightedSemaphore
        auto ws = std::make_shared<lim::WeightedSemaphore>(
            lim::WeightedSemaphore::open(seg, fresh_key("wsem"), {.capacity = kBig * 100}));
        out.push_back({"WeightedSemaphore",
                       "try_acquire(100) + release(100)",
                       {"lim::WeightedSemaphore", "lim",
                        [ws] {
                            return Op([ws] {
                                if (!ws->try_acquire(100)) return false;
                                ws->release(100);
                                return true;
                            });
                        }},
                       {floor_cas_pair(), mutex_semaphore_pair(kBig * 100, 100)}});
    }
    {  // Dispatch
        const std::string key = fresh_key("api");
        auto d = std::make_shared<lim::Dispatch>(lim::Dispatch::open(
            seg, {.limiter = lim::BackoffWindow::for_key(seg, key), .key = key}));
        auto* floor = make_shared_object<FloorWord>();
        auto* m = make_shared_object<MutexDispatch>();
        out.push_back({"Dispatch",
                       "try_acquire(1000) + Permit release, no backoff",
                       {"lim::Dispatch", "lim",
                        [d] { return Op([d] { return d->try_acquire(1000).has_value(); }); }},
                       {{"fetch_add pair", "floor",
                         [floor] {
                             return Op([floor] {
                                 floor->fetch_add_pair();
                                 return true;
                             });
                         }},
                        {"robust mutex", "mutex", [m] {
                             return Op([m] {
                                 MutexDispatch::Held h;
                                 if (!m->try_acquire(1000, h)) return false;
                                 m->release(h);
                                 return true;
                             });
                         }}}});
    }
    {  // TokenBucket
        auto tb = std::make_shared<lim::TokenBucket>(
            lim::TokenBucket::open(seg, fresh_key("tb"),
                                   {.burst_size = kTbBurst,
                                    .sustained_rate_per_sec = tb_rate(),
                                    .initial_bucket_level = kTbBurst},
                                   epoch()));
        auto* floor = make_shared_object<FloorWord>();
        auto* m = make_shared_object<MutexTokenBucket>(kTbBurst, tb_rate(), epoch_ns());
        Family f{"TokenBucket",
                 "try_take(1)",
                 {"lim::TokenBucket", "lim",
                  [tb, e] {
                      return Op([tb, now = Now{e}]() mutable {
                          return tb->try_take(now(), 1.0) == lim::TryTake::taken;
                      });
                  }},
                 {{"CAS", "floor",
                   [floor] {
                       return Op([floor] {
                           return floor->cas_take(std::numeric_limits<std::uint64_t>::max() - 1);
                       });
                   }},
                  {"robust mutex", "mutex", [m, e] {
                       return Op([m, now = Now{e}]() mutable {
                           return m->try_take(lim::to_nanos(now()), 1.0);
                       });
                   }}}};
#ifdef LIM_BENCH_HAVE_REDIS
        if (env.redis_port > 0) {
            const int port = env.redis_port;
            const std::string key = fresh_key("gcra");
            f.baselines.push_back(
                {"Redis GCRA (EVALSHA)", "redis", [port, key] {
                     auto r = std::make_shared<RedisGcra>("127.0.0.1", port);
                     return Op([r, key] { return r->try_take(key, kTbBurst, tb_rate()); });
                 }});
        }
#endif
        out.push_back(std::move(f));
    }
    {  // Throttle: infinite rate, a counting semaphore of jobs
        auto th = std::make_shared<lim::Throttle>(
            lim::Throttle::open(seg, fresh_key("throttle"),
                                {.max_concurrent_jobs = static_cast<std::int64_t>(kBig)}, epoch()));
        out.push_back({"Throttle",
                       "try_start_job + finish_job",
                       {"lim::Throttle", "lim",
                        [th, e] {
                            return Op([th, now = Now{e}]() mutable {
                                const lim::TimePoint t = now();
                                if (th->try_start_job(t).kind() != lim::StartJob::Kind::start)
                                    return false;
                                th->finish_job(t);
                                return true;
                            });
                        }},
                       {floor_cas_pair(), mutex_semaphore_pair(kBig, 1), sem_t_pair()}});
    }
    {  // ThrottledRateLimiter
        auto trl = std::make_shared<lim::ThrottledRateLimiter>(lim::ThrottledRateLimiter::open(
            seg, fresh_key("trl"),
            {.burst_size = kBurst,
             .sustained_rate_per_sec = kRate,
             .max_concurrent_jobs = static_cast<std::int64_t>(kBurst)},
            epoch()));
        out.push_back({"ThrottledRateLimiter",
                       "try_start_job + finish_job",
                       {"lim::ThrottledRateLimiter", "lim",
                        [trl, e] {
                            return Op([trl, now = Now{e}]() mutable {
                                const lim::TimePoint t = now();
                                if (trl->try_start_job(t).kind() != lim::StartJob::Kind::start)
                                    return false;
                                trl->finish_job(t);
                                return true;
                            });
                        }},
                       {floor_cas_pair(), mutex_limiter_pair(env, kRate)}});
    }
    {  // Limiter: finite rate, infinite hopper, tokens returned
        auto lm = std::make_shared<lim::Limiter>(
            lim::Limiter::open(seg, fresh_key("limiter"),
                               {.hopper_to_bucket_rate_per_sec = kRate,
                                .bucket_size = kBurst,
                                .initial_bucket_level = kBurst,
                                .initial_hopper_level = lim::infinite},
                               epoch()));
        out.push_back({"Limiter",
                       "try_take(1) + return_to_hopper(1)",
                       {"lim::Limiter", "lim",
                        [lm, e] {
                            return Op([lm, now = Now{e}]() mutable {
                                const lim::TimePoint t = now();
                                if (lm->try_take(t, 1.0) != lim::TryTake::taken) return false;
                                lm->return_to_hopper(t, 1.0);
                                return true;
                            });
                        }},
                       {floor_cas_pair(), mutex_limiter_pair(env, kRate)}});
    }
    return out;
}

std::vector<Candidate> blocking_candidates(const Env& env, std::uint64_t capacity,
                                           std::int64_t hold_ns) {
    std::vector<Candidate> out;
    auto sem = std::make_shared<lim::Semaphore>(
        lim::Semaphore::open(*env.segment, fresh_key("handoff"), {.capacity = capacity}));
    out.push_back({"lim::Semaphore", "lim", [sem, hold_ns] {
                       return Op([sem, hold_ns] {
                           sem->acquire(1);
                           spin_for(hold_ns);
                           sem->release(1);
                           return true;
                       });
                   }});
    sem_t* s = make_sem_t(static_cast<unsigned>(capacity));
    out.push_back({"sem_t", "sem_t", [s, hold_ns] {
                       return Op([s, hold_ns] {
                           while (::sem_wait(s) != 0) {
                           }
                           spin_for(hold_ns);
                           ::sem_post(s);
                           return true;
                       });
                   }});
    auto* m = make_shared_object<MutexSemaphore>(capacity);
    out.push_back({"robust mutex + condvar", "mutex", [m, hold_ns] {
                       return Op([m, hold_ns] {
                           m->acquire(1);
                           spin_for(hold_ns);
                           m->release(1);
                           return true;
                       });
                   }});
    auto* b = make_shared_object<BoostSem>(static_cast<unsigned>(capacity));
    out.push_back({"boost interprocess_semaphore", "boost", [b, hold_ns] {
                       return Op([b, hold_ns] {
                           b->wait();
                           spin_for(hold_ns);
                           b->post();
                           return true;
                       });
                   }});
    return out;
}

}  // namespace lim_bench
