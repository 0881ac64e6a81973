// Package simulate runs a fleet of device agents in one process, over real MQTT
// connections, for load tests and demonstrations.
//
// # Model
//
// Every simulated device is a [device.Agent] with a [device.MemoryVault] and an installer
// that only hashes the image and checks it against the manifest, so an agent holds at
// most its window of chunks plus one plaintext chunk. Faults are drawn per device from
// Options with a seeded random source: a dropped connection in the middle of the
// download, a power loss right after the install (the agent is restarted on the same
// vault), delayed acks.
//
// # Use
//
// Run blocks until every device confirmed the target version (or failed for good), or
// ctx is done, and returns a Summary. It plays no server: an updater (or a test) must
// publish the release and wrap key messages.
package simulate

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"math/rand/v2"
	"runtime"
	"slices"
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
	Devices []protocol.DeviceFile
	// BrokerURL, if set, replaces every device file's broker URL.
	BrokerURL string
	// TargetVersion: a device is done when it has confirmed an install of at least this
	// version. 0 means 1.
	TargetVersion uint64

	// Agent settings passed to every agent (zero: the agent's defaults).
	Window                     int
	ChunkTimeout               time.Duration
	AckResend, AckResendMax    time.Duration
	ReconnectMin, ReconnectMax time.Duration

	// DropFraction of the devices lose their connection once, after chunk DropAfter
	// (default: the second chunk).
	DropFraction float64
	DropAfter    uint32
	// KillFraction of the devices lose power once right after installing, before the
	// vault write; they are restarted after RestartDelay (default 100 ms).
	KillFraction float64
	RestartDelay time.Duration
	// AckDelay delays every first ack publication.
	AckDelay time.Duration
	// Seed makes the fault draw repeatable.
	Seed uint64
	// StartSpread spreads the agents' first connections over this duration.
	StartSpread time.Duration

	Logger zerolog.Logger
	// OnEvent, if set, sees every agent's events (from many goroutines).
	OnEvent func(device.Event)
}

// Summary is the outcome of a simulation. Times are measured from the start of Run.
type Summary struct {
	Devices   int
	Confirmed int // confirmed installs of the target version
	Failed    int // devices whose last attempt failed
	Codes     map[string]int
	T50, T90  time.Duration // time until 50 % and 90 % of the devices confirmed
	T100      time.Duration // until all confirmed; 0 if not all did
	Elapsed   time.Duration
	Stats     device.Stats // summed over all agents
	Drops     int          // devices given a dropped connection
	Kills     int          // devices given a power loss
	PeakHeap  uint64       // largest runtime HeapInuse sampled (whole process)
	// States holds each device's vault as Run left it, in the order of Options.Devices:
	// what the device itself believes it installed, at which sequence number.
	States []device.State
}

func (s Summary) String() string {
	return fmt.Sprintf("%d devices: %d confirmed, %d failed %v; t50 %v t90 %v t100 %v; elapsed %v; drops %d kills %d; chunk fetches %d; acks %d; peak heap %d MiB",
		s.Devices, s.Confirmed, s.Failed, s.Codes, s.T50, s.T90, s.T100, s.Elapsed, s.Drops, s.Kills,
		s.Stats.ChunkFetches, s.Stats.AcksSent, s.PeakHeap>>20)
}

type sim struct {
	o      Options
	start  time.Time
	mu     sync.Mutex
	done   []time.Duration
	failed map[string]protocol.Code
	left   atomic.Int64
	all    chan struct{}
	stats  []device.Stats
}

