#!/usr/bin/env bash
# Builds lim and runs every test: first under AddressSanitizer+UndefinedBehaviorSanitizer (with
# race widening) and ThreadSanitizer, then fuzzing, then the normal (RelWithDebInfo) build, whose
# ctest summary ends the output. Warnings are errors in all of them. Set LIM_SANITIZERS=0 to skip
# the sanitizer builds, and LIM_CLANG=0 to build the ASan stage with GCC and skip fuzzing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh

jobs=$(nproc)
# Two ctest slots per core: a test that keeps a core busy takes two (PROCESSORS 2, the default in
# tests/CMakeLists.txt), one that mostly waits (a lock timeout, a feeder's refresh, Redis) takes
# one, so the waiting tests overlap without putting more busy tests on a core than before.
ctest_jobs=$((2 * jobs))
build() {  # build <dir> [cmake args...]
  local dir=$1; shift
  cmake -S . -B "$dir" -G Ninja -DLIM_WERROR=ON "$@" >/dev/null
  cmake --build "$dir" -j"$jobs"
}

# Four builds, each compiled from scratch on a fresh CI machine, so each one is chosen for what
# only it can catch:
# - clang 14, ASan+UBSan, with race widening (lib/src/sync/race_point.hpp: a scheduling point
#   between the steps of the ledger protocol and of every CAS loop, so the multi-process and crash
#   tests reach the narrow interleavings — a reaper between a holder's CAS and its ledger store, a
#   claim between lock and CAS — in seconds, and ASan sees what those interleavings touch);
# - GCC, TSan;
# - clang 14, libFuzzer with ASan+UBSan: each target of tests/fuzz for 20 s from its seed corpus;
# - GCC, the normal (RelWithDebInfo) build: the benchmark guard, then the whole suite with the
#   C API and Python tests.
# GCC and clang each compile everything with warnings as errors.
if [ "${LIM_SANITIZERS:-1}" != 0 ]; then
  # The compiler is named, not taken from CC/CXX: an existing build dir configured with the other
  # compiler is then reconfigured from scratch instead of silently keeping it.
  asan_cc=(-DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14)
  [ "${LIM_CLANG:-1}" != 0 ] || asan_cc=(-DCMAKE_C_COMPILER=gcc -DCMAKE_CXX_COMPILER=g++)
  # Line tables only (-g1): a sanitizer's report still names file and line, and line tables
  # cost less to compile than full debug info (15-20% of a test file's compile under clang).
  build build/asan "${asan_cc[@]}" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_FLAGS_DEBUG=-g1 \
    -DCMAKE_CXX_FLAGS_DEBUG=-g1 -DLIM_SANITIZE=address,undefined -DLIM_RACE_WIDEN=ON \
    -DLIM_BUILD_BENCHMARKS=OFF
  ctest --test-dir build/asan --output-on-failure -j"$ctest_jobs"
  # TSan at -O1, as its documentation suggests: optimized enough that the tests' hot loops race as
  # they do in the release build; the build took 221 s against 261 s at -O2 -g (2 cores).
  tsan_flags="-O1 -g1 -DNDEBUG"
  build build/tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_FLAGS_RELWITHDEBINFO="$tsan_flags" \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="$tsan_flags" -DLIM_SANITIZE=thread -DLIM_BUILD_BENCHMARKS=OFF
  # TSan cannot follow the futexes and shared pages between processes; it checks each process's
  # own threads. halt_on_error makes a report fail the test.
  TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" \
    ctest --test-dir build/tsan --output-on-failure -j"$ctest_jobs"
fi

if [ "${LIM_CLANG:-1}" != 0 ]; then
  CC=clang-14 CXX=clang++-14 build build/fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DLIM_BUILD_BENCHMARKS=OFF -DLIM_FUZZ=ON -DLIM_SANITIZE=address,undefined
  ctest --test-dir build/fuzz --output-on-failure -j"$jobs"
fi

build build/release -DCMAKE_BUILD_TYPE=RelWithDebInfo

# The regression guard: lim's key ratios to the floor and to a robust mutex, printed so that a
# slowdown shows in the log. It never fails on a slow figure, only if it cannot run. It runs
# before the last suite so that ctest's summary ends the output.
build/release/bench/lim_suite guard

# Includes `c_api` (lim.h from C11) and `python` (pytest over python/ with this build's liblim;
# the sanitizer builds skip it, as Python cannot load a sanitized liblim without preloading).
ctest --test-dir build/release --output-on-failure -j"$ctest_jobs"
