#!/usr/bin/env bash
# Two "hosts" on this machine share one global rate through Redis: a redis-server, two segments
# each with its own lim-feeder, two groups of workers; then the bound is checked over all of
# them (docs/global.md, "Try it").   scripts/global-demo.sh [BUILD_DIR]
# BUILD_DIR defaults to build/rel (docs/global.md's build), else build/release (scripts/demo.sh's).
set -euo pipefail
build=${1:-}
if [ -z "$build" ]; then
  build=build/rel
  [ -x "$build/tools/feeder/lim-feeder" ] || [ ! -d build/release ] || build=build/release
fi
feeder=$build/tools/feeder/lim-feeder
worker=$build/tools/feeder/lim-global-worker
limctl=$build/tools/limctl/limctl
for b in "$feeder" "$worker" "$limctl"; do
  [ -x "$b" ] || { echo "build first: cmake --build $build --target lim-feeder lim-global-worker limctl"; exit 2; }
done
command -v redis-server >/dev/null || { echo "redis-server is not installed (scripts/install-deps.sh)"; exit 2; }

dir=$(mktemp -d /tmp/lim-global-demo.XXXXXX)
port=$((20000 + RANDOM % 20000))
pids=()
cleanup() {
  local status=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for h in 1 2; do "$limctl" rm "demo-host$h" >/dev/null 2>&1 || true; rm -f "/dev/shm/lim-feeder.demo-host$h.lock"; done
  if [ "$status" -eq 0 ]; then rm -rf "$dir"; else echo "logs kept in $dir" >&2; fi
}
trap cleanup EXIT

redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >"$dir/redis.log" 2>&1 &
pids+=($!)
until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done 2>/dev/null || sleep 0.5

for h in 1 2; do
  cat >"$dir/feeder$h.toml" <<EOT
[feeder]
segment = "demo-host$h"
redis = "redis://127.0.0.1:$port"
host = "host$h"
refresh = "100ms"
lease_ttl = "1s"
[global.my_api]
kind = "rate"
burst_size = 20
sustained_rate_per_sec = 50
EOT
  "$feeder" --config "$dir/feeder$h.toml" 2>>"$dir/feeder$h.log" &
  pids+=($!)
done
sleep 2.5   # a fresh global key grants nothing for lease_ttl + grace (2 s)

echo "host1: 6 workers, host2: 2 workers, 5 s, one global limit of burst 20 + 50/s"
"$worker" run demo-host1 my_api 20 50 5 6 "$dir/host1" &
w1=$!
"$worker" run demo-host2 my_api 20 50 5 2 "$dir/host2" &
w2=$!
sleep 2.5
"$limctl" leases demo-host1
"$limctl" leases demo-host2
wait $w1 $w2
echo "host1 admitted $(cat "$dir"/host1.* | wc -l), host2 admitted $(cat "$dir"/host2.* | wc -l)"
"$worker" check 20 50 "$dir"/host1.* "$dir"/host2.*
