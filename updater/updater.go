// Package updater is the control server of Sealcast: it turns admin commands into
// releases (the image encrypted once, the content key wrapped for every target device
// under that device's one-time key), and moves each device's sequence counter when, and
// only when, that device's authenticated ack arrives (docs/PROTOCOL.md 10.2).
//
// # Wiring
//
// An Updater needs a [Store] (updater/redisstore or updater/boltstore), a [Bus] to an MQTT
// broker (updater/mqttbus over MQTT, or broker.Inline in-process), the fleet root secret
// and the release-signing key. Run subscribes to acks, admin requests and uploads, resumes
// the releases that were active when it last stopped, and returns when its context ends.
//
// # Scaling out
//
// Several updaters may share one store and one broker: give each the same AckGroup so the
// broker splits acks between them ($share subscriptions); the store's compare-and-set
// makes an ack processed twice move the counter once. Exactly one updater should handle
// admin requests (the others set AcksOnly).
package updater

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// Bus is what the updater needs from MQTT: QoS 1 publishes acknowledged by the broker,
// and subscriptions. A handler may block while the updater's queue is full; the Bus then
// holds up what delivers to it rather than dropping messages. broker.Inline is the Bus of
// the embedded broker, updater/mqttbus that of any MQTT broker; both pass one contract
// suite (internal/bustest).
type Bus interface {
	Publish(ctx context.Context, msgs ...protocol.Message) error
	Subscribe(ctx context.Context, filter string, handle func(topic string, payload []byte)) error
}

// Revoker is told which serials are deprovisioned, so that the embedded broker refuses
// them, and which are provisioned again. Optional. An error means nothing was recorded.
type Revoker interface {
	Revoke(serial string) error
	Unrevoke(serial string) error
}

