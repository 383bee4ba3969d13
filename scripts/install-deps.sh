#!/usr/bin/env bash
# Installs the Debian packages lim needs to build, test and benchmark. Idempotent: when every
# package is present it does nothing (and needs no network, nor root).
set -euo pipefail

packages=(
  g++ cmake ninja-build pkgconf git
  libboost-dev        # Boost.Interprocess: the shared-memory object and its mapping
  libfmt-dev          # text formatting
  doctest-dev         # tests
  libcli11-dev        # limctl's command line
  nlohmann-json3-dev  # limctl --json
  libtomlplusplus-dev # limctl create --config
  libbenchmark-dev    # bench/
  tmux                # the limctl watch test drives a terminal
  clang-14            # the clang build and the libFuzzer targets (tests/fuzz)
  libclang-rt-14-dev  # libFuzzer and the sanitizer runtimes for clang
  python3             # the Python package (python/) and its tests
  python3-pip         # pip install ./python (offline; tests/python/test_install.py)
  python3-setuptools  # builds the python/ package (pyproject.toml backend)
  python3-wheel       # pip builds a wheel of python/ before installing it
  python3-pytest      # tests/python, run by ctest as the `python` test
  python3-venv        # tests/python/test_install.py installs into a venv
  python3-gevent      # tests/python/test_gevent.py: blocking calls under gevent's monkey-patching
  libhiredis-dev      # lim-feeder's Redis client; bench/'s Redis GCRA baseline
  redis-server        # lim-feeder's global budget (tests/global starts one); bench's GCRA baseline
  faketime            # libfaketime: tests/global/clock_step_test.cpp steps Redis's clock (TIME)
  gnuplot-nox         # scripts/bench.sh: the plots in docs/plots/
  valgrind            # scripts/bench.sh: callgrind's instruction counts for the breakdown
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing: ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends "${missing[@]}"
