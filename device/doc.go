// Package device is the device side of Sealcast: an agent that a device's Go program
// embeds to receive encrypted updates over MQTT, following docs/PROTOCOL.md.
//
// # Parts
//
//   - [Vault] is the device's protected memory: serial, unit data, epoch, sequence number
//     D, installed version, release public key, broker credentials and the last ack
//     [SC-10.1]. [FileVault] keeps it in a crash-safe JSON file (mode 0600, temp file,
//     fsync, rename, fsync of the directory); [MemoryVault] keeps it in memory.
//     [StateFromDeviceFile] and [CreateFileVault] provision it from a device file [SC-14.1].
//   - [Installer] applies an image: [SlotInstaller] (A/B slot files and an atomically
//     switched "active" pointer) and [CommandInstaller] (a program reading the image on
//     standard input or from a file).
//   - [Agent] connects, takes key messages, downloads and verifies releases, installs,
//     persists and acks them.
//
// # The update, step by step
//
// The agent connects with clean session off, client id and username = serial and an
// "offline" will on its presence topic; after CONNACK it publishes "online", subscribes
// to its key and receipt topics and re-sends an unconfirmed ack [SC-9.3]. On a key
// message it follows [SC-10.1]: an ack it already sent is re-sent, a stale key is
// reported, otherwise K_n is derived and the secret opened; a release's manifest is
// fetched and checked (digest, signature, release id, version > installed), then the
// chunks are fetched through a window of W subscriptions [SC-9.4], opened in order and
// streamed to the installer, so memory is W chunks however large the image. After the
// manifest hashes match the installer commits; then the vault is written at once with
// D = n-1, the version and the ack; then the ack is published and re-sent (on reconnect
// and on a doubling timer) until a receipt with a valid MAC confirms it. Any failure is
// reported (kind 3 ack with a code, MAC under K_n) and D does not move.
//
// Every SUBACK is checked: a subscription the broker refused (0x80, or 0x91 "packet
// identifier in use", which some brokers send when a SUBSCRIBE reuses the id of a
// delivery still in flight) is sent again after a short jittered delay [SC-10.1a].
//
// A disconnect in the middle of a download keeps the decryptor and the open install in
// memory; after the reconnect the agent subscribes again only to the window chunks that
// had not arrived. A restart of the process starts the download again (the protocol's
// SHOULD about persisting progress is not implemented yet).
//
// # Concurrency
//
// Run owns every goroutine the agent starts: paho's, which only queue messages for the
// agent's goroutine and never block, the agent's own loop, and one short-lived goroutine
// per SUBSCRIBE waiting for its SUBACK. Run returns after they
// stop. Stats and Serial may be called from any goroutine; Options.OnEvent is called on
// the agent's goroutine.
//
// # Testing and simulation
//
// [Faults] injects a dropped link, a power loss after the install or after the vault
// write, and delayed acks. Package simulate runs thousands of agents in one process.
package device
