// Package simulate runs a fleet of device agents in one process, over real MQTT
// connections, for load tests, demonstrations and a long-running simulator service.
//
// # Model
//
// Every simulated device is a [device.Agent] on its own vault: a [device.MemoryVault]
// made from a device file (Options.Devices), or a vault the caller gives
// (Options.Vaults; a [device.FileVault] keeps a device's counters across runs of the
// simulator). Its installer only hashes the image and checks it against the manifest, so
// an agent holds at most its window of chunks plus one plaintext chunk.
//
// # Faults
//
// Faults are drawn per device and per release from Options.Seed, the serial and the
// release id, so a run is repeatable and a long run injects faults into every release,
// each at most once per device and release: a dropped connection in the middle of the
// download (DropFraction); a power loss (KillFraction) in the middle of the install,
// after the install or after the vault write, chosen with equal odds, after which the
// agent is restarted on the same vault; delayed acks (AckDelay). A mid-download drop or
// power loss happens after chunk DropAfter, so it needs an image of at least DropAfter+2
// chunks.
//
// # Use
//
// [Start] starts the fleet and returns a [Fleet], whose Progress may be read while it
// runs; [Fleet.Wait] stops it and returns the [Summary]. [Run] does both. By default the
// fleet stops once every device has confirmed TargetVersion or newer, or failed for good
// (a report code the agent does not retry, PROTOCOL.md 10.1). With Continuous it runs
// until ctx is done, installing every release that reaches it.
//
// The package plays no server: an updater (or a test) must publish the releases and
// wrap the key messages.
package simulate

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// Options configure a simulation.
type Options struct {
	// Devices are the device files of the fleet; each agent gets a MemoryVault made
	// from its file. Set Devices or Vaults.
	Devices []protocol.DeviceFile
	// Vaults are the devices' vaults, one agent per vault, used as they are: with
	// FileVaults a restarted simulator continues every device's sequence number.
	Vaults []device.Vault
	// BrokerURL, if set, replaces every device's broker URL.
	BrokerURL string
	// TargetVersion: a device is done when it has confirmed an install of at least this
	// version. 0 means 1. Ignored with Continuous.
	TargetVersion uint64
	// Continuous keeps the fleet running until ctx is done, whatever it installed; the
	// Summary then describes the newest version confirmed.
	Continuous bool

	// Agent settings passed to every agent (zero: the agent's defaults).
	Window                     int
	ChunkTimeout               time.Duration
	AckResend, AckResendMax    time.Duration
	ReconnectMin, ReconnectMax time.Duration

	// DropFraction of the devices lose their connection once per release, after chunk
	// DropAfter (0: the second chunk, index 1).
	DropFraction float64
	DropAfter    uint32
	// KillFraction of the devices lose power once per release: after chunk DropAfter,
	// after the install, or after the vault write. They restart after RestartDelay
	// (default 100 ms).
	KillFraction float64
	RestartDelay time.Duration
	// AckDelay delays every first ack publication.
	AckDelay time.Duration
	// FailInstall names devices whose installer refuses every image at commit: they
	// report install_failed, and retry, for every release.
	FailInstall map[string]bool
	// Unhealthy names devices on which every new image fails its health check on trial:
	// they go back to the image they ran and report unhealthy [SC-10.5].
	// UnhealthyFraction of the other devices, drawn from Seed and the serial, do too.
	Unhealthy         map[string]bool
	UnhealthyFraction float64
	// PrefetchLimit, if set, makes every device prefetch releases announced to it
	// (PROTOCOL.md 9.3), keeping up to this many bytes in memory.
	PrefetchLimit uint64
	// CrashInTrialFraction of the devices lose power once per release while the new
	// image runs on trial, before its health check; they restart after RestartDelay.
	CrashInTrialFraction float64
	// Seed makes the fault draw repeatable.
	Seed uint64
	// StartSpread spreads the agents' first connections over this duration.
	StartSpread time.Duration

	Logger zerolog.Logger
	// OnEvent, if set, sees every agent's events (from many goroutines).
	OnEvent func(device.Event)
}

