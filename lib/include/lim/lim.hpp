// lim/lim.hpp: everything lim offers, in one include.
#pragma once

#include "lim/backoff_window.hpp"
#include "lim/clock.hpp"
#include "lim/dispatch.hpp"
#include "lim/error.hpp"
#include "lim/hand_off.hpp"
#include "lim/limiter.hpp"
#include "lim/retry_after.hpp"
#include "lim/segment.hpp"
#include "lim/semaphore.hpp"
#include "lim/throttle.hpp"
#include "lim/throttled_rate_limiter.hpp"
#include "lim/token_bucket.hpp"
#include "lim/tokens.hpp"
#include "lim/wait_check.hpp"
#include "lim/weighted_semaphore.hpp"
