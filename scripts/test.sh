#!/usr/bin/env bash
# The project's test command (README.md names it; .ci/run only calls it).
#
# Installs what the tests need when it is missing (redis-server, redis-tools, mosquitto,
# mosquitto-clients, nodejs and npm, with apt-get, through sudo when not root; then the
# clustered broker's packages, with npm ci --prefix deploy/aedes), checks
# formatting, runs go vet, then runs every test with the race detector against real
# parts: a throwaway redis-server on a free loopback port (unless REDIS_URL is already
# set), mosquitto and mosquitto_sub, and node for the JavaScript vectors check. Nothing
# is skipped: a tool that is missing and cannot be installed is a failure.
# SEALCAST_NO_INSTALL=1 installs nothing; SEALCAST_REQUIRE_TOOLS=0 then lets the tests
# that need a missing tool skip instead.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
command -v mosquitto >/dev/null || need+=(mosquitto)
command -v mosquitto_sub >/dev/null || need+=(mosquitto-clients)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm) # deploy/aedes's packages (npm ci below)
command -v promtool >/dev/null || need+=(prometheus) # promtool lints /metrics
command -v chromium >/dev/null || need+=(chromium)   # the dashboard's browser test
if [ ${#need[@]} -gt 0 ] && [ "${SEALCAST_NO_INSTALL:-}" != 1 ]; then
	if command -v apt-get >/dev/null; then
		sudo=""
		if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
		echo "test.sh: installing ${need[*]} (apt-get; set SEALCAST_NO_INSTALL=1 to stop this)"
		export DEBIAN_FRONTEND=noninteractive
		$sudo apt-get update -qq
		$sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
	else
		echo "test.sh: missing ${need[*]}, and no apt-get to install them: install them, or run with SEALCAST_NO_INSTALL=1 SEALCAST_REQUIRE_TOOLS=0 to skip the tests that need them" >&2
		exit 1
	fi
fi
# The clustered broker (deploy/aedes, internal/testkit/aedestest) needs its npm packages;
# npm ci replaces node_modules whenever package-lock.json is newer.
if [ ! -d deploy/aedes/node_modules ] || [ deploy/aedes/package-lock.json -nt deploy/aedes/node_modules ]; then
	if [ "${SEALCAST_NO_INSTALL:-}" != 1 ] && command -v npm >/dev/null; then
		echo "test.sh: npm ci --prefix deploy/aedes (set SEALCAST_NO_INSTALL=1 to stop this)"
		npm ci --prefix deploy/aedes --no-audit --no-fund --silent
		touch deploy/aedes/node_modules
	else
		echo "test.sh: deploy/aedes/node_modules is missing or older than package-lock.json: the aedes tests need npm ci --prefix deploy/aedes" >&2
	fi
fi
export SEALCAST_REQUIRE_TOOLS="${SEALCAST_REQUIRE_TOOLS:-1}"

tmp="$(mktemp -d)"
redis_pid=""
cleanup() {
	if [ -n "$redis_pid" ] && ! kill -0 "$redis_pid" 2>/dev/null; then
		echo "test.sh: the shared redis-server exited during the tests; its log:" >&2
		cat "$tmp/redis.log" >&2 || true
	fi
	if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; fi
	rm -rf "$tmp"
}
trap cleanup EXIT

# free_port prints a TCP port on 127.0.0.1 that nothing listens on.
free_port() {
	local p
	for _ in $(seq 1 100); do
		p=$((20000 + RANDOM % 40000))
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
	done
	echo "no free port found" >&2; return 1
}

if [ -z "${REDIS_URL:-}" ]; then
	if command -v redis-server >/dev/null; then
		# A port free when chosen can be taken before redis-server binds it (by another
		# server's cluster bus, say): try another until one serves.
		for attempt in 1 2 3 4 5; do
			port="$(free_port)"
			redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
				--dir "$tmp" --daemonize no --loglevel warning >"$tmp/redis.log" 2>&1 &
			redis_pid=$!
			for _ in $(seq 1 50); do
				if ! kill -0 "$redis_pid" 2>/dev/null; then break; fi
				if redis-cli -p "$port" ping 2>/dev/null | grep -q PONG; then break 2; fi
				sleep 0.1
			done
			echo "test.sh: redis-server on port $port did not start (attempt $attempt):" >&2
			cat "$tmp/redis.log" >&2
			kill "$redis_pid" 2>/dev/null || true
			wait "$redis_pid" 2>/dev/null || true
			redis_pid=""
		done
		if [ -z "$redis_pid" ]; then echo "test.sh: could not start the shared redis-server" >&2; exit 1; fi
		export REDIS_URL="redis://127.0.0.1:$port/0"
		echo "test.sh: redis-server on $REDIS_URL"
	elif [ "${SEALCAST_REQUIRE_TOOLS:-}" = 1 ]; then
		echo "test.sh: redis-server not found (apt-get install -y redis-server)" >&2; exit 1
	else
		echo "test.sh: redis-server not found; Redis tests will be skipped" >&2
	fi
fi

unformatted="$(gofmt -l .)"
if [ -n "$unformatted" ]; then echo "gofmt needed on:" >&2; echo "$unformatted" >&2; exit 1; fi

go vet ./...
# The benchmark tools are their own module (scripts/bench/go.mod).
(cd scripts/bench && go vet ./...)

# A second, independent implementation (JavaScript, written from docs/PROTOCOL.md alone)
# checks the protocol's test vectors.
if command -v node >/dev/null; then
	node --test scripts/interop/check-vectors.mjs
elif [ "${SEALCAST_REQUIRE_TOOLS:-}" = 1 ]; then
	echo "test.sh: node not found (apt-get install -y nodejs)" >&2; exit 1
fi

go test -race -count=1 -timeout 30m ./... "$@"

# The benchmark tools' smoke test (50 devices through the real binary, about 20 s), once,
# when the whole suite runs.
if [ $# -eq 0 ]; then
	(cd scripts/bench && go test -count=1 -timeout 10m ./...)
fi
