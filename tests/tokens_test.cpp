// Fixed-point tokens (1/10,000 of a token, rounded up) and InfiniteOrFinite.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "lim/lim.hpp"

using namespace lim;

TEST_CASE("amounts are rounded up to a whole piece, decimal literals meaning what they say") {
    CHECK(Tokens::round_up(1.0).units() == 10'000);
    CHECK(Tokens::round_up(1.1).units() == 11'000);
    CHECK(Tokens::round_up(0.3).units() == 3'000);
    CHECK(Tokens::round_up(2.5).units() == 25'000);
    CHECK(Tokens::round_up(0.0001).units() == 1);
    CHECK(Tokens::round_up(0.00001).units() == 1);  // a tenth of a piece rounds up to one
    CHECK(Tokens::round_up(0.00015).units() == 2);
    CHECK(Tokens::round_up(1.00001).units() == 10'001);
    CHECK(Tokens::round_up(0.0).units() == 0);
    CHECK(Tokens::round_up(-1.5).units() == -15'000);
    CHECK(Tokens::round_up(123456.7891).units() == 1'234'567'891);
    CHECK(Tokens::round_up(1.1).to_double() == doctest::Approx(1.1));
}

TEST_CASE("non-finite and out-of-range amounts are refused") {
    for (double bad : {std::nan(""), std::numeric_limits<double>::infinity(),
                       -std::numeric_limits<double>::infinity(), 1e300, -1e20}) {
        CAPTURE(bad);
        try {
            Tokens::round_up(bad);
            FAIL("expected invalid_argument");
        } catch (const Error& e) {
            CHECK(e.code() == Errc::invalid_argument);
        }
    }
}

TEST_CASE("token arithmetic is exact on units") {
    const Tokens a = Tokens::round_up(0.1);
    Tokens sum;
    for (int i = 0; i < 10; ++i)
        sum = sum + a;
    CHECK(sum == Tokens::round_up(1.0));  // no floating-point drift
    CHECK(sum - a == Tokens::from_units(9'000));
    CHECK(a < sum);
}

TEST_CASE("InfiniteOrFinite holds either a value or infinity") {
    const InfiniteOrFinite<double> f = 2.5;
    const InfiniteOrFinite<double> inf = infinite;
    CHECK(f.is_finite());
    CHECK_FALSE(f.is_infinite());
    CHECK(f.value() == 2.5);
    CHECK(inf.is_infinite());
    CHECK(inf.value_or(7.0) == 7.0);
    CHECK(f != inf);
    CHECK(inf == InfiniteOrFinite<double>(infinite));
    try {
        (void)inf.value();
        FAIL("value() of infinite must throw");
    } catch (const Error& e) {
        CHECK(e.code() == Errc::invalid_argument);
    }
}

TEST_CASE("rounding up never charges less than asked: an amount between two pieces goes up") {
    // Issue 9: a relative tolerance took 100000.00005 as 100000 and admitted it from a bucket of
    // exactly 100,000.
    CHECK(Tokens::round_up(100000.00005).units() == 1'000'000'001);
    CHECK(Tokens::round_up(100000.00001).units() == 1'000'000'001);
    CHECK(Tokens::round_up(100000.000000001).units() == 1'000'000'001);
    CHECK(Tokens::round_up(std::nextafter(100000.0, 1e6)).units() == 1'000'000'001);
    CHECK(Tokens::round_up(std::nextafter(1.0, 2.0)).units() == 10'001);
    CHECK(Tokens::round_up(std::nextafter(0.0, 1.0)).units() == 1);
    CHECK(Tokens::round_up(std::nextafter(1e9, 2e9)).units() == 10'000'000'000'001);
    // Ordinary decimals still mean what they say (the double 1.1 is above 1.1).
    CHECK(Tokens::round_up(1.1).units() == 11'000);
    CHECK(Tokens::round_up(0.7).units() == 7'000);
    CHECK(Tokens::round_up(4.35).units() == 43'500);
    CHECK(Tokens::round_up(99999.9999).units() == 999'999'999);
    CHECK(Tokens::round_up(0.1 + 0.2).units() == 3'001);  // 0.30000000000000004 is not 0.3
}

TEST_CASE("rounding is exact: every piece's decimal maps to itself, every double goes up") {
    std::uint64_t seed = 0x9E3779B97F4A7C15ULL;
    const auto next = [&] {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        return seed;
    };
    for (int i = 0; i < 200'000; ++i) {
        // Pieces from 1 to ~1e13 (1e9 tokens), spread over the magnitudes.
        const auto k = static_cast<std::int64_t>(next() % (std::uint64_t{1} << (1 + i % 43)));
        const double decimal = static_cast<double>(k) / 10'000.0;
        CAPTURE(k);
        REQUIRE(Tokens::round_up(decimal).units() == k);
        // The doubles just above and below that decimal.
        const double above = std::nextafter(decimal, 1e300);
        REQUIRE(Tokens::round_up(above).units() == k + 1);
        if (k > 0) {
            const double below = std::nextafter(decimal, -1e300);
            REQUIRE(Tokens::round_up(below).units() == k);
        }
    }
}
