// Package broker embeds the mochi-mqtt server as Sealcast's MQTT broker, made safe and
// durable: devices and accounts authenticate, the access rules of PROTOCOL.md 9 are
// enforced, and sessions and retained messages survive a restart.
//
// # Use
//
//	b, err := broker.New(broker.Options{AuthKey: root.BrokerAuth(), DataDir: dir, Accounts: accts})
//	...
//	err = b.Start()
//	defer b.Close()
//
// New binds the listeners (Addr reports the ports), Start accepts connections, Close
// disconnects everyone and waits. The library reads no flags or environment.
//
// # Authentication ([SC-3.5], [SC-9.3])
//
//   - Accounts (admin, monitor, updater) are bcrypt-hashed users from an accounts file
//     (LoadAccounts, SaveAccounts, AddAccountToFile) or added in memory (AddAccount).
//     Account usernames take precedence over serials.
//   - Devices use username = client id = serial and the password derived from the broker
//     key A, checked in constant time; or, on the TLS listener with Options.ClientCAPEM, a
//     client certificate whose subject CN is the serial. The client id must equal the
//     serial, so no client can take over another device's session. Revoke refuses a
//     deprovisioned serial, also after a restart (DataDir/revoked.json).
//   - Refusals answer CONNACK 0x04 (bad user name or password) or 0x05 (not authorized)
//     and are logged with a reason, never with the password.
//
// # Access rules ([SC-9.2])
//
// Allowed is the whole policy, a pure function with a table test. Subscription filters
// are judged as filters, $share/{group}/{filter} by its filter, and will topics at
// CONNECT (mochi publishes wills unchecked).
//
// # Durability and limits
//
// With Options.DataDir, mochi's pebble storage hook keeps sessions, subscriptions, queued
// QoS 1 deliveries and retained messages, with synced writes. Limits and the reasons for
// their defaults are in docs/BROKER.md; Stats reports drops and refusals.
//
// A Broker is safe for concurrent use.
package broker
