#!/bin/bash
# A/B of two (or more) idmatch-proxy binaries: CPU per request at full load, interleaved.
#
#   benches/ab.sh ROUNDS BINARY_A BINARY_B ...
#
# Each round starts each binary in turn on core 1 (one worker; RUST_LOG=warn unless set, JSON
# lines to /dev/null), warms it for 2 s, then drives it with `wrk -t1 -c64` for SECS seconds
# (default 10) from core 0 against the upstream stub of the last `cargo bench --bench e2e` run
# (target/tmp/e2e), and prints its user and system CPU per request from /proc/<pid>/stat. Interleaving is what makes two builds
# comparable on a VM whose kernel share moves by ±10 % between runs (benches/README.md).
set -eu
E2E="$(cd "$(dirname "$0")/.." && pwd)/target/tmp/e2e"
[ -f "$E2E/upstream.conf" ] || { echo "run 'cargo bench --bench e2e' once first (it writes $E2E)"; exit 1; }
ROUNDS=$1
shift
pkill -f "nginx -c $E2E/upstream.conf" 2>/dev/null || true
taskset -c 0 nginx -c "$E2E/upstream.conf" -e "$E2E/upstream.err" 2>/dev/null &
trap 'pkill -f "nginx -c $E2E/upstream.conf" || true' EXIT
sleep 0.5
UPSTREAM_PORT=$(grep -oP 'listen 127.0.0.1:\K[0-9]+(?= ssl;)' "$E2E/upstream.conf")
export IDMATCH_LISTEN=127.0.0.1:18080 IDMATCH_ADMIN_LISTEN=127.0.0.1:18081 \
  IDMATCH_UPSTREAM_URL="https://localhost:$UPSTREAM_PORT/mobile-identity/v1" \
  IDMATCH_UPSTREAM_CA_FILE="$E2E/ca.pem" IDMATCH_KEY_ID=3b438437-04a4-40bb-8389-54bb02766fba \
  IDMATCH_SECRET_FILE="$E2E/secret" IDMATCH_WORKER_THREADS=1 IDMATCH_DRAIN_DELAY=0s \
  IDMATCH_SHUTDOWN_TIMEOUT=1s IDMATCH_RATE_LIMIT_INTERVAL=0s RUST_LOG="${RUST_LOG:-warn}"
TICKS=$(getconf CLK_TCK)
wrk_run() {
  taskset -c 0 wrk -t1 -c64 -d"$1" -s "$E2E/proxied.lua" http://127.0.0.1:18080/sim-swap
}
for round in $(seq "$ROUNDS"); do
  for binary in "$@"; do
    taskset -c 1 "$binary" 2>/dev/null &
    pid=$!
    for _ in $(seq 50); do curl -sf -o /dev/null http://127.0.0.1:18081/readyz && break; sleep 0.1; done
    wrk_run 2s >/dev/null
    read -r user0 sys0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    requests=$(wrk_run "${SECS:-10}s" | awk '/requests in/ {print $1}')
    read -r user1 sys1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    awk -v n="$requests" -v u=$((user1 - user0)) -v s=$((sys1 - sys0)) -v t="$TICKS" \
      -v b="$binary" -v r="$round" 'BEGIN {
        printf "round %d  %-36s %8d requests  CPU s/10k %.3f  user %.2f µs/req  system %.2f µs/req\n",
          r, b, n, (u + s) / t / n * 1e4, u / t / n * 1e6, s / t / n * 1e6 }'
  done
done
