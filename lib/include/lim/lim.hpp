// lim/lim.hpp: everything lim offers, in one include.
#pragma once

#include "lim/clock.hpp"
#include "lim/error.hpp"
#include "lim/segment.hpp"
#include "lim/semaphore.hpp"
#include "lim/tokens.hpp"
