package updater

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// statusInterval is how often changed release and fleet statuses are re-published: often
// enough for a person watching, rarely enough to cost nothing during a large fan-out.
const statusInterval = 250 * time.Millisecond

func deviceStatus(d *Device, state protocol.DeviceStatusState, result string, now time.Time) protocol.DeviceStatus {
	s := protocol.DeviceStatus{Serial: d.Serial, State: state, Version: d.Version, Epoch: d.Epoch, Seq: d.Seq, LastResult: result, Tags: d.Tags, Updated: now}
	if n := len(d.Assigned); n > 0 {
		id := d.Assigned[n-1]
		s.Release = &id
	}
	if !d.LastSeen.IsZero() {
		t := d.LastSeen
		s.LastSeen = &t
	}
	return s
}

// deviceStatusMessage is the retained message of the server's view of a device
// ([SC-9.1], PROTOCOL.md 13.4).
func deviceStatusMessage(d *Device, state protocol.DeviceStatusState, result string, now time.Time) protocol.Message {
	st := deviceStatus(d, state, result, now)
	st.LastSeen = &now
	b, _ := json.Marshal(st)
	return protocol.Message{Topic: protocol.DeviceStatusTopic(d.Serial), Payload: b, Retain: true}
}

// statusPublisher publishes the retained release and fleet statuses (PROTOCOL.md 13),
// coalescing changes over statusInterval, and completes the releases whose targets have
// all settled. It is the one owner of what changed since the last round and of the
// devices online.
type statusPublisher struct {
	store Store
	bus   Bus
	runs  *registry
	life  *lifecycle
	log   zerolog.Logger
	now   func() time.Time

	mu     sync.Mutex
	dirty  map[keychain.ReleaseID]bool // release statuses to publish
	fleet  bool                        // the fleet status changed
	online map[string]bool
	// versions counts the devices by installed version, as last counted at versionsAt
	// (versionCounts: it reads every device, rarely; devices provisioned since are added
	// at version 0; counted again sooner when devices were removed or a release completed).
	versions   map[string]int
	versionsAt time.Time
	// versionsTook is how long the last count took.
	versionsTook time.Duration
	// prefetched is the release each device said it holds whole (12.7), and count how
	// many devices hold each.
	prefetched map[string]keychain.ReleaseID
	count      map[keychain.ReleaseID]int
}

func newStatusPublisher(store Store, bus Bus, runs *registry, life *lifecycle, log zerolog.Logger, now func() time.Time) *statusPublisher {
	return &statusPublisher{
		store: store, bus: bus, runs: runs, life: life, log: log, now: now,
		dirty: map[keychain.ReleaseID]bool{}, online: map[string]bool{},
		prefetched: map[string]keychain.ReleaseID{}, count: map[keychain.ReleaseID]int{},
	}
}

// releaseChanged marks a release's status for the next round.
func (s *statusPublisher) releaseChanged(id keychain.ReleaseID) {
	s.mu.Lock()
	s.dirty[id] = true
	s.mu.Unlock()
}

// fleetChanged marks the fleet status (devices or release states changed) for the next round.
func (s *statusPublisher) fleetChanged() {
	s.mu.Lock()
	s.fleet = true
	s.mu.Unlock()
}

// onPresence follows the devices' retained presence ([SC-9.3]).
func (s *statusPublisher) onPresence(topic string, payload []byte) {
	serial, _, ok := protocol.DeviceOf(topic)
	if !ok {
		return
	}
	s.mu.Lock()
	if string(payload) == protocol.Online {
		s.online[serial] = true
	} else {
		delete(s.online, serial)
	}
	s.fleet = true
	s.mu.Unlock()
}

// onState follows the devices' state documents for their prefetch (13.3, 12.7): a
// device whose document says it holds every chunk of a release counts for it.
func (s *statusPublisher) onState(topic string, payload []byte) {
	serial, _, ok := protocol.DeviceOf(topic)
	if !ok {
		return
	}
	var id keychain.ReleaseID
	if bytes.Contains(payload, []byte(`"prefetch"`)) {
		var d struct {
			Prefetch *protocol.PrefetchState `json:"prefetch"`
		}
		if json.Unmarshal(payload, &d) == nil && d.Prefetch != nil && d.Prefetch.ChunkCount > 0 && d.Prefetch.ChunksDone == d.Prefetch.ChunkCount {
			id = d.Prefetch.Release
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	old, had := s.prefetched[serial]
	if had && old == id {
		return
	}
	if had {
		if s.count[old]--; s.count[old] <= 0 {
			delete(s.count, old)
		}
		delete(s.prefetched, serial)
		s.dirty[old] = true
	}
	if id != (keychain.ReleaseID{}) {
		s.prefetched[serial] = id
		s.count[id]++
		s.dirty[id] = true
	}
}

// prefetchedCount is how many devices said they hold every chunk of release id.
func (s *statusPublisher) prefetchedCount(id keychain.ReleaseID) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.count[id]
}

// onlineOf reports, for each serial, whether its presence says online now.
func (s *statusPublisher) onlineOf(serials []string) []bool {
	on := make([]bool, len(serials))
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, serial := range serials {
		on[i] = s.online[serial]
	}
	return on
}

// onlineCount is how many devices' presence says online now.
func (s *statusPublisher) onlineCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.online)
}

