package simulate

import (
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// Progress is a snapshot of a running fleet.
type Progress struct {
	Devices int
	// Version is what Confirmed counts: the target version, or with Continuous the
	// newest version any device has confirmed (0 before the first).
	Version   uint64
	Confirmed int // devices that confirmed Version or newer
	Failed    int // devices whose last attempt failed and that confirmed nothing since
	Online    int // devices connected to the broker now
	// Installs counts images committed (a redone update counts twice), ChunkFetches
	// chunk subscriptions, Reconnects every connection after a device's first
	// (after a dropped link or a power loss).
	Installs, ChunkFetches, Reconnects uint64
	Drops, Kills                       int // faults injected so far
	Elapsed                            time.Duration
}

// VersionSummary says how the fleet reached one version.
type VersionSummary struct {
	Version uint64
	// Confirmed counts the devices that confirmed Version or newer, AlreadyDone those
	// among them whose vault held a confirmed install of Version or newer at the start.
	Confirmed, AlreadyDone int
	// Start is when the first key message of a release of Version or newer reached a
	// device, from the start of the run.
	Start time.Duration
	// T50, T90 and T100 are the times from Start until 50, 90 and 100 % of the devices
	// had confirmed Version or newer (AlreadyDone devices count at once); 0 when the
	// fraction was not reached.
	T50, T90, T100 time.Duration
}

// Reached reports whether at least frac of devices confirmed the version.
func (v VersionSummary) Reached(frac float64, devices int) bool {
	return devices > 0 && v.Confirmed >= need(frac, devices)
}

// Summary is the outcome of a simulation.
type Summary struct {
	Devices int
	// VersionSummary is about TargetVersion, or with Continuous the newest version any
	// device confirmed.
	VersionSummary
	// Failed counts devices whose last attempt failed and that confirmed nothing since;
	// FailedForGood those among them whose code the agent does not retry. Codes counts
	// Failed by report code.
	Failed, FailedForGood int
	Codes                 map[string]int
	Elapsed               time.Duration
	// Versions has one entry per version some device confirmed during the run, oldest
	// first.
	Versions []VersionSummary
	Stats    device.Stats // summed over all agents, including restarted ones
	// Drops and Kills count the faults injected: dropped connections, power losses.
	Drops, Kills int
	PeakHeap     uint64 // largest runtime HeapInuse sampled (whole process)
	// States holds each device's vault as the run left it, in the order of
	// Options.Devices (or Options.Vaults): what the device itself believes it installed,
	// at which sequence number.
	States []device.State
}

func (s Summary) String() string {
	return fmt.Sprintf("%d devices: v%d confirmed by %d (%d already), %d failed %v; t50 %v t90 %v t100 %v; elapsed %v; drops %d kills %d; chunk fetches %d; acks %d; peak heap %d MiB",
		s.Devices, s.Version, s.Confirmed, s.AlreadyDone, s.Failed, s.Codes, s.T50, s.T90, s.T100, s.Elapsed,
		s.Drops, s.Kills, s.Stats.ChunkFetches, s.Stats.AcksSent, s.PeakHeap>>20)
}

// tracker turns the agents' events into progress and a summary.
type tracker struct {
	continuous bool
	target     uint64
	start      time.Time

	fetches, installs, reconnects atomic.Uint64
	drops, kills, online          atomic.Int64

	mu         sync.Mutex
	devs       []devTrack
	firstKey   map[keychain.ReleaseID]time.Duration
	relVersion map[keychain.ReleaseID]uint64
	versions   map[uint64]bool // confirmed during the run
	newest     uint64
	settled    int
	settledCh  chan struct{}
}

type devTrack struct {
	initial   uint64 // confirmed version in the vault at the start
	best      uint64 // highest confirmed version
	confirms  []confirm
	failed    bool
	code      protocol.Code
	settled   bool
	connected bool // ever; used only on the device's own goroutine
	online    bool // now; likewise
}

type confirm struct {
	version uint64
	at      time.Duration
}

func newTracker(o Options, states []device.State) *tracker {
	t := &tracker{
		continuous: o.Continuous, target: o.TargetVersion, start: time.Now(),
		devs:     make([]devTrack, len(states)),
		firstKey: map[keychain.ReleaseID]time.Duration{}, relVersion: map[keychain.ReleaseID]uint64{},
		versions: map[uint64]bool{}, settledCh: make(chan struct{}),
	}
	for i, st := range states {
		if st.LastAck == nil || st.LastAckConfirmed {
			t.devs[i].initial = st.Version
			t.devs[i].best = st.Version
			t.newest = max(t.newest, st.Version)
		}
		t.settle(i)
	}
	t.checkSettled()
	return t
}

// settle updates device i's part of the settled count; t.mu is held (or t is new).
func (t *tracker) settle(i int) {
	if t.continuous {
		return
	}
	d := &t.devs[i]
	s := d.best >= t.target || (d.failed && d.code.Permanent())
	if s != d.settled {
		d.settled = s
		if s {
			t.settled++
		} else {
			t.settled--
		}
	}
}

func (t *tracker) checkSettled() {
	if !t.continuous && t.settled == len(t.devs) {
		select {
		case <-t.settledCh:
		default:
			close(t.settledCh)
		}
	}
}

// on records event e of device i. It runs on the device's agent goroutine.
func (t *tracker) on(i int, e device.Event) {
	switch e.Kind {
	case device.EventChunkFetch:
		t.fetches.Add(1)
		return
	case device.EventConnected:
		if t.devs[i].connected {
			t.reconnects.Add(1)
		}
		t.devs[i].connected = true
		t.setOnline(i, true)
		return
	case device.EventDisconnected:
		t.setOnline(i, false)
		return
	case device.EventCommitted:
		t.installs.Add(1)
	case device.EventKeyMessage, device.EventConfirmed, device.EventFailed:
	default:
		return
	}
	at := time.Since(t.start)
	t.mu.Lock()
	defer t.mu.Unlock()
	d := &t.devs[i]
	switch e.Kind {
	case device.EventKeyMessage:
		if _, ok := t.firstKey[e.Release]; !ok {
			t.firstKey[e.Release] = at
		}
	case device.EventCommitted:
		if _, ok := t.relVersion[e.Release]; !ok {
			t.relVersion[e.Release] = e.Version
		}
	case device.EventConfirmed:
		d.failed = false
		if e.Version > d.best { // a confirmed re-key keeps the version
			d.best = e.Version
			d.confirms = append(d.confirms, confirm{e.Version, at})
			t.versions[e.Version] = true
			t.newest = max(t.newest, e.Version)
		}
		t.settle(i)
		t.checkSettled()
	case device.EventFailed:
		d.failed, d.code = true, e.Code
		t.settle(i)
		t.checkSettled()
	}
}

// setOnline records whether device i is connected; it runs on the device's goroutine
// (also after its agent stopped).
func (t *tracker) setOnline(i int, on bool) {
	if d := &t.devs[i]; d.online != on {
		d.online = on
		if on {
			t.online.Add(1)
		} else {
			t.online.Add(-1)
		}
	}
}

// version is what progress and the summary count.
func (t *tracker) version() uint64 {
	if t.continuous {
		return t.newest
	}
	return t.target
}

func (t *tracker) progress() Progress {
	p := Progress{
		Devices: len(t.devs), Installs: t.installs.Load(), ChunkFetches: t.fetches.Load(),
		Reconnects: t.reconnects.Load(), Drops: int(t.drops.Load()), Kills: int(t.kills.Load()),
		Online: int(t.online.Load()), Elapsed: time.Since(t.start),
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	p.Version = t.version()
	for i := range t.devs {
		d := &t.devs[i]
		if p.Version > 0 && d.best >= p.Version {
			p.Confirmed++
		}
		if d.failed {
			p.Failed++
		}
	}
	return p
}

func (t *tracker) summary() Summary {
	s := Summary{
		Devices: len(t.devs), Codes: map[string]int{}, Elapsed: time.Since(t.start),
		Drops: int(t.drops.Load()), Kills: int(t.kills.Load()),
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	s.VersionSummary = t.versionSummary(t.version())
	for _, v := range slices.Sorted(maps.Keys(t.versions)) {
		s.Versions = append(s.Versions, t.versionSummary(v))
	}
	for i := range t.devs {
		if d := &t.devs[i]; d.failed {
			s.Failed++
			s.Codes[d.code.String()]++
			if d.code.Permanent() {
				s.FailedForGood++
			}
		}
	}
	return s
}

// versionSummary computes how the fleet reached version v; t.mu is held.
func (t *tracker) versionSummary(v uint64) VersionSummary {
	vs := VersionSummary{Version: v}
	if v == 0 {
		return vs
	}
	start, found := time.Duration(0), false
	for rel, ver := range t.relVersion {
		if fk, ok := t.firstKey[rel]; ok && ver >= v && (!found || fk < start) {
			start, found = fk, true
		}
	}
	vs.Start = start
	var times []time.Duration
	for i := range t.devs {
		d := &t.devs[i]
		if d.initial >= v {
			vs.AlreadyDone++
			times = append(times, 0)
			continue
		}
		for _, c := range d.confirms {
			if c.version >= v {
				times = append(times, max(0, c.at-start))
				break
			}
		}
	}
	slices.Sort(times)
	vs.Confirmed = len(times)
	at := func(frac float64) time.Duration {
		if k := need(frac, len(t.devs)); len(times) >= k {
			return times[k-1]
		}
		return 0
	}
	vs.T50, vs.T90, vs.T100 = at(0.5), at(0.9), at(1)
	return vs
}

// need is how many of n devices make the fraction frac (at least one).
func need(frac float64, n int) int {
	return max(1, int(frac*float64(n)+0.999999))
}
