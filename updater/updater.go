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
// suite (internal/testkit/bustest).
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

// Accounts tells which names the broker gives to accounts other than devices, so that
// no device is provisioned under one ([SC-2.2]). broker.Broker is one. Optional.
type Accounts interface {
	IsAccount(name string) bool
}

// Options configure an Updater. Root, SigningKey, Store and Bus are required.
type Options struct {
	Root keychain.RootSecret
	// SigningKey is the current release-signing key, KeySeq its sequence number (0 until
	// the first rotation), and KeyStatements the statements 1..KeySeq that chain it to
	// the first key (PROTOCOL.md 5.1), which the updater publishes, retained, at start.
	SigningKey    ed25519.PrivateKey
	KeySeq        uint32
	KeyStatements [][]byte
	// KeyStore keeps the keys keys.rotate makes; without one, keys.rotate is refused.
	KeyStore KeyStore
	Store    Store
	Bus      Bus
	Logger   zerolog.Logger
	// DataDir holds uploads in progress (DataDir/uploads). Required unless AcksOnly.
	DataDir string
	// ChainLength of new devices (default keychain.DefaultChainLength). A re-key keeps
	// the device's chain length ([SC-10.3]).
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
	// Accounts, if set, names the broker's accounts; provisioning refuses their names.
	Accounts Accounts
	// MaxUploadSize bounds one image (default 4 GiB). MaxUploads bounds the unfinished or
	// unused uploads kept at once (default 16); together they hold at most four times
	// MaxUploadSize.
	MaxUploadSize uint64
	MaxUploads    int
	// MaxConcurrent is the concurrency bound of a release that gives none (PROTOCOL.md
	// 12.5): default protocol.DefaultMaxConcurrent, protocol.NoBound for none.
	MaxConcurrent int
	// Workers is how many goroutines wrap keys and verify acks (default GOMAXPROCS).
	Workers int
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Observer, if set, receives the timings the updater measures (for histograms).
	Observer Observer
}

// Observer receives timings the updater measures; serve feeds them to Prometheus
// histograms.
type Observer interface {
	// AckHandled: an ack or report was answered (or dropped) d after it arrived.
	AckHandled(d time.Duration)
	// Installed: a device's install ack was accepted d after its wave opened (its
	// release's creation, for a release without waves).
	Installed(d time.Duration)
}

// Updater is the release and ack server. Its methods are safe for concurrent use.
//
// It is wired from parts that each own their state: the registry (releases held in
// memory), the lifecycle (release states), the placer (what is wrapped for which
// device), the ack engine, the status publisher, and the admin service with its MQTT
// transport.
type Updater struct {
	o     Options
	log   zerolog.Logger
	stats counters
	keys  *keys

	runs    *registry
	life    *lifecycle
	status  *statusPublisher
	place   *placer
	acks    *ackEngine
	admin   *Admin
	mqtt    *mqttAdmin // nil with AcksOnly
	uploads *uploads   // nil with AcksOnly

	wg    sync.WaitGroup
	ready chan struct{} // closed when Run has subscribed to everything
}

// New checks the options and returns an Updater; Run starts it.
func New(o Options) (*Updater, error) {
	o, err := o.withDefaults()
	if err != nil {
		return nil, err
	}
	release := &releaseKeys{seq: o.KeySeq, key: o.SigningKey, statements: o.KeyStatements}
	u := &Updater{o: o, log: o.Logger, keys: newKeys(o.Root, release, o.ChainLength), ready: make(chan struct{})}
	if !o.AcksOnly {
		if u.uploads, err = newUploads(o.DataDir, o.MaxUploadSize, o.MaxUploads); err != nil {
			return nil, err
		}
	}
	u.runs = newRegistry(o.Store, u.keys, o.Now)
	u.life = &lifecycle{store: o.Store, runs: u.runs}
	u.status = newStatusPublisher(o.Store, o.Bus, u.runs, u.life, u.log, o.Now)
	u.place = (&placer{
		store: o.Store, bus: o.Bus, keys: u.keys, runs: u.runs, status: u.status, stats: &u.stats,
		log: u.log, workers: o.Workers, acksOnly: o.AcksOnly,
	}).init()
	u.acks = &ackEngine{
		store: o.Store, bus: o.Bus, keys: u.keys, runs: u.runs, place: u.place, status: u.status,
		stats: &u.stats, log: u.log, now: o.Now, obs: o.Observer, queue: make(chan inbound, 1<<16),
	}
	u.admin = newAdmin(&adminCore{
		store: o.Store, bus: o.Bus, keys: u.keys, runs: u.runs, life: u.life, place: u.place,
		status: u.status, uploads: u.uploads, revoker: o.Revoker, accounts: o.Accounts, keyStore: o.KeyStore, stats: &u.stats, log: u.log, now: o.Now,
		workers: o.Workers, brokerURL: o.BrokerURL, maxConcurrent: o.MaxConcurrent,
	})
	if !o.AcksOnly {
		u.mqtt = newMQTTAdmin(u.admin, o.Bus, u.log)
	}
	return u, nil
}