// Fleet is a running simulation. Its methods are safe for concurrent use.
type Fleet struct {
	o      Options
	ctx    context.Context
	cancel context.CancelFunc
	t      *tracker
	wg     sync.WaitGroup
	errs   chan error
	peak   atomic.Uint64
	stats  []device.Stats // per device, written when its goroutine ends
	vaults []device.Vault
	done   chan struct{}
	once   sync.Once
	sum    Summary
	err    error
}

// Run runs the fleet until it is done (see the package documentation) or ctx is done.
func Run(ctx context.Context, o Options) (Summary, error) {
	f, err := Start(ctx, o)
	if err != nil {
		return Summary{}, err
	}
	return f.Wait()
}

// Start loads every vault and starts the fleet. It returns an error, having started
// nothing, when a device file or vault is invalid.
func Start(ctx context.Context, o Options) (*Fleet, error) {
	switch {
	case len(o.Devices) > 0 && len(o.Vaults) > 0:
		return nil, errors.New("simulate: set Options.Devices or Options.Vaults, not both")
	case len(o.Devices) == 0 && len(o.Vaults) == 0:
		return nil, errors.New("simulate: no devices")
	}
	if o.TargetVersion == 0 {
		o.TargetVersion = 1
	}
	if o.DropAfter == 0 {
		o.DropAfter = 1
	}
	if o.RestartDelay <= 0 {
		o.RestartDelay = 100 * time.Millisecond
	}
	vaults := o.Vaults
	if len(vaults) == 0 {
		vaults = make([]device.Vault, len(o.Devices))
		for i, f := range o.Devices {
			st, err := device.StateFromDeviceFile(f)
			if err != nil {
				return nil, fmt.Errorf("simulate: device %d: %w", i, err)
			}
			vaults[i] = device.NewMemoryVault(st)
		}
	}
	states := make([]device.State, len(vaults))
	seen := make(map[string]int, len(vaults))
	for i, v := range vaults {
		st, err := v.Load()
		if err != nil {
			return nil, fmt.Errorf("simulate: device %d: %w", i, err)
		}
		if j, dup := seen[st.Serial]; dup {
			return nil, fmt.Errorf("simulate: devices %d and %d are both %q: one MQTT session per serial", j, i, st.Serial)
		}
		seen[st.Serial] = i
		states[i] = st
	}

	ctx, cancel := context.WithCancel(ctx)
	f := &Fleet{o: o, ctx: ctx, cancel: cancel, errs: make(chan error, len(vaults)), stats: make([]device.Stats, len(vaults)), vaults: vaults}
	f.t = newTracker(o, states)

	f.done = make(chan struct{})
	f.wg.Add(2)
	go f.sampleHeap()
	go func() {
		defer f.wg.Done()
		defer close(f.done)
		select {
		case <-f.t.settledCh: // never closed with Continuous
		case <-ctx.Done():
		}
	}()
	for i, v := range vaults {
		var delay time.Duration
		if o.StartSpread > 0 {
			delay = rand.N(o.StartSpread)
		}
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			if err := f.device(i, states[i].Serial, v, delay); err != nil {
				f.errs <- fmt.Errorf("simulate: device %s: %w", states[i].Serial, err)
				cancel()
			}
		}()
	}
	return f, nil
}

// Progress returns a snapshot of the fleet's progress.
func (f *Fleet) Progress() Progress { return f.t.progress() }

// Done is closed when the fleet has nothing more to do: every device confirmed the
// target version or failed for good (never with Continuous), or ctx is done.
func (f *Fleet) Done() <-chan struct{} { return f.done }

// Wait waits until the fleet is done, stops every agent and returns the summary. Its
// error reports devices that could not run (a vault that cannot be written, a bad broker
// URL), not devices that did not finish: compare Summary.Confirmed with Devices.
func (f *Fleet) Wait() (Summary, error) {
	f.once.Do(func() {
		<-f.Done()
		f.cancel()
		f.wg.Wait()
		close(f.errs)
		for e := range f.errs {
			f.err = errors.Join(f.err, e)
		}
		f.sum = f.t.summary()
		for _, st := range f.stats {
			addStats(&f.sum.Stats, st)
		}
		f.sum.PeakHeap = f.peak.Load()
		f.sum.States = make([]device.State, len(f.vaults))
		for i, v := range f.vaults {
			st, err := v.Load()
			if err != nil {
				f.err = errors.Join(f.err, fmt.Errorf("simulate: reading the vault of device %d: %w", i, err))
			}
			f.sum.States[i] = st
		}
	})
	return f.sum, f.err
}

