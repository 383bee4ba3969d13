// Fixed-point tokens (1/10,000 of a token, rounded up) and InfiniteOrFinite.
#include <doctest/doctest.h>

#include <cmath>
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
