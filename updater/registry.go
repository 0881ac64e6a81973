package updater

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// run is an active or paused release held in memory: its targets, its content key, and
// the fan-out that wraps that key for each target. Its release record is replaced whole,
// never changed in place, so that the fan-out, the ack workers, admin commands and the
// status publisher read it at once without a lock.
type run struct {
	rel    atomic.Pointer[Release]
	ck     keychain.ContentKey
	digest [32]byte
	// targets is guarded by the registry's lock: a deprovisioned device leaves it.
	targets map[string]struct{}
	sorted  []string // the targets at the start, in order (rollout order with waves), for the fan-out
	// With waves (PROTOCOL.md 12.5): sizes are the cumulative wave sizes over sorted,
	// rank each target's place in it, and wave the index of the wave open now. A target
	// is offered the release only once its wave is open.
	sizes []int
	rank  map[string]int
	wave  atomic.Int32
	// With a concurrency bound: cap, and offered, how many targets in rollout order
	// may have their key now (never more than the open waves hold).
	cap     int
	offered atomic.Int32
	// With a device timeout: when each target was first offered its key (guarded by the
	// registry's lock; after a restart the clocks start again), and how many offered
	// targets the rollout loop last found timed out.
	offeredAt map[string]time.Time
	timedOut  atomic.Int32
	// removed holds the targets in sorted that were deprovisioned since the start
	// (guarded by the registry's lock): they no longer count in their wave.
	removed map[string]bool
	// installed marks the targets in sorted known to have installed the release (the
	// rollout loop's alone: it reads them no more), and tally is what it last counted.
	installed []bool
	tally     atomic.Pointer[tally]

	// gate, if set, holds every key back until a start time and outside a window;
	// gateOpen is whether the admin service last found it open (it owns the field).
	gate     *gate
	gateOpen bool

	// fanFrom is where in sorted the next fan-out starts: the first device of the wave
	// just opened. Set by the admin service before it starts a fan-out.
	fanFrom int
	wrapped atomic.Int64
	paused  atomic.Bool

	// cancel stops the fan-out in progress and done is closed when it ends. Only the
	// admin service, one command at a time, starts and stops fan-outs.
	cancel context.CancelFunc
	done   chan struct{}
}

// release returns the release as last recorded; the caller must not change it.
func (r *run) release() *Release { return r.rel.Load() }

func newRun(k *keys, rel *Release, targets []string) (*run, error) {
	ck, err := k.openContentKey(rel)
	if err != nil {
		return nil, err
	}
	r := &run{ck: ck, digest: keychain.ManifestDigest(rel.Manifest), targets: make(map[string]struct{}, len(targets))}
	r.rel.Store(rel)
	for _, s := range targets {
		r.targets[s] = struct{}{}
	}
	// Stores return targets sorted; a release to listed devices has them in the
	// operator's order, possibly repeated.
	r.sorted = targets
	if !slices.IsSorted(targets) || len(r.targets) != len(targets) {
		r.sorted = slices.Sorted(maps.Keys(r.targets))
	}
	if len(rel.Waves) > 0 || len(rel.Canary) > 0 || rel.MaxConcurrent > 0 || rel.MaxFailures != "" || rel.DeviceTimeout > 0 {
		if r.sorted, r.sizes, err = protocol.CanaryPlan(rel.ID, r.sorted, rel.Canary, rel.Waves); err != nil {
			return nil, fmt.Errorf("updater: release %s: %w", rel.ID, err)
		}
		r.rank = make(map[string]int, len(r.sorted))
		for i, s := range r.sorted {
			r.rank[s] = i
		}
		r.wave.Store(int32(min(rel.Wave, len(r.sizes)-1)))
		if r.cap = rel.MaxConcurrent; r.cap > 0 {
			r.offered.Store(int32(offered(rel, r.sizes[r.wave.Load()])))
		}
	}
	if rel.DeviceTimeout > 0 {
		r.offeredAt = map[string]time.Time{}
	}
	if !rel.StartAt.IsZero() || rel.Window != "" {
		r.gate = &gate{start: rel.StartAt}
		if rel.Window != "" {
			if r.gate.window, err = protocol.ParseWindow(rel.Window); err != nil {
				return nil, fmt.Errorf("updater: release %s: %w", rel.ID, err)
			}
		}
	}
	r.paused.Store(rel.State == protocol.ReleasePaused)
	return r, nil
}

// gate holds a release's keys back until a start time and outside a weekly window
// (PROTOCOL.md 12.6).
type gate struct {
	start  time.Time
	window *protocol.Window
}

// open reports whether keys may go out at t. A nil gate is always open.
func (g *gate) open(t time.Time) bool {
	return g == nil || !t.Before(g.start) && (g.window == nil || g.window.Contains(t))
}

// open is how many devices, from the start of sorted, may be offered the release now:
// all of them without waves, else those of the waves opened so far.
func (r *run) open() int {
	if r.sizes == nil {
		return len(r.sorted)
	}
	n := r.sizes[r.wave.Load()]
	if r.cap > 0 {
		n = min(n, int(r.offered.Load()))
	}
	return n
}

// planWaves returns a WaveStatus for each wave of the plan, with its number and size.
func (r *run) planWaves() []protocol.WaveStatus {
	ws := make([]protocol.WaveStatus, len(r.sizes))
	for i, end := range r.sizes {
		ws[i] = protocol.WaveStatus{Wave: i + 1, Size: end}
		if i > 0 {
			ws[i].Size -= r.sizes[i-1]
		}
	}
	return ws
}

// rankOf returns serial's place in the rollout order (rank is set once, at newRun, and
// only read afterwards).
func (r *run) rankOf(serial string) (int, bool) {
	i, ok := r.rank[serial]
	return i, ok
}