// releaseStatus is the status of rel, with counts read from the store so that every
// updater sharing it publishes the same.
func (s *statusPublisher) releaseStatus(ctx context.Context, rel *Release) protocol.ReleaseStatus {
	if fresh, err := s.store.Release(ctx, rel.ID); err == nil {
		rel = fresh
	}
	st := protocol.ReleaseStatus{
		Release: rel.ID, Version: rel.Version, Label: rel.Label, State: rel.State,
		Installed: rel.Installed, Failed: rel.Failed, ChunkSize: rel.ChunkSize, ChunkCount: rel.ChunkCount,
		ImageSize: rel.ImageSize, Created: rel.Created, Updated: s.now(),
	}
	if n, held := s.runs.targetCount(rel.ID); held {
		st.Targets = n
		if r := s.runs.get(rel.ID); r != nil {
			st.Wrapped = int(r.wrapped.Load())
			st.TimedOut = int(r.timedOut.Load())
		}
	} else if ts, err := s.store.Targets(ctx, rel.ID); err == nil {
		st.Targets = len(ts)
	}
	st.Pending = max(0, st.Targets-st.Installed-st.Failed)
	st.InstallTimes = installCurve(rel.InstallTimes)
	if rel.Prefetch {
		st.Prefetch, st.Prefetched = true, s.prefetchedCount(rel.ID)
	}
	if len(rel.Waves) > 0 || len(rel.Canary) > 0 || rel.MaxConcurrent > 0 || rel.MaxFailures != "" || rel.DeviceTimeout > 0 {
		s.rolloutStatus(&st, rel)
	}
	if rel.State == protocol.ReleasePaused || rel.State == protocol.ReleaseCancelled {
		st.PauseReason = rel.PauseReason
	}
	return st
}

// installCurve returns the time-to-installed curve of a release whose first installs
// counted counts in each bucket (13.2): for each bound in turn, how many had installed
// within it, up to the first bound by which all of them had.
func installCurve(counts []int) []protocol.InstallTime {
	total := 0
	for _, n := range counts {
		total += n
	}
	var out []protocol.InstallTime
	for i, sum := 0, 0; i < len(protocol.InstallTimeBounds) && sum < total; i++ {
		if i < len(counts) {
			sum += counts[i]
		}
		out = append(out, protocol.InstallTime{Within: int64(protocol.InstallTimeBounds[i] / time.Second), Installed: sum})
	}
	return out
}

// rolloutStatus fills in the rollout fields of st, the status of rel (13.2): the plan's
// waves, their times, and, while the release is held, what the rollout loop last
// counted of each.
func (s *statusPublisher) rolloutStatus(st *protocol.ReleaseStatus, rel *Release) {
	st.MaxConcurrent, st.DefaultBound = rel.MaxConcurrent, rel.DefaultBound
	sizes, err := protocol.WaveSizes(rel.Waves, st.Targets)
	r := s.runs.get(rel.ID)
	if r != nil && r.sizes != nil {
		sizes, err = r.sizes, nil // the plan the release runs by, canaries included
	} else if len(rel.Canary) > 0 && err == nil {
		sizes = slices.Compact(append([]int{min(len(rel.Canary), st.Targets)}, sizes...))
	}
	if err != nil {
		return
	}
	w := min(rel.Wave, len(sizes)-1)
	st.Offered = offered(rel, sizes[w])
	var t *tally
	if r != nil {
		t = r.tally.Load()
	}
	if t != nil {
		st.TimedOut = t.timedOut
		if len(t.codes) > 0 {
			st.Failures = maps.Clone(t.codes)
		}
	}
	if len(rel.Waves) == 0 && len(rel.Canary) == 0 {
		return
	}
	st.Wave = w + 1
	for i := range sizes {
		ws := protocol.WaveStatus{Wave: i + 1, Size: sizes[i]}
		if i > 0 {
			ws.Size -= sizes[i-1]
		}
		if i < len(rel.WaveLog) {
			rec := rel.WaveLog[i]
			ws.Opened, ws.Closed = timeOrNil(rec.Opened), timeOrNil(rec.Closed)
			ws.Installed, ws.Failed, ws.TimedOut = rec.Installed, rec.Failed, rec.TimedOut
		}
		if t != nil && i < len(t.waves) {
			ws.Size, ws.Installed, ws.Failed, ws.TimedOut = t.waves[i].Size, t.waves[i].Installed, t.waves[i].Failed, t.waves[i].TimedOut
		}
		st.Waves = append(st.Waves, ws)
	}
	if w+1 < len(sizes) && w < len(rel.WaveLog) && !rel.WaveLog[w].Closed.IsZero() {
		if at := rel.WaveLog[w].Closed.Add(rel.Soak); s.now().Before(at) {
			st.NextWave, st.NextWaveAt = "soak", &at
		} else if rel.Approve && rel.Approved <= w {
			st.NextWave = "approval"
		}
	}
}

