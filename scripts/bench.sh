#!/usr/bin/env bash
# The benchmark suite behind docs/BENCHMARKS.md. Heavy (several minutes of both cores and
# a few GB of memory), so CI does not run it; CI runs its smoke test instead
# (scripts/bench/e2e/e2e_test.go). One command rewrites every figure in docs/bench/:
#
#   scripts/bench.sh          2,000 devices and a 1 MiB image end to end; 10,000 idle devices
#   scripts/bench.sh -short   50 devices and a 64 KiB image; 500 idle devices (a minute),
#                             written to .tmp/bench/ so that the committed figures stay
#
# BENCH_DEVICES, BENCH_BASELINE_DEVICES and BENCH_IDLE_CONNS override the counts.
# Output in docs/bench/: e2e.md (tables), e2e.csv and e2e.png (time to installed),
# pprof/*-top.txt (where the server's CPU went), idle-memory.txt. docs/BENCHMARKS.md
# explains them; copy the new figures there by hand.
# Needs: Go, mosquitto and mosquitto_passwd (else the Mosquitto scenario is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

out=docs/bench
devices="${BENCH_DEVICES:-2000}"
idle="${BENCH_IDLE_CONNS:-10000}"
short=()
if [ "${1:-}" = "-short" ]; then
	short=(-short)
	out=.tmp/bench
	devices="${BENCH_DEVICES:-50}"
	idle="${BENCH_IDLE_CONNS:-500}"
fi
mkdir -p "$out/pprof" bin

# Every device connection is a file descriptor in the server and in the simulator.
ulimit -n "$(ulimit -Hn)"

# 1. The binary under test, and the benchmark tool (scripts/bench/e2e).
go build -o bin/sealcast ./cmd/sealcast
(cd scripts/bench && go build -o ../../bin/bench-e2e ./e2e) # its own module

# 2. End to end, three scenarios one after another on fresh data directories: the
#    Sealcast envelope on the embedded broker, the per-device-image baseline, and the
#    envelope through an external Mosquitto. Writes e2e.md, e2e.csv, e2e.json, pprof/.
bin/bench-e2e "${short[@]}" -sealcast bin/sealcast -devices "$devices" \
	-baseline-devices "${BENCH_BASELINE_DEVICES:-$devices}" -out "$out"

# 3. Where the server's CPU went during each release: the profiles taken back to back
#    during the run, merged.
for s in envelope perdevice mosquitto; do
	profiles=("$out"/pprof/"$s"-cpu-*.pb.gz)
	[ -e "${profiles[0]}" ] || continue
	go tool pprof -top -cum -nodecount=60 bin/sealcast "${profiles[@]}" >"$out/pprof/$s-cpu-top.txt" 2>/dev/null
done

# 4. The plot of time to installed, one line per scenario.
root="$(pwd)"
(cd scripts/bench && go run ./plot -in "$root/$out/e2e.csv" -out "$root/$out/e2e.png")

# 5. Memory per idle device connection in the embedded broker (the clients are held by a
#    child process, so each side needs one descriptor per connection).
SEALCAST_HEAVY=1 SEALCAST_IDLE_CONNS="$idle" \
	go test -count=1 -run '^TestIdleConnectionMemory$' -v ./broker/ | grep -v '^=== RUN' | tee "$out/idle-memory.txt"

# 6. The updater's fan-out and ack rates (scripts/bench-updater.sh, its own section).
if [ ${#short[@]} -gt 0 ]; then
	echo "bench.sh: -short: skipping scripts/bench-updater.sh"
elif [ -f scripts/bench-updater.sh ]; then
	bash scripts/bench-updater.sh
else
	echo "bench.sh: scripts/bench-updater.sh is not on this branch yet; skipping the updater benchmark"
fi

echo "bench.sh: results in $out/ (e2e.md, e2e.png, pprof/*-top.txt, idle-memory.txt)"