func (f *Fleet) sampleHeap() {
	defer f.wg.Done()
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	var ms runtime.MemStats
	for {
		runtime.ReadMemStats(&ms)
		if ms.HeapInuse > f.peak.Load() {
			f.peak.Store(ms.HeapInuse)
		}
		select {
		case <-f.ctx.Done():
			return
		case <-t.C:
		}
	}
}

func addStats(sum *device.Stats, st device.Stats) {
	sum.Connects += st.Connects
	sum.Disconnects += st.Disconnects
	sum.KeyMessages += st.KeyMessages
	sum.ChunkFetches += st.ChunkFetches
	sum.ChunksBad += st.ChunksBad
	sum.ChunksDone += st.ChunksDone
	sum.Installs += st.Installs
	sum.AcksSent += st.AcksSent
	sum.ReportsSent += st.ReportsSent
	sum.Confirmed += st.Confirmed
	sum.StatePublishes += st.StatePublishes
	sum.SubRetries += st.SubRetries
	sum.Retries += st.Retries
	sum.Trials += st.Trials
	sum.Unhealthy += st.Unhealthy
}

// faults is one device's fault plan for the release it is working on. It lives across
// the device's agents (reboots) and is used only on the running agent's goroutine.
type faults struct {
	release keychain.ReleaseID
	drop    bool
	kill    device.CrashPoint // 0: none
	dropped bool
	killed  bool
}

// draw decides the faults of a device for a release: the same for the same seed, serial
// and release, whatever the scheduling.
func (f *Fleet) draw(serial string, id keychain.ReleaseID) faults {
	h := sha256.New()
	binary.Write(h, binary.BigEndian, f.o.Seed)
	h.Write([]byte(serial))
	h.Write(id[:])
	sum := h.Sum(nil)
	r := rand.New(rand.NewPCG(binary.BigEndian.Uint64(sum[:8]), binary.BigEndian.Uint64(sum[8:16])))
	p := faults{release: id, drop: r.Float64() < f.o.DropFraction}
	if r.Float64() < f.o.KillFraction {
		p.kill = device.CrashPoint(1 + r.IntN(5)) // downloading, installed, persisted, staged, trial
	}
	if r.Float64() < f.o.CrashInTrialFraction {
		p.kill = device.CrashTrial
	}
	return p
}

// drawUnhealthy decides whether a device fails every health check
// (Options.UnhealthyFraction): the same for the same seed and serial.
func (f *Fleet) drawUnhealthy(serial string) bool {
	if f.o.UnhealthyFraction <= 0 {
		return false
	}
	h := sha256.Sum256(binary.BigEndian.AppendUint64([]byte("unhealthy "+serial+" "), f.o.Seed))
	return float64(binary.BigEndian.Uint64(h[:8])>>11)/(1<<53) < f.o.UnhealthyFraction
}

