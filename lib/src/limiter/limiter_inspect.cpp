// What limctl shows of a limiter record: its configuration as created (in the words of the facade
// that created it), its configuration now, and bucket, hopper and in flight.
#include <bit>
#include <string>

#include "inspect/snapshot.hpp"
#include "lim/tokens.hpp"
#include "limiter/limiter_state.hpp"
#include "shm/records.hpp"

namespace lim::detail {
namespace {

double tokens(std::int64_t units) {
    return static_cast<double>(units) / static_cast<double>(kTokenResolution);
}

std::string text(double v) {
    return format_amount(v);
}

}  // namespace

void inspect_limiter(const SegmentState& state, std::uint32_t record, TimePoint now,
                     RecordSnapshot& out) {
    const Record& r = state.record(record);
    const auto& c = *reinterpret_cast<const LimiterRecordConfig*>(r.config);
    const auto flavor = static_cast<LimiterFlavor>(load_flavor(r.header));
    const bool rate_infinite = (c.flags & kRateInfinite) != 0;
    const bool hopper_infinite = (c.flags & kTargetInfinite) != 0;
    const std::string rate = rate_infinite ? "inf" : text(std::bit_cast<double>(c.rate_bits));
    switch (flavor) {
        case LimiterFlavor::token_bucket:
            out.flavor = "token_bucket";
            out.config = {{"burst_size", text(tokens(c.bucket_size))},
                          {"sustained_rate_per_sec", rate},
                          {"initial_bucket_level", text(tokens(c.initial_bucket_level))}};
            break;
        case LimiterFlavor::throttle:
            out.flavor = "throttle";
            out.config = {{"max_concurrent_jobs", text(tokens(c.bucket_size))}};
            break;
        case LimiterFlavor::throttled_rate_limiter:
            out.flavor = "throttled_rate_limiter";
            out.config = {{"burst_size", text(tokens(c.bucket_size))},
                          {"sustained_rate_per_sec", rate},
                          {"max_concurrent_jobs",
                           text(tokens(c.initial_bucket_level + c.initial_hopper_level))}};
            break;
        case LimiterFlavor::limiter:
        default:
            out.flavor = "limiter";
            out.config = {{"hopper_to_bucket_rate_per_sec", rate},
                          {"bucket_size", text(tokens(c.bucket_size))},
                          {"initial_bucket_level", text(tokens(c.initial_bucket_level))},
                          {"initial_hopper_level",
                           hopper_infinite ? "inf" : text(tokens(c.initial_hopper_level))}};
            break;
    }
    // LimiterCore::read only loads (it raises the limiter's time only on a writable mapping), so
    // it is safe on limctl's read-only view.
    LimiterCore core(const_cast<SegmentState&>(state), record);
    const LimiterReading now_reading = core.read(to_nanos(now));
    const LimiterParams& p = now_reading.params;
    out.layer_names = {"tokens"};
    out.layer_scale = {1.0 / static_cast<double>(kTokenResolution)};
    if (flavor == LimiterFlavor::token_bucket) {
        // A token bucket's own takes are recorded in ledger layer 1 (consumed, not in F).
        out.layer_names.push_back("consumed");
        out.layer_scale.push_back(1.0 / static_cast<double>(kTokenResolution));
    }
    out.layers = {Quantity::layer("tokens_in_bucket", tokens(now_reading.in_bucket),
                                  tokens(p.bucket_size), "token_bucket_size", "tokens",
                                  "in_bucket")};
    if (!p.target_infinite) {
        out.layers.push_back(Quantity::layer("tokens_in_flight", tokens(now_reading.in_flight),
                                             tokens(p.target), "token_target_level", "tokens",
                                             "in_flight"));
    }
    out.values = {Quantity::state(
        "tokens_in_hopper",
        p.target_infinite ? std::numeric_limits<double>::infinity() : tokens(now_reading.in_hopper),
        "tokens")};
    if (p.target_infinite) {
        out.values.push_back(
            Quantity::state("tokens_in_flight", tokens(now_reading.in_flight), "tokens"));
    }
    out.values.push_back(Quantity::state(
        "fill_rate_tokens_per_second",
        p.rate_infinite ? std::numeric_limits<double>::infinity() : p.rate_per_sec));
    const auto& body = *reinterpret_cast<const LimiterBody*>(r.body);
    out.waiters = body.wake.waiters.load(std::memory_order_relaxed);
    out.frozen = is_frozen(body.in_flight.load(std::memory_order_acquire));
}

}  // namespace lim::detail