// Options configure an Updater. Root, SigningKey, Store and Bus are required.
type Options struct {
	Root       keychain.RootSecret
	SigningKey ed25519.PrivateKey
	Store      Store
	Bus        Bus
	Logger     zerolog.Logger
	// DataDir holds uploads in progress (DataDir/uploads). Required unless AcksOnly.
	DataDir string
	// ChainLength of new devices and re-keys (default keychain.DefaultChainLength).
	ChainLength uint32
	// BrokerURL is written into device files, for devices to connect to.
	BrokerURL string
	// AckGroup, if set, subscribes to acks as $share/AckGroup/... so that updaters
	// sharing a broker split the ack load.
	AckGroup string
	// AcksOnly makes this updater process acks only, leaving admin requests and release
	// fan-out to another one.
	AcksOnly bool
	// RefreshInterval is how often an AcksOnly updater reads the releases from the store
	// (default 2 s). It also reads them whenever a device it advanced has nothing
	// pending in its view, so a longer interval costs nothing in correctness.
	RefreshInterval time.Duration
	// Revoker, if set, is told of provisioned and deprovisioned serials.
	Revoker Revoker
	// MaxUploadSize bounds one image (default 4 GiB).
	MaxUploadSize uint64
	// Workers is how many goroutines wrap keys and verify acks (default GOMAXPROCS).
	Workers int
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// Updater is the release and ack server. Its methods are safe for concurrent use.
type Updater struct {
	o     Options
	log   zerolog.Logger
	stats counters
	pkey  ed25519.PublicKey
	sealK [keychain.Size]byte // seals content keys and derives re-key ids

	sealer *keychain.StateSealer // opens and seals chain states

	acks    chan inbound
	admin   chan []byte
	uploads *uploads

	mu       sync.Mutex
	runs     map[keychain.ReleaseID]*run // active or paused releases, in memory
	dirty    map[keychain.ReleaseID]bool // release statuses to publish
	online   map[string]bool
	fleetDir bool

	ctx   context.Context
	wg    sync.WaitGroup
	ready chan struct{} // closed when Run has subscribed to everything
}

type inbound struct {
	serial  string
	payload []byte
}

// New checks the options and returns an Updater; Run starts it.
func New(o Options) (*Updater, error) {
	switch {
	case o.Store == nil:
		return nil, errors.New("updater: Options.Store is required")
	case o.Bus == nil:
		return nil, errors.New("updater: Options.Bus is required")
	case len(o.SigningKey) != ed25519.PrivateKeySize:
		return nil, errors.New("updater: Options.SigningKey must be an Ed25519 private key")
	case o.Root == keychain.RootSecret{}:
		return nil, errors.New("updater: Options.Root is the zero root secret")
	case !o.AcksOnly && o.DataDir == "":
		return nil, errors.New("updater: Options.DataDir is required to receive uploads")
	}
	if o.ChainLength == 0 {
		o.ChainLength = keychain.DefaultChainLength
	}
	if !keychain.ValidChainLength(o.ChainLength) {
		return nil, fmt.Errorf("updater: %w: %d", keychain.ErrInvalidChainLength, o.ChainLength)
	}
	if o.MaxUploadSize == 0 {
		o.MaxUploadSize = 4 << 30
	}
	if o.Workers <= 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.RefreshInterval <= 0 {
		o.RefreshInterval = 2 * time.Second
	}
	u := &Updater{
		o: o, log: o.Logger,
		pkey:   o.SigningKey.Public().(ed25519.PublicKey),
		sealK:  o.Root.StateSealKey(),
		sealer: keychain.NewStateSealer(o.Root),
		acks:   make(chan inbound, 1<<16),
		admin:  make(chan []byte, 256),
		runs:   map[keychain.ReleaseID]*run{},
		dirty:  map[keychain.ReleaseID]bool{},
		online: map[string]bool{},
		ready:  make(chan struct{}),
	}
	if !o.AcksOnly {
		var err error
		if u.uploads, err = newUploads(o.DataDir, o.MaxUploadSize); err != nil {
			return nil, err
		}
	}
	return u, nil
}

// ReleasePublicKey is the public half of the release-signing key; devices hold it.
func (u *Updater) ReleasePublicKey() ed25519.PublicKey { return u.pkey }

// Run serves until ctx is done, then waits for its goroutines and returns ctx's error.
func (u *Updater) Run(ctx context.Context) (err error) {
	ctx, cancel := context.WithCancel(ctx)
	u.ctx = ctx
	defer func() {
		cancel() // on an early error too: nothing started here outlives Run
		u.wg.Wait()
	}()
	ackFilter := protocol.AckFilter
	if u.o.AckGroup != "" {
		ackFilter = "$share/" + u.o.AckGroup + "/" + protocol.AckFilter
	}
	for i := 0; i < u.o.Workers; i++ {
		u.goRun(func() { u.ackWorker(ctx) })
	}
	if err := u.o.Bus.Subscribe(ctx, ackFilter, u.onAck); err != nil {
		return fmt.Errorf("updater: %w", err)
	}
	// The store may be down at start (a Redis restart): wait for it rather than stop,
	// which would take the broker down with the process.
	for backoff := 500 * time.Millisecond; ; backoff = min(2*backoff, 10*time.Second) {
		err := u.loadRuns(ctx)
		if err == nil {
			break
		}
		u.log.Warn().Err(err).Dur("retry_in", backoff).Msg("reading releases from the store; retrying")
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
	}
	if !u.o.AcksOnly {
		if err := u.o.Bus.Subscribe(ctx, protocol.PresenceFilter, u.onPresence); err != nil {
			return fmt.Errorf("updater: %w", err)
		}
		if err := u.o.Bus.Subscribe(ctx, protocol.UploadFilter, u.onUploadPart); err != nil {
			return fmt.Errorf("updater: %w", err)
		}
		u.goRun(func() { u.adminLoop(ctx) })
		if err := u.o.Bus.Subscribe(ctx, protocol.AdminRequests, u.onAdmin); err != nil {
			return fmt.Errorf("updater: %w", err)
		}
		u.goRun(func() { u.statusLoop(ctx) })
		u.resumeRuns(ctx)
	} else {
		u.goRun(func() { u.refreshRunsLoop(ctx) })
	}
	u.log.Info().Bool("acks_only", u.o.AcksOnly).Str("ack_filter", ackFilter).Msg("updater running")
	close(u.ready)
	<-ctx.Done()
	return ctx.Err()
}

// Ready is closed once Run has subscribed to acks, admin requests and uploads: from then
// on a request published to the admin topic is answered. (Before, it is lost: admin
// requests are not retained.)
func (u *Updater) Ready() <-chan struct{} { return u.ready }

func (u *Updater) goRun(f func()) {
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		f()
	}()
}

// onAck queues an ack for the workers. When the queue is full it waits, which holds up
// the bus (in-process, the device that sent the ack; over MQTT, the bus's connection):
// back-pressure, not loss. Only an ack that arrives while the updater stops is dropped,
// and counted; the device re-sends it until it sees a receipt ([SC-10.1] step 6).
func (u *Updater) onAck(topic string, payload []byte) {
	serial, leaf, ok := protocol.DeviceOf(topic)
	if !ok || leaf != "ack" {
		return
	}
	select {
	case u.acks <- inbound{serial: serial, payload: append([]byte(nil), payload...)}:
	case <-u.ctx.Done():
		u.stats.acksShed.Add(1)
	}
}

