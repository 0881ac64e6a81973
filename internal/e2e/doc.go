// Package e2e holds end-to-end tests of the device agent against the real updater: a real
// broker (internal/brokertest) on 127.0.0.1, the updater with both stores (boltstore, and
// redisstore on a real redis-server), the operator client driving it through the admin
// protocol, and real device agents (package device, and fleets of them through
// device/simulate) connecting over TCP with paho.
//
// The device package's own tests run the agent against a simplified test updater,
// because device may not import updater; the tests here close that gap. They cover a
// fleet taking two releases and a chain running out into a re-key, a connection dropped
// in the middle of a download, power losses at each step of [SC-10.1], and the rejections
// a device reports (a tampered chunk, a manifest with a broken signature, a downgrade),
// checked on both sides: the device's vault and the updater's store, receipts and status
// topics.
//
// The package has no code besides this comment; everything is in its _test.go files.
package e2e
