package device

import (
	"sync/atomic"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// EventKind says what happened in an Event.
type EventKind int

// Event kinds, in roughly the order of an update.
const (
	EventConnected     EventKind = iota + 1 // a connection is up (Attempt counts them)
	EventDisconnected                       // the connection was lost (Err says why)
	EventKeyMessage                         // a key message was received
	EventManifestFetch                      // subscribed to the manifest
	EventChunkFetch                         // subscribed to chunk Index (Try counts from 1)
	EventChunkReceived                      // chunk Index arrived
	EventChunkBad                           // chunk Index failed to open [SC-4.2]
	EventChunkDone                          // chunk Index opened and was written to the install
	EventCommitted                          // the installer committed the image
	EventPersisted                          // the vault holds D = Seq, Version
	EventAckSent                            // an ack (kind 1 or 2) was published
	EventReportSent                         // a report (kind 3) with Code was published
	EventConfirmed                          // a receipt confirmed the last ack
	EventFailed                             // the update failed with Code (Err says why)
	EventKeyRotated                         // a key statement made release key Index current [SC-5.3]
	EventPrefetched                         // every chunk of Release is kept ahead of its key [SC-9.9]
)

var eventNames = [...]string{"", "connected", "disconnected", "key_message", "manifest_fetch",
	"chunk_fetch", "chunk_received", "chunk_bad", "chunk_done", "committed", "persisted",
	"ack_sent", "report_sent", "confirmed", "failed", "key_rotated", "prefetched"}

func (k EventKind) String() string {
	if int(k) < len(eventNames) && k > 0 {
		return eventNames[k]
	}
	return "unknown"
}

// Event is one observable step of the agent, for tests, simulators and metrics.
type Event struct {
	Kind    EventKind
	Serial  string
	Release keychain.ReleaseID
	Index   uint32 // chunk index
	Try     int    // fetch attempt of the chunk, from 1
	Seq     uint32 // the device's sequence number D after the event
	Version uint64
	Code    protocol.Code
	Err     error
	Time    time.Time
}

// Stats are the agent's counters since New. All fields only grow.
type Stats struct {
	Connects       uint64
	Disconnects    uint64
	KeyMessages    uint64
	ChunkFetches   uint64 // chunk subscriptions, including re-fetches
	ChunksBad      uint64
	ChunksDone     uint64
	Installs       uint64 // images committed (with a TrialInstaller: confirmed healthy)
	AcksSent       uint64 // including re-sends
	ReportsSent    uint64
	Confirmed      uint64
	StatePublishes uint64
	SubRetries     uint64 // subscriptions sent again after the broker refused them
	Retries        uint64 // transient failures tried again while connected
	Trials         uint64 // switches to an image on trial [SC-10.5]
	Unhealthy      uint64 // trials that failed: back on the previous image
}

type counters struct {
	connects, disconnects, keyMessages, chunkFetches, chunksBad, chunksDone,
	installs, acksSent, reportsSent, confirmed, statePublishes, subRetries, retries, trials, unhealthy atomic.Uint64
}

func (c *counters) snapshot() Stats {
	return Stats{
		Connects: c.connects.Load(), Disconnects: c.disconnects.Load(), KeyMessages: c.keyMessages.Load(),
		ChunkFetches: c.chunkFetches.Load(), ChunksBad: c.chunksBad.Load(), ChunksDone: c.chunksDone.Load(),
		Installs: c.installs.Load(), AcksSent: c.acksSent.Load(), ReportsSent: c.reportsSent.Load(),
		Confirmed: c.confirmed.Load(), StatePublishes: c.statePublishes.Load(), SubRetries: c.subRetries.Load(),
		Retries: c.retries.Load(), Trials: c.trials.Load(), Unhealthy: c.unhealthy.Load(),
	}
}

// Faults injects failures, for tests and the simulator. The zero value injects nothing.
// Real devices leave it zero.
type Faults struct {
	// DropAfterChunk, if set, is called after chunk i was written to the install and the
	// window moved on; returning true force-closes the network connection (no MQTT
	// DISCONNECT, so the broker publishes the will), as a flaky link would.
	DropAfterChunk func(i uint32) bool
	// CrashAfterInstall makes Run return ErrCrashed after the installer committed and
	// before the vault is written: a power loss before [SC-10.1] step 5.
	CrashAfterInstall bool
	// CrashAfterPersist makes Run return ErrCrashed after the vault was written and
	// before the ack is published: a power loss between steps 5 and 6.
	CrashAfterPersist bool
	// AckDelay delays the first publication of every new ack.
	AckDelay time.Duration
	// Crash, if set, is asked at every crash point with the release (or re-key id) being
	// processed and, for CrashDownloading, the chunk index; returning true makes Run
	// return ErrCrashed there. Unlike the two bools above it can choose per release,
	// which long simulations need.
	Crash func(p CrashPoint, release keychain.ReleaseID, chunk uint32) bool
}

// CrashPoint names a moment at which Faults.Crash can cut the power.
type CrashPoint int

// Crash points, in the order of an update.
const (
	// CrashDownloading: chunk i was written to the open install, the image is not
	// complete. After the reboot the download starts again from chunk 0.
	CrashDownloading CrashPoint = iota + 1
	// CrashInstalled: the installer committed; the vault still holds D = n (before
	// [SC-10.1] step 5). The update is redone after the reboot.
	CrashInstalled
	// CrashPersisted: the vault holds D = n-1 and the ack; the ack was not published
	// (between steps 5 and 6). The ack is sent after the reboot.
	CrashPersisted
	// CrashStaged: with a TrialInstaller, the trial is recorded in the vault and the
	// switch to the new image not made yet [SC-10.5]. After the reboot the device
	// switches to it.
	CrashStaged
	// CrashTrial: the image runs on trial and this start was counted; its health check
	// has not run. After the reboot the device counts another start and checks it.
	CrashTrial
	// CrashHealthy: the image on trial passed its health check; the vault still holds
	// the trial (before [SC-10.5] step 4's write). After the reboot it is checked again.
	CrashHealthy
)

var crashPointNames = [...]string{"", "downloading", "installed", "persisted", "staged", "trial", "healthy"}

func (p CrashPoint) String() string {
	if int(p) < len(crashPointNames) && p > 0 {
		return crashPointNames[p]
	}
	return "unknown"
}
