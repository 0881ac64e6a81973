#!/usr/bin/env bash
# The updater's speed (docs/BENCHMARKS.md, "Updater"), through real parts on loopback:
#
#   BenchmarkFanout  release.create to every wrapped key acknowledged by the broker, for
#                    10,000 and 100,000 provisioned devices, bbolt and Redis stores; beside
#                    it, in the same run, one paho client publishing as many retained QoS 1
#                    messages (raw-pub/s) and SHA-256 chain steps on one core (step/s).
#   BenchmarkAcks    50,000 valid acks over MQTT to receipts published, Redis store; beside
#                    it the same Advance script under redis-benchmark (lua/s, lua-P16/s).
#
# Usage:
#   scripts/bench-updater.sh                  # COUNT=3 runs, two iterations each
#   COUNT=6 OUT=after.txt scripts/bench-updater.sh
#   benchstat before.txt after.txt            # go install golang.org/x/perf/cmd/benchstat@latest
#   BENCH='BenchmarkFanout/devices=10000$' COUNT=1 scripts/bench-updater.sh
#
# Needs redis-server and redis-benchmark on PATH (apt-get install -y redis-server). The
# figures move with the machine's load: compare the x-* ratios, which are measured in the
# same run, and repeat.
set -euo pipefail
cd "$(dirname "$0")/.."

count="${COUNT:-3}"
bench="${BENCH:-Benchmark(Fanout|Acks)}"
out="${OUT:-}"
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT

echo "bench-updater: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), $(go version | cut -d' ' -f3)" >&2
# -benchtime 2x: two releases (or two rounds of acks) per setup; -count: independent setups.
go test -run '^$' -bench "$bench" -benchtime "${BENCHTIME:-2x}" -count "$count" -timeout 60m ./updater/ |
	tee "$tmp" | grep -E '^(goos|goarch|pkg|cpu|Benchmark|FAIL|ok|---)' || true
if grep -q '^FAIL' "$tmp"; then
	echo "bench-updater: a benchmark failed; full output:" >&2
	cat "$tmp" >&2
	exit 1
fi
if [ -n "$out" ]; then cp "$tmp" "$out"; fi
benchstat="$(command -v benchstat || echo "$(go env GOPATH)/bin/benchstat")"
if [ -x "$benchstat" ]; then
	echo
	"$benchstat" "$tmp"
fi
