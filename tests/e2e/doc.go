// Package e2e holds end-to-end tests of the device agent against the real updater: a real
// broker (internal/testkit/brokertest) on 127.0.0.1, the updater with both stores (boltstore, and
// redisstore on a real redis-server), the operator client driving it through the admin
// protocol, and real device agents (package device, and fleets of them through
// device/simulate) connecting over TCP with paho. internal/testkit/updatertest starts the stack.
//
// The device package's own tests run the agent against a simplified test updater,
// because device may not import updater; the tests here close that gap:
//
//   - a fleet of 200 devices takes two releases, each with a fresh one-time key, and a
//     chain of 16 runs out into a re-key (fleet_test.go);
//   - a link dropped in the middle of a download, and power lost before the vault write,
//     before the ack and before the receipt (faults_test.go);
//   - a tampered chunk, a manifest with a broken signature and a downgrade, each reported
//     with its code and recorded by the updater (reject_test.go);
//   - the updater's store losing a confirmed counter move (resync_test.go).
//
// Every check looks at both sides: the device's vault and slots, and the updater's store,
// receipts and status topics.
//
// # Running
//
//	go test -race ./tests/e2e                              # about 20 s
//	SEALCAST_HEAVY=1 go test -race -run TestFleet ./tests/e2e  # 2,000 devices, minutes
//
// Tests that need redis-server skip without it (internal/testkit/redistest). The package has no
// code besides this comment; everything is in its _test.go files.
package e2e
