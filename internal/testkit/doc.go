// Package testkit holds nothing itself: its subpackages are the test harnesses that
// start real parts on loopback for the tests (a broker, redis-server, mosquitto, aedes
// cluster nodes, a certificate authority, devices, an updater over either store, a
// byte-flipping proxy) and the contract suite every updater.Bus passes. Production code
// never imports them; its own helpers are internal/atomicfile and internal/datadir.
package testkit