// onAdmin queues an admin request; like onAck it waits while the queue is full.
func (u *Updater) onAdmin(_ string, payload []byte) {
	select {
	case u.admin <- append([]byte(nil), payload...):
	case <-u.ctx.Done():
	}
}

func (u *Updater) onPresence(topic string, payload []byte) {
	serial, _, ok := protocol.DeviceOf(topic)
	if !ok {
		return
	}
	u.mu.Lock()
	if string(payload) == protocol.Online {
		u.online[serial] = true
	} else {
		delete(u.online, serial)
	}
	u.fleetDir = true
	u.mu.Unlock()
}

// sealContentKey seals a release's content key for the store, bound to the release id.
func (u *Updater) sealContentKey(id keychain.ReleaseID, ck keychain.ContentKey) ([]byte, error) {
	return keychain.SealSecret(u.sealK, keychain.LabelSealedRelease+id.String(), ck)
}

func (u *Updater) openContentKey(r *Release) (keychain.ContentKey, error) {
	k, err := keychain.OpenSecret(u.sealK, keychain.LabelSealedRelease+r.ID.String(), r.ContentKey)
	if err != nil {
		return keychain.ContentKey{}, fmt.Errorf("updater: opening the content key of release %s (was the root secret changed?): %w", r.ID, err)
	}
	return keychain.ContentKey(k), nil
}

// rekeyID is the id of the re-key of serial out of epoch: derived, so that a restarted
// updater re-publishes the same re-key it assigned before.
func (u *Updater) rekeyID(serial string, epoch uint32) keychain.ReleaseID {
	var id keychain.ReleaseID
	sum := keychain.LabeledMAC(u.sealK, keychain.LabelRekeyID, []byte(serial), []byte{byte(epoch >> 24), byte(epoch >> 16), byte(epoch >> 8), byte(epoch)})
	copy(id[:], sum[:16])
	return id
}

// Stats are the updater's counters since start.
type Stats struct {
	KeysPublished   int64
	Rekeys          int64
	AcksAccepted    int64
	AcksDuplicate   int64
	ReportsRecorded int64
	// Resyncs counts stale_key reports that moved a counter down to meet its device.
	Resyncs int64
	// Reoffers counts stale_key reports about the index above the counter, answered by
	// publishing the device's current key message again.
	Reoffers int64
	// AcksRejected counts acks that changed nothing, by reason: malformed, unknown_device,
	// forged (bad MAC), stale (not at the device's position: replays, other releases),
	// unassigned (an id never wrapped at that position).
	AcksRejected map[string]int64
	// AcksShed counts acks dropped because they arrived while the updater stopped
	// (devices re-send them).
	AcksShed int64
	// AckQueue and AdminQueue are how many acks and admin requests wait for a worker now.
	AckQueue, AdminQueue int
	// Online is how many devices' retained presence says online now (always 0 with
	// AcksOnly, which does not follow presence).
	Online int
	// ReceiptsPublished counts receipts the broker acknowledged.
	ReceiptsPublished int64
	// ChainSteps counts the hash-chain steps spent on wrapping keys and verifying acks
	// (keychain.Traversal.Steps): a few per device and release, thanks to the pebbling.
	ChainSteps int64
}

type counters struct {
	keys, rekeys, accepted, dup, reports, resyncs, acksShed atomic.Int64
	receipts, chainSteps, reoffers                          atomic.Int64
	rejected                                                sync.Map // reason -> *atomic.Int64
}

func (c *counters) reject(reason string) {
	v, _ := c.rejected.LoadOrStore(reason, new(atomic.Int64))
	v.(*atomic.Int64).Add(1)
}

// Stats returns a snapshot of the counters.
func (u *Updater) Stats() Stats {
	s := Stats{
		KeysPublished: u.stats.keys.Load(), Rekeys: u.stats.rekeys.Load(),
		AcksAccepted: u.stats.accepted.Load(), AcksDuplicate: u.stats.dup.Load(),
		ReportsRecorded: u.stats.reports.Load(), AcksShed: u.stats.acksShed.Load(),
		AckQueue: len(u.acks), AdminQueue: len(u.admin), Resyncs: u.stats.resyncs.Load(),
		Reoffers:          u.stats.reoffers.Load(),
		ReceiptsPublished: u.stats.receipts.Load(), ChainSteps: u.stats.chainSteps.Load(),
		AcksRejected: map[string]int64{},
	}
	u.stats.rejected.Range(func(k, v any) bool {
		s.AcksRejected[k.(string)] = v.(*atomic.Int64).Load()
		return true
	})
	u.mu.Lock()
	s.Online = len(u.online)
	u.mu.Unlock()
	return s
}
