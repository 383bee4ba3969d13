#!/usr/bin/env bash
# Builds lim and runs the demo: forked workers sharing limits through one live segment.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build/release -j"$(nproc)" --target lim-demo limctl
exec build/release/tools/demo/lim-demo "$@"
