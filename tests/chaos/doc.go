// Package chaos is the end-to-end fault suite (issue 7). It holds only tests: `go test
// ./tests/chaos` builds cmd/sealcast, runs `sealcast serve` as a separate process on
// 127.0.0.1 with its store in a real redis-server (append-only file on), and updates a
// fleet of simulated devices (device/simulate, in the test process) while it breaks
// things:
//
//   - the serve process is killed with SIGKILL in the middle of a release and started
//     again on the same data directory and the same Redis;
//   - Redis is killed and started again on the same port and directory;
//   - 10 % of the other devices lose their connection in the middle of the download;
//   - some devices sit behind internal/testkit/mqttproxy, which flips one byte of the first chunk
//     it forwards to each of them: real bytes on a real socket;
//   - duplicate, forged and replayed acks are published with real device credentials.
//
// It then checks what PROTOCOL.md promises: every device installed each release exactly
// once and its counter moved exactly once per release, on the device and in the store; no
// chain index carried two releases or two content keys [SC-10.2]; every corrupted chunk
// failed authentication on the device and was fetched again [SC-4.2, SC-9.4]; and the
// server's /metrics counted exactly the acks that were injected.
//
// # Running
//
// The suite needs redis-server; without it the test skips, and fails under
// SEALCAST_REQUIRE_TOOLS=1 (as CI runs). The serve binary is built without the race
// detector; the devices, proxy and checks in the test process run under -race when the
// test does. The fleet size is SEALCAST_CHAOS_DEVICES (default 500);
// SEALCAST_CHAOS_LOGS=dir keeps the serve process's logs there. Every wait has a
// deadline, the whole test one of 160 s, and every process and goroutine the suite starts
// is stopped when it ends. On a loaded 2-core machine it takes 20 to 50 s under -race,
// plus the build.
package chaos
