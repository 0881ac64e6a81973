// Package scaleout holds tests, and nothing else, of the updater run the way operators
// scale it: as `sealcast serve` processes against an external MQTT broker (a real
// Mosquitto) and a shared Redis. The tests build the sealcast binary, start it as a child
// process, kill it with SIGKILL in the middle of a release, run two of them sharing the
// ack load, and connect it to a broker over TLS.
//
// Run them with
//
//	go test -race -count=1 ./tests/scaleout/
//
// They need mosquitto and redis-server, and skip without them (fail under
// SEALCAST_REQUIRE_TOOLS=1).
package scaleout