// waveOf returns the wave of the target at index i of sorted.
func (r *run) waveOf(i int) int {
	w, _ := slices.BinarySearch(r.sizes, i+1)
	return w
}

// admitted reports whether serial's wave is open. Called with the registry's lock held.
func (r *run) admitted(serial string) bool {
	if r.sizes == nil {
		return true
	}
	rank, ok := r.rank[serial]
	return ok && rank < r.open() // a device that joined later (follow) has no rank
}

// registry is the one owner of the releases held in memory: those publishing, active or
// paused. Everything else reads them through it.
type registry struct {
	store Store
	keys  *keys
	now   func() time.Time // the clock of release gates

	mu   sync.Mutex
	runs map[keychain.ReleaseID]*run
}

func newRegistry(store Store, k *keys, now func() time.Time) *registry {
	return &registry{store: store, keys: k, now: now, runs: map[keychain.ReleaseID]*run{}}
}

func (g *registry) get(id keychain.ReleaseID) *run {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.runs[id]
}

func (g *registry) has(id keychain.ReleaseID) bool { return g.get(id) != nil }

func (g *registry) add(r *run) {
	g.mu.Lock()
	g.runs[r.release().ID] = r
	g.mu.Unlock()
}

func (g *registry) remove(id keychain.ReleaseID) {
	g.mu.Lock()
	delete(g.runs, id)
	g.mu.Unlock()
}

// all returns the runs held now, in no order.
func (g *registry) all() []*run {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Collect(maps.Values(g.runs))
}

// targetCount returns how many targets a held release has now, and whether it is held.
func (g *registry) targetCount(id keychain.ReleaseID) (int, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	r := g.runs[id]
	if r == nil {
		return 0, false
	}
	return len(r.targets), true
}

// isTarget reports whether serial is a target of the held release id.
func (g *registry) isTarget(id keychain.ReleaseID, serial string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	r := g.runs[id]
	if r == nil {
		return false
	}
	_, ok := r.targets[serial]
	return ok
}

// addTargets adds serials to the targets of the held release id (devices that join a
// release that follows them).
func (g *registry) addTargets(id keychain.ReleaseID, serials []string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if r := g.runs[id]; r != nil {
		for _, s := range serials {
			r.targets[s] = struct{}{}
		}
	}
}

// markOffered notes when the targets of release id in serials were first offered its key,
// for its device timeout.
func (g *registry) markOffered(id keychain.ReleaseID, serials []string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	r := g.runs[id]
	if r == nil || r.offeredAt == nil {
		return
	}
	now := g.now()
	for _, s := range serials {
		if _, ok := r.offeredAt[s]; !ok {
			r.offeredAt[s] = now
		}
	}
}

// timedOut reports whether serial was first offered release id's key at least d before now.
func (g *registry) timedOut(id keychain.ReleaseID, serial string, now time.Time, d time.Duration) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	r := g.runs[id]
	if r == nil || r.offeredAt == nil {
		return false
	}
	t, ok := r.offeredAt[serial]
	return ok && now.Sub(t) >= d
}

// removedFrom returns a copy of the targets deprovisioned from release id since it was
// loaded.
func (g *registry) removedFrom(id keychain.ReleaseID) map[string]bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if r := g.runs[id]; r != nil {
		return maps.Clone(r.removed)
	}
	return nil
}

// removeTarget takes serial out of the targets of every held release and returns the ids
// of those it was a target of.
func (g *registry) removeTarget(serial string) []keychain.ReleaseID {
	g.mu.Lock()
	defer g.mu.Unlock()
	var ids []keychain.ReleaseID
	for id, r := range g.runs {
		if _, ok := r.targets[serial]; ok {
			delete(r.targets, serial)
			ids = append(ids, id)
			if r.removed == nil {
				r.removed = map[string]bool{}
			}
			r.removed[serial] = true
		}
	}
	return ids
}

// pendingFor returns the release device d should be offered next: the newest active
// release that targets it with a version above what it runs.
func (g *registry) pendingFor(d *Device) *run {
	g.mu.Lock()
	defer g.mu.Unlock()
	var best *run
	now := g.now()
	for _, r := range g.runs {
		rel := r.release()
		if !r.gate.open(now) {
			continue
		}
		if r.paused.Load() || rel.State != protocol.ReleaseActive || rel.Version <= d.Version {
			continue
		}
		if _, ok := r.targets[d.Serial]; !ok || !r.admitted(d.Serial) {
			continue
		}
		if best == nil || rel.Version > best.release().Version {
			best = r
		}
	}
	return best
}

// load reads the publishing, active and paused releases from the store and holds them in
// place of those held before. A run whose state did not change is kept (with its
// fan-out and counts).
func (g *registry) load(ctx context.Context) error {
	rels, err := g.store.Releases(ctx)
	if err != nil {
		return fmt.Errorf("updater: loading releases: %w", err)
	}
	runs := map[keychain.ReleaseID]*run{}
	for _, rel := range rels {
		if rel.State != protocol.ReleaseActive && rel.State != protocol.ReleasePaused && rel.State != protocol.ReleasePublishing {
			continue
		}
		if old := g.get(rel.ID); old != nil && old.release().State == rel.State {
			runs[rel.ID] = old
			continue
		}
		targets, err := g.store.Targets(ctx, rel.ID)
		if err != nil {
			return fmt.Errorf("updater: loading targets of release %s: %w", rel.ID, err)
		}
		r, err := newRun(g.keys, rel, targets)
		if err != nil {
			return err
		}
		runs[rel.ID] = r
	}
	g.mu.Lock()
	g.runs = runs
	g.mu.Unlock()
	return nil
}
