#!/usr/bin/env bash
# The benchmark command: builds a Release build in build/bench, starts a private redis-server
# (127.0.0.1, a random port, persistence off), runs every scenario of bench/suite and the
# callgrind breakdown, and regenerates docs/benchmarks.md (from docs/benchmarks.in.md, whose
# hand-written analysis it keeps) and the plots in docs/plots/.
#
#   scripts/bench.sh            the full run (~10 minutes on 2 cores)
#   scripts/bench.sh --quick    fewer points and shorter runs (~1-2 minutes); same document
#
# Exits non-zero if a step cannot run; a slow figure is never a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

quick=()
mode="full"
if [ "${1:-}" = "--quick" ]; then quick=(--quick); mode="quick"; fi
command_line="scripts/bench.sh${1:+ $1}"

scripts/install-deps.sh

# Release, but -O2: GCC 12's -O3 reports a false -Wrestrict in lib/src/segment.cpp, and -O2 is
# what distributions build packages with.
cmake -S . -B build/bench -G Ninja -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_FLAGS_RELEASE=-O2 -DNDEBUG" \
  -DLIM_WERROR=ON -DLIM_BUILD_TESTS=OFF -DLIM_BUILD_TOOLS=OFF -DLIM_BUILD_BENCHMARKS=ON >/dev/null
cmake --build build/bench -j"$(nproc)" --target lim_suite recovery_bench
suite=build/bench/bench/lim_suite
# The same with liblim static, to price the calls through the shared library.
cmake -S . -B build/bench-static -G Ninja -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_FLAGS_RELEASE=-O2 -DNDEBUG" \
  -DLIM_WERROR=ON -DLIM_BUILD_TESTS=OFF -DLIM_BUILD_TOOLS=OFF -DLIM_BUILD_BENCHMARKS=ON -DLIM_SHARED=OFF >/dev/null
cmake --build build/bench-static -j"$(nproc)" --target lim_suite

out=$(mktemp -d)
redis_pid=""
cleanup() {
  if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; fi
  rm -rf "$out"
}
trap cleanup EXIT

# --- Redis 7: a private server for the GCRA baseline ---------------------------------------
port=$(( 20000 + RANDOM % 20000 ))
redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no --daemonize no \
  --dir "$out" --logfile "$out/redis.log" &
redis_pid=$!
for _ in $(seq 50); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
redis-cli -p "$port" ping >/dev/null || { echo "bench.sh: redis-server did not start" >&2; exit 1; }
redis_version=$(redis-server --version | sed 's/.*v=\([0-9.]*\).*/\1/')

# --- the scenarios --------------------------------------------------------------------------
"$suite" "${quick[@]}" --out "$out" --redis-port "$port" --command "$command_line" all

kill "$redis_pid"; wait "$redis_pid" 2>/dev/null || true; redis_pid=""

# --- the ledger's own cost (bench/recovery_bench.cpp reaches the internals to run the same CAS
# loop with and without the ledger protocol) -------------------------------------------------
build/bench/bench/recovery_bench --benchmark_filter=AcquireRelease --benchmark_repetitions=5 \
  --benchmark_min_time=$([ "$mode" = quick ] && echo 0.05 || echo 0.3) \
  --benchmark_report_aggregates_only=true --benchmark_format=csv 2>/dev/null >"$out/ledger.csv"
{
  echo "| semaphore acquire + release, one process | CPU ns (median of 5) | ÷ no ledger |"
  echo "|---|---:|---:|"
  awk -F, '/_median"?,/ { name=$1; gsub(/"/, "", name); sub(/_median$/, "", name);
             t[name]=$4; order[n++]=name }
           END { base=t["BM_AcquireRelease_NoLedger"];
                 desc["BM_AcquireRelease_NoLedger"]="the CAS loops on the semaphore word, no ledger";
                 desc["BM_AcquireRelease_WithLedger"]="the same with the ledger protocol (announce, CAS, record, withdraw)";
                 desc["BM_AcquireRelease_PublicSemaphore"]="the public lim::Semaphore try_acquire + release";
                 for (i=0; i<n; i++) printf "| %s | %.1f | %.2f× |\n", desc[order[i]], t[order[i]], t[order[i]]/base }' "$out/ledger.csv"
  echo
  echo "*Machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, Linux $(uname -r). Command: \`$command_line\` (bench/recovery_bench). Date: $(date -u '+%Y-%m-%d %H:%M UTC').*"
} >"$out/ledger.md"