// Run runs the fleet until every device confirmed TargetVersion or ctx is done.
func Run(ctx context.Context, o Options) (Summary, error) {
	if len(o.Devices) == 0 {
		return Summary{}, errors.New("simulate: no devices")
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
	rng := rand.New(rand.NewPCG(o.Seed, 0x5ea1))
	s := &sim{o: o, start: time.Now(), failed: map[string]protocol.Code{}, all: make(chan struct{}), stats: make([]device.Stats, len(o.Devices))}
	s.left.Store(int64(len(o.Devices)))
	sum := Summary{Devices: len(o.Devices), Codes: map[string]int{}}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var peak atomic.Uint64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // heap sampler
		defer wg.Done()
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > peak.Load() {
				peak.Store(ms.HeapInuse)
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	errs := make(chan error, len(o.Devices))
	vaults := make([]*device.MemoryVault, len(o.Devices))
	for i, f := range o.Devices {
		st, err := device.StateFromDeviceFile(f)
		if err != nil {
			cancel()
			wg.Wait()
			return sum, fmt.Errorf("simulate: device %d: %w", i, err)
		}
		drop := rng.Float64() < o.DropFraction
		kill := rng.Float64() < o.KillFraction
		if drop {
			sum.Drops++
		}
		if kill {
			sum.Kills++
		}
		var delay time.Duration
		if o.StartSpread > 0 {
			delay = rand.N(o.StartSpread)
		}
		vaults[i] = device.NewMemoryVault(st)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.device(ctx, i, vaults[i], drop, kill, delay); err != nil {
				errs <- err
				cancel()
			}
		}()
	}
	select {
	case <-s.all:
	case <-ctx.Done():
	}
	cancel()
	wg.Wait()
	close(errs)
	var err error
	for e := range errs {
		err = errors.Join(err, e)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sum.Elapsed = time.Since(s.start)
	sum.Confirmed = len(s.done)
	slices.Sort(s.done)
	at := func(frac float64) time.Duration {
		need := int(frac*float64(sum.Devices) + 0.999999)
		if need < 1 {
			need = 1
		}
		if len(s.done) < need {
			return 0
		}
		return s.done[need-1]
	}
	sum.T50, sum.T90, sum.T100 = at(0.5), at(0.9), at(1)
	for _, c := range s.failed {
		sum.Failed++
		sum.Codes[c.String()]++
	}
	for _, st := range s.stats {
		sum.Stats.Connects += st.Connects
		sum.Stats.Disconnects += st.Disconnects
		sum.Stats.ChunkFetches += st.ChunkFetches
		sum.Stats.ChunksBad += st.ChunksBad
		sum.Stats.Installs += st.Installs
		sum.Stats.AcksSent += st.AcksSent
		sum.Stats.ReportsSent += st.ReportsSent
		sum.Stats.Confirmed += st.Confirmed
	}
	sum.PeakHeap = peak.Load()
	sum.States = make([]device.State, len(vaults))
	for i, v := range vaults {
		st, lerr := v.Load()
		if lerr != nil {
			err = errors.Join(err, lerr)
		}
		sum.States[i] = st
	}
	return sum, err
}

// device runs one device, restarting its agent after a simulated power loss.
func (s *sim) device(ctx context.Context, i int, v *device.MemoryVault, drop, kill bool, delay time.Duration) error {
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-ctx.Done():
			return nil
		}
	}
	var counted atomic.Bool
	dropped := false
	var total device.Stats
	defer func() {
		s.mu.Lock()
		s.stats[i] = total
		s.mu.Unlock()
	}()
	for {
		o := device.Options{
			Vault: v, Installer: hashInstaller{}, Logger: s.o.Logger, BrokerURL: s.o.BrokerURL,
			Window: s.o.Window, ChunkTimeout: s.o.ChunkTimeout, AckResend: s.o.AckResend, AckResendMax: s.o.AckResendMax,
			ReconnectMin: s.o.ReconnectMin, ReconnectMax: s.o.ReconnectMax, ProgressInterval: time.Hour,
		}
		o.Faults.AckDelay = s.o.AckDelay
		o.Faults.CrashAfterInstall = kill
		if drop && !dropped {
			o.Faults.DropAfterChunk = func(c uint32) bool {
				if c == s.o.DropAfter && !dropped {
					dropped = true
					return true
				}
				return false
			}
		}
		o.OnEvent = func(e device.Event) {
			if s.o.OnEvent != nil {
				s.o.OnEvent(e)
			}
			switch e.Kind {
			case device.EventFailed:
				s.mu.Lock()
				s.failed[e.Serial] = e.Code
				s.mu.Unlock()
			case device.EventConfirmed:
				if e.Version >= s.o.TargetVersion && counted.CompareAndSwap(false, true) {
					s.mu.Lock()
					delete(s.failed, e.Serial)
					s.done = append(s.done, time.Since(s.start))
					s.mu.Unlock()
					if s.left.Add(-1) == 0 {
						close(s.all)
					}
				}
			}
		}
		a, err := device.New(o)
		if err != nil {
			return err
		}
		err = a.Run(ctx)
		st := a.Stats()
		total.Connects += st.Connects
		total.Disconnects += st.Disconnects
		total.ChunkFetches += st.ChunkFetches
		total.ChunksBad += st.ChunksBad
		total.Installs += st.Installs
		total.AcksSent += st.AcksSent
		total.ReportsSent += st.ReportsSent
		total.Confirmed += st.Confirmed
		if !errors.Is(err, device.ErrCrashed) {
			return err
		}
		kill = false // one power loss per device
		select {
		case <-time.After(s.o.RestartDelay):
		case <-ctx.Done():
			return nil
		}
	}
}

// hashInstaller discards the image after hashing it against the manifest.
type hashInstaller struct{}

func (hashInstaller) Begin(m *keychain.Manifest) (device.Install, error) {
	return &hashInstall{h: sha256.New(), want: m.ImageSHA256}, nil
}

type hashInstall struct {
	h    hash.Hash
	want [32]byte
}

func (i *hashInstall) Write(p []byte) (int, error) { return i.h.Write(p) }
func (i *hashInstall) Abort() error                { return nil }
func (i *hashInstall) Commit() error {
	var got [32]byte
	if i.h.Sum(got[:0]); got != i.want {
		return errors.New("simulate: image hash differs from the manifest")
	}
	return nil
}