// device runs one device, restarting its agent after a simulated power loss.
func (f *Fleet) device(i int, serial string, v device.Vault, delay time.Duration) error {
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-f.ctx.Done():
			return nil
		}
	}
	var total device.Stats
	defer func() { f.stats[i] = total }() // read by Wait after wg.Wait
	var plan faults
	// The slots outlive the agent: a power loss keeps what the device runs.
	inst := &hashInstaller{fail: f.o.FailInstall[serial], unhealthy: f.o.Unhealthy[serial] || f.drawUnhealthy(serial)}
	var kept device.ChunkStore
	if f.o.PrefetchLimit > 0 {
		kept = device.NewMemChunkStore(f.o.PrefetchLimit)
	}
	for {
		o := device.Options{
			Vault: v, Installer: inst, Prefetch: kept, Logger: f.o.Logger, BrokerURL: f.o.BrokerURL,
			Window: f.o.Window, ChunkTimeout: f.o.ChunkTimeout, AckResend: f.o.AckResend, AckResendMax: f.o.AckResendMax,
			ReconnectMin: f.o.ReconnectMin, ReconnectMax: f.o.ReconnectMax, ProgressInterval: time.Hour,
		}
		o.Faults.AckDelay = f.o.AckDelay
		o.Faults.DropAfterChunk = func(c uint32) bool {
			if plan.drop && !plan.dropped && c == f.o.DropAfter {
				plan.dropped = true
				f.t.drops.Add(1)
				return true
			}
			return false
		}
		o.Faults.Crash = func(p device.CrashPoint, id keychain.ReleaseID, c uint32) bool {
			if id != plan.release || p != plan.kill || plan.killed || (p == device.CrashDownloading && c != f.o.DropAfter) {
				return false
			}
			plan.killed = true
			f.t.kills.Add(1)
			return true
		}
		o.OnEvent = func(e device.Event) {
			if e.Kind == device.EventKeyMessage && e.Release != plan.release {
				plan = f.draw(serial, e.Release)
			}
			f.t.on(i, e)
			if f.o.OnEvent != nil {
				f.o.OnEvent(e)
			}
		}
		a, err := device.New(o)
		if err != nil {
			return err
		}
		err = a.Run(f.ctx)
		f.t.setOnline(i, false) // a crash reports no disconnect
		addStats(&total, a.Stats())
		if !errors.Is(err, device.ErrCrashed) {
			return err
		}
		select {
		case <-time.After(f.o.RestartDelay):
		case <-f.ctx.Done():
			return nil
		}
	}
}

// hashInstaller discards the image after hashing it against the manifest, and keeps A/B
// slots in memory: which release is staged, which runs, and whether it runs on trial
// [SC-10.5]. With fail it refuses every image at commit (Options.FailInstall); with
// unhealthy every image fails its health check (Options.Unhealthy).
type hashInstaller struct {
	fail, unhealthy bool

	mu             sync.Mutex
	staged, active keychain.ReleaseID
	previous       keychain.ReleaseID
	trial          bool
}

func (hi *hashInstaller) Begin(m *keychain.Manifest) (device.Install, error) {
	return &hashInstall{h: sha256.New(), want: m.ImageSHA256, fail: hi.fail, stage: func() {
		hi.mu.Lock()
		hi.staged = m.Release
		hi.mu.Unlock()
	}}, nil
}

func (hi *hashInstaller) Switch(id keychain.ReleaseID) error {
	hi.mu.Lock()
	defer hi.mu.Unlock()
	switch {
	case hi.active == id:
		return nil
	case hi.staged != id:
		return fmt.Errorf("simulate: release %s is not staged", id)
	}
	hi.previous, hi.active, hi.trial = hi.active, id, true
	return nil
}

func (hi *hashInstaller) Running(id keychain.ReleaseID) (bool, error) {
	hi.mu.Lock()
	defer hi.mu.Unlock()
	return hi.active == id, nil
}

func (hi *hashInstaller) Health(_ context.Context, id keychain.ReleaseID) error {
	hi.mu.Lock()
	defer hi.mu.Unlock()
	switch {
	case hi.active != id:
		return fmt.Errorf("simulate: release %s does not run", id)
	case hi.unhealthy:
		return errors.New("simulate: this device fails every health check (Options.Unhealthy)")
	}
	return nil
}

func (hi *hashInstaller) Confirm(id keychain.ReleaseID) error {
	hi.mu.Lock()
	defer hi.mu.Unlock()
	if hi.active == id {
		hi.trial = false
	}
	return nil
}

func (hi *hashInstaller) Revert(id keychain.ReleaseID) error {
	hi.mu.Lock()
	defer hi.mu.Unlock()
	if hi.active == id && hi.trial {
		hi.active, hi.trial = hi.previous, false
	}
	return nil
}

type hashInstall struct {
	h     hash.Hash
	want  [32]byte
	fail  bool
	stage func()
}

func (i *hashInstall) Write(p []byte) (int, error) { return i.h.Write(p) }
func (i *hashInstall) Abort() error                { return nil }
func (i *hashInstall) Commit() error {
	if i.fail {
		return errors.New("simulate: this device's installer fails (Options.FailInstall)")
	}
	var got [32]byte
	if i.h.Sum(got[:0]); got != i.want {
		return errors.New("simulate: image hash differs from the manifest")
	}
	i.stage()
	return nil
}