func timeOrNil(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	return &t
}

// loop publishes the statuses that changed every statusInterval, and every release's
// at least every 5 s, until ctx ends; then it publishes once more.
func (s *statusPublisher) loop(ctx context.Context) {
	t := time.NewTicker(statusInterval)
	defer t.Stop()
	lastFleet := time.Time{}
	for {
		select {
		case <-ctx.Done():
			// One last round with a fresh context so the final numbers are out.
			fctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			s.flush(fctx, true)
			cancel()
			return
		case <-t.C:
			force := time.Since(lastFleet) > 5*time.Second
			s.flush(ctx, force)
			if force {
				lastFleet = time.Now()
			}
		}
	}
}

// take returns the releases to publish and whether the fleet status is due, and starts
// a new round. all marks every held release: acks that another updater of the ack group
// processed mark nothing here, so every release is looked at now and then, and completes
// all the same.
func (s *statusPublisher) take(all bool) ([]keychain.ReleaseID, bool) {
	var held []*run
	if all {
		held = s.runs.all()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range held {
		s.dirty[r.release().ID] = true
	}
	ids := make([]keychain.ReleaseID, 0, len(s.dirty))
	for id := range s.dirty {
		ids = append(ids, id)
	}
	s.dirty = map[keychain.ReleaseID]bool{}
	fleet := all || s.fleet
	s.fleet = false
	return ids, fleet
}

func (s *statusPublisher) flush(ctx context.Context, all bool) {
	ids, fleet := s.take(all)
	var msgs []protocol.Message
	for _, id := range ids {
		rel, err := s.store.Release(ctx, id)
		if err != nil {
			if !errors.Is(err, ErrNotFound) {
				s.releaseChanged(id) // the store is down: try again, or a completion is never noticed
			}
			continue
		}
		st := s.releaseStatus(ctx, rel)
		if st.State == protocol.ReleaseActive && s.settled(ctx, rel, st) && s.complete(ctx, &st) {
			st.State = protocol.ReleaseCompleted
			fleet = true
		}
		b, _ := json.Marshal(st)
		msgs = append(msgs, protocol.Message{Topic: protocol.ReleaseStatusTopic(id), Payload: b, Retain: true})
	}
	if fleet {
		if fs, err := s.fleetStatus(ctx); err == nil {
			b, _ := json.Marshal(fs)
			msgs = append(msgs, protocol.Message{Topic: protocol.FleetStatusTopic, Payload: b, Retain: true})
		}
	}
	if len(msgs) > 0 {
		if err := s.bus.Publish(ctx, msgs...); err != nil && ctx.Err() == nil {
			s.log.Warn().Err(err).Msg("publishing status")
		}
	}
}

// complete marks a settled release completed and reports whether it is.
func (s *statusPublisher) complete(ctx context.Context, st *protocol.ReleaseStatus) bool {
	var keep []func(*Release)
	if r := s.runs.get(st.Release); r != nil && len(st.Waves) > 0 {
		// Its final counts, kept with the release for its status once it leaves memory.
		ws, err := finalCounts(ctx, s.store, r, s.runs.removedFrom(st.Release), st.Failed == 0)
		if err != nil {
			s.releaseChanged(st.Release)
			return false
		}
		now := s.now()
		keep = append(keep, keepCounts(ws), func(rel *Release) {
			for i := range rel.WaveLog { // every target settled: the waves still open close now
				if rel.WaveLog[i].Closed.IsZero() {
					rel.WaveLog[i].Closed = now
				}
			}
		})
		for i := range st.Waves {
			sw := &st.Waves[i]
			sw.Size, sw.Installed, sw.Failed, sw.TimedOut = ws[i].Size, ws[i].Installed, ws[i].Failed, 0
			if sw.Opened != nil && sw.Closed == nil {
				sw.Closed = &now
			}
		}
	}
	if _, err := s.life.change(ctx, st.Release, protocol.ReleaseCompleted, keep...); err != nil {
		if !errors.Is(err, ErrTransition) && !errors.Is(err, ErrNotFound) { // else paused, cancelled or gone meanwhile
			s.log.Warn().Err(err).Str("release", st.Release.String()).Msg("marking the release completed; will retry")
			s.releaseChanged(st.Release)
		}
		return false
	}
	s.runs.remove(st.Release)
	s.mu.Lock()
	s.versionsAt = time.Time{} // count the versions again at the next fleet status
	s.mu.Unlock()
	s.log.Info().Str("release", st.Release.String()).Int("installed", st.Installed).Int("failed", st.Failed).Msg("release completed")
	return true
}

// settled reports whether every target of rel has installed it or failed permanently, so
// that the release is completed ([SC-12.2]). st holds the release's counts. A target
// whose failure is transient (the device retries) keeps the release active.
func (s *statusPublisher) settled(ctx context.Context, rel *Release, st protocol.ReleaseStatus) bool {
	if st.Targets == 0 || st.Installed+st.Failed < st.Targets {
		return false
	}
	if st.Failed == 0 {
		return true
	}
	targets, err := s.store.Targets(ctx, rel.ID)
	if err != nil {
		return false // checked again at the next report
	}
	for i := 0; i < len(targets); i += batchSize {
		results, err := s.store.Results(ctx, rel.ID, targets[i:min(i+batchSize, len(targets))])
		if err != nil {
			return false
		}
		for _, r := range results {
			if r != ResultInstalled && !permanentFailure(r) {
				return false
			}
		}
	}
	return true
}

func (s *statusPublisher) fleetStatus(ctx context.Context) (protocol.FleetStatus, error) {
	n, err := s.store.DeviceCount(ctx)
	if err != nil {
		return protocol.FleetStatus{}, err
	}
	rels, err := s.store.Releases(ctx)
	if err != nil {
		return protocol.FleetStatus{}, err
	}
	fs := protocol.FleetStatus{Devices: n, Releases: map[protocol.ReleaseState]int{}, Updated: s.now(), Online: s.onlineCount()}
	for _, r := range rels {
		fs.Releases[r.State]++
	}
	fs.Versions = s.versionCounts(ctx, n)
	return fs, nil
}

// versionsEvery is how often, at the most, the fleet's devices are counted by installed
// version; a count that took d waits at least versionsSpacing × d before the next, so
// that counting a fleet of a million (every device read) never takes more than a
// twentieth of a core and of the store.
const (
	versionsEvery   = time.Minute
	versionsSpacing = 20
)

// versionCounts counts the fleet's devices (devices of them) by installed version, reading them in
// batches, at most as often as versionsEvery and versionsSpacing allow (the counts of the
// last time otherwise). Devices provisioned since, which are at version 0, are added to
// the last counts without reading anything.
func (s *statusPublisher) versionCounts(ctx context.Context, devices int) map[string]int {
	s.mu.Lock()
	total := 0
	for _, n := range s.versions {
		total += n
	}
	fresh := s.versions != nil && time.Since(s.versionsAt) < max(versionsEvery, versionsSpacing*s.versionsTook)
	last := s.versions
	if fresh && total < devices {
		last = maps.Clone(last)
		last["0"] += devices - total
		s.versions = last
	}
	s.mu.Unlock()
	if fresh && total <= devices {
		return last
	}
	start := time.Now()
	serials, err := s.store.Serials(ctx)
	if err != nil {
		return last
	}
	counts := map[string]int{}
	for i := 0; i < len(serials); i += batchSize {
		devs, err := s.store.Devices(ctx, serials[i:min(i+batchSize, len(serials))])
		if err != nil {
			return last
		}
		for _, d := range devs {
			if d != nil {
				counts[strconv.FormatUint(d.Version, 10)]++
			}
		}
	}
	s.mu.Lock()
	s.versions, s.versionsAt, s.versionsTook = counts, time.Now(), time.Since(start)
	s.mu.Unlock()
	return counts
}

// permanentFailure reports whether a recorded result is a failure the device does not
// retry (PROTOCOL.md 15.1).
func permanentFailure(result string) bool {
	name, failed := strings.CutPrefix(result, ResultFailed+":")
	var c protocol.Code
	return failed && c.UnmarshalText([]byte(name)) == nil && c.Permanent()
}

// offered is how many targets of a release with waves or a concurrency bound have been
// offered it, when the waves open so far hold size: all of them, or with a bound, those
// it has admitted (before its first step, as many as the bound).
func offered(rel *Release, size int) int {
	if rel.MaxConcurrent == 0 {
		return size
	}
	if rel.Admitted == 0 {
		return min(rel.MaxConcurrent, size)
	}
	return min(rel.Admitted, size)
}