func (o Options) withDefaults() (Options, error) {
	switch {
	case o.Store == nil:
		return o, errors.New("updater: Options.Store is required")
	case o.Bus == nil:
		return o, errors.New("updater: Options.Bus is required")
	case len(o.SigningKey) != ed25519.PrivateKeySize:
		return o, errors.New("updater: Options.SigningKey must be an Ed25519 private key")
	case o.Root == keychain.RootSecret{}:
		return o, errors.New("updater: Options.Root is the zero root secret")
	case len(o.KeyStatements) != int(o.KeySeq):
		return o, fmt.Errorf("updater: Options.KeyStatements holds %d statements, but Options.KeySeq is %d", len(o.KeyStatements), o.KeySeq)
	case !o.AcksOnly && o.DataDir == "":
		return o, errors.New("updater: Options.DataDir is required to receive uploads")
	}
	if o.ChainLength == 0 {
		o.ChainLength = keychain.DefaultChainLength
	}
	if !keychain.ValidChainLength(o.ChainLength) {
		return o, fmt.Errorf("updater: %w: %d", keychain.ErrInvalidChainLength, o.ChainLength)
	}
	if o.MaxUploadSize == 0 {
		o.MaxUploadSize = 4 << 30
	}
	if o.MaxUploads <= 0 {
		o.MaxUploads = defaultMaxUploads
	}
	switch {
	case o.MaxConcurrent == 0:
		o.MaxConcurrent = protocol.DefaultMaxConcurrent
	case o.MaxConcurrent < protocol.NoBound:
		return o, fmt.Errorf("updater: Options.MaxConcurrent %d: give a bound, or protocol.NoBound for none", o.MaxConcurrent)
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
	return o, nil
}

// ReleasePublicKey is the public half of the current release-signing key, and its
// sequence number (PROTOCOL.md 5.1); devices provisioned now hold it.
func (u *Updater) ReleasePublicKey() (ed25519.PublicKey, uint32) {
	seq, key := u.keys.release.current()
	return key.Public().(ed25519.PublicKey), seq
}

// Admin is the admin service, for callers in the same process (an HTTP API, a test). It
// is nil with AcksOnly. Its fan-outs run until Run returns.
func (u *Updater) Admin() *Admin {
	if u.o.AcksOnly {
		return nil
	}
	return u.admin
}

// Run serves until ctx is done, then waits for its goroutines and returns ctx's error.
func (u *Updater) Run(ctx context.Context) (err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer func() {
		// On an early error too: nothing started here outlives Run.
		cancel()
		u.place.stop() // the fan-outs end with the rest...
		u.wg.Wait()
		u.place.close() // ...and are waited for once no admin command can start one
		if u.uploads != nil {
			u.uploads.close()
		}
	}()
	ackFilter := protocol.AckFilter
	if u.o.AckGroup != "" {
		ackFilter = "$share/" + u.o.AckGroup + "/" + protocol.AckFilter
	}
	for i := 0; i < u.o.Workers; i++ {
		u.goRun(func() { u.acks.worker(ctx) })
	}
	if err := u.o.Bus.Subscribe(ctx, ackFilter, func(t string, p []byte) { u.acks.onAck(ctx, t, p) }); err != nil {
		return fmt.Errorf("updater: %w", err)
	}
	if err := u.loadReleases(ctx); err != nil {
		return err
	}
	if u.o.AcksOnly {
		u.goRun(func() { u.refreshLoop(ctx) })
	} else if err := u.serveAdmin(ctx); err != nil {
		return err
	}
	u.log.Info().Bool("acks_only", u.o.AcksOnly).Str("ack_filter", ackFilter).Msg("updater running")
	close(u.ready)
	<-ctx.Done()
	return ctx.Err()
}

// loadReleases reads the releases from the store. The store may be down at start (a
// Redis restart): it waits for it rather than stop, which would take the broker down
// with the process.
func (u *Updater) loadReleases(ctx context.Context) error {
	for backoff := 500 * time.Millisecond; ; backoff = min(2*backoff, 10*time.Second) {
		err := u.runs.load(ctx)
		if err == nil {
			return nil
		}
		u.log.Warn().Err(err).Dur("retry_in", backoff).Msg("reading releases from the store; retrying")
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
	}
}

// serveAdmin follows presence and uploads, serves admin requests, publishes statuses and
// resumes the releases that were active at the last stop.
func (u *Updater) serveAdmin(ctx context.Context) error {
	if err := u.o.Bus.Subscribe(ctx, protocol.PresenceFilter, u.status.onPresence); err != nil {
		return fmt.Errorf("updater: %w", err)
	}
	if err := u.o.Bus.Subscribe(ctx, protocol.StateFilter, u.status.onState); err != nil {
		return fmt.Errorf("updater: %w", err)
	}
	err := u.o.Bus.Subscribe(ctx, protocol.UploadFilter, func(t string, p []byte) {
		if err := u.uploads.receive(t, p); err != nil {
			u.log.Warn().Err(err).Msg("upload part ignored")
		}
	})
	if err != nil {
		return fmt.Errorf("updater: %w", err)
	}
	u.goRun(func() { u.mqtt.loop(ctx) })
	if err := u.o.Bus.Subscribe(ctx, protocol.AdminRequests, func(_ string, p []byte) { u.mqtt.onRequest(ctx, p) }); err != nil {
		return fmt.Errorf("updater: %w", err)
	}
	u.goRun(func() { u.status.loop(ctx) })
	u.goRun(func() { u.admin.rolloutLoop(ctx) })
	if err := publishKeyStatements(ctx, u.o.Bus, u.keys.release); err != nil {
		u.log.Warn().Err(err).Msg("publishing the key statements; devices that need them wait for the next start")
	}
	u.admin.resume(ctx)
	return nil
}

// refreshLoop keeps an acks-only updater's view of the releases current.
func (u *Updater) refreshLoop(ctx context.Context) {
	t := time.NewTicker(u.o.RefreshInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := u.runs.load(ctx); err != nil && ctx.Err() == nil {
				u.log.Warn().Err(err).Msg("refreshing releases")
			}
		}
	}
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
	// Claims counts acks and stale_key reports whose version or device_seq differs from
	// what the server recorded: the version of the release it wrapped, or the highest it
	// released to the device; the index below the one acked; the chain length it sent in
	// the re-key ([SC-10.2b], [SC-10.2c]). A claim is never believed.
	Claims int64
	// WavesOpened counts the waves opened after the first (PROTOCOL.md 12.5);
	// RolloutStops the releases paused or cancelled by their failure threshold.
	WavesOpened, RolloutStops int64
	// ChainSteps counts the hash-chain steps spent on wrapping keys and verifying acks
	// (keychain.Traversal.Steps): a few per device and release, thanks to the pebbling.
	ChainSteps int64
	// FanoutRetries counts batches of a fan-out wrapped again after a store or broker
	// error (a Redis failover, a broker restart).
	FanoutRetries int64
}

type counters struct {
	keys, rekeys, accepted, dup, reports, resyncs, acksShed atomic.Int64
	receipts, chainSteps, reoffers, claims                  atomic.Int64
	wavesOpened, rolloutStops, fanoutRetries                atomic.Int64
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
		AckQueue: len(u.acks.queue), Resyncs: u.stats.resyncs.Load(),
		Reoffers:          u.stats.reoffers.Load(),
		ReceiptsPublished: u.stats.receipts.Load(), ChainSteps: u.stats.chainSteps.Load(),
		Claims:      u.stats.claims.Load(),
		WavesOpened: u.stats.wavesOpened.Load(), RolloutStops: u.stats.rolloutStops.Load(),
		FanoutRetries: u.stats.fanoutRetries.Load(),
		AcksRejected:  map[string]int64{},
	}
	u.stats.rejected.Range(func(k, v any) bool {
		s.AcksRejected[k.(string)] = v.(*atomic.Int64).Load()
		return true
	})
	if u.mqtt != nil {
		s.AdminQueue = len(u.mqtt.queue)
	}
	s.Online = u.status.onlineCount()
	return s
}