# --- shared vs static liblim: the lim rows again, alternating the two builds twice ----------
mkdir -p "$out/shared1" "$out/static1" "$out/shared2" "$out/static2"
for i in 1 2; do
  "$suite" "${quick[@]}" --out "$out/shared$i" lim_only
  build/bench-static/bench/lim_suite "${quick[@]}" --out "$out/static$i" lim_only
done
{
  echo "| family | liblim shared (PLT) | liblim static | shared ÷ static |"
  echo "|---|---:|---:|---:|"
  paste "$out/shared1/lim_only.tsv" "$out/shared2/lim_only.tsv" "$out/static1/lim_only.tsv" "$out/static2/lim_only.tsv" |
    awk -F'\t' '{ sh = ($2 < $4 ? $2 : $4); st = ($6 < $8 ? $6 : $8);
                  printf "| %s | %.1f ns | %.1f ns | %.2f× |\n", $1, sh, st, sh / st }'
  echo
  echo "*The better of two alternating runs of each build. Machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, Linux $(uname -r). Command: \`$command_line\`. Date: $(date -u '+%Y-%m-%d %H:%M UTC').*"
} >"$out/libcall.md"

# --- the instruction breakdown: callgrind counts instructions reproducibly (perf's counters are
# not available in every VM). One op's instructions = (the run of 2N ops - the run of N) / N, in
# total and per function (bench/suite/callgrind_breakdown.py).
calls=$([ "$mode" = quick ] && echo 10000 || echo 50000)
breakdown="$out/breakdown.md"
{
  echo "| family | implementation | instructions per op | where they go (self instructions per op, by function) |"
  echo "|---|---|---:|---|"
  families="Semaphore WeightedSemaphore Dispatch TokenBucket Throttle ThrottledRateLimiter Limiter"
  kinds="lim floor mutex"
  if [ "$mode" = quick ]; then families="Semaphore Dispatch TokenBucket Throttle"; kinds="lim"; fi
  for fam in $families; do
    for kind in $kinds; do
      for n in "$calls" $((2 * calls)); do
        valgrind --tool=callgrind --callgrind-out-file="$out/cg.$n" "$suite" op "$fam" "$kind" "$n" \
          >/dev/null 2>"$out/cg.log" || { cat "$out/cg.log" >&2; exit 1; }
      done
      python3 bench/suite/callgrind_breakdown.py "$fam" "$kind" "$calls" "$out/cg.$calls" "$out/cg.$((2 * calls))"
    done
  done
  echo
  echo "*Machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, Linux $(uname -r). Command: \`$command_line\` (valgrind --tool=callgrind on \`lim_suite op FAMILY KIND N\`). Date: $(date -u '+%Y-%m-%d %H:%M UTC').*"
} >"$breakdown"

# --- plots ----------------------------------------------------------------------------------
mkdir -p docs/plots
rm -f docs/plots/*.png
( cd docs/plots && gnuplot -e "set terminal pngcairo noenhanced size 800,480 font 'sans,10'; set key left top; set grid" "$out/plots.gp" )

# --- the document ---------------------------------------------------------------------------
machine=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
{
  echo "<!-- Generated by scripts/bench.sh from docs/benchmarks.in.md: edit that file, then rerun. -->"
  while IFS= read -r line; do
    case "$line" in
      @@HEADER@@)
        echo "Generated by \`$command_line\` ($mode mode) on $(date -u '+%Y-%m-%d %H:%M UTC'):"
        echo "$machine, $(nproc) cores, Linux $(uname -r); GCC $(gcc -dumpfullversion),"
        echo "Release (-O2), liblim shared; Redis $redis_version. Each table repeats the machine, command and date." ;;
      @@*@@)
        name=${line#@@}; name=${name%@@}
        if [ -f "$out/$name.md" ]; then cat "$out/$name.md"; else echo "(not generated)"; fi ;;
      *) echo "$line" ;;
    esac
  done <docs/benchmarks.in.md
} >docs/benchmarks.md.new
mv docs/benchmarks.md.new docs/benchmarks.md
echo "bench.sh: wrote docs/benchmarks.md and docs/plots/ ($mode mode)"
