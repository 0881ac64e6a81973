package updater

import (
	"context"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/sealcast/sealcast/protocol"
)

// startIfOpen starts the release's fan-out if its gate lets keys out now (12.6); the
// rollout loop starts it when the gate opens, and stops it when it closes.
func (a *releaseAdmin) startIfOpen(r *run) {
	if r.gateOpen = r.gate.open(a.now()); r.gateOpen {
		a.place.start(r)
	}
}

// stepGate starts or stops a release's fan-out as its gate opens or closes, and reports
// whether it is open.
func (a *releaseAdmin) stepGate(r *run) bool {
	open := r.gate.open(a.now())
	switch {
	case open && !r.gateOpen:
		r.fanFrom = 0
		a.place.start(r)
		a.log.Info().Str("release", r.release().ID.String()).Msg("release window opened: keys go out")
	case !open && r.gateOpen:
		a.place.halt(r)
		a.log.Info().Str("release", r.release().ID.String()).Msg("release window closed: no new key goes out")
	}
	r.gateOpen = open
	return open
}

// rolloutInterval is how often the waves of releases in progress are looked at, at the
// most: a round that took d waits at least rolloutSpacing × d before the next, so that
// counting a large wave never takes more than a share of the store and of a core.
const (
	rolloutInterval = 250 * time.Millisecond
	rolloutSpacing  = 4
)

// rolloutLoop moves the waves of the releases in progress on until ctx ends.
func (a *releaseAdmin) rolloutLoop(ctx context.Context) {
	t := time.NewTimer(rolloutInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			start := time.Now()
			a.stepRollouts(ctx)
			t.Reset(max(rolloutInterval, rolloutSpacing*time.Since(start)))
		}
	}
}

// stepRollouts applies [SC-12.5] to every active release with a rollout plan: it pauses
// (or cancels) a release whose counted failures cross its threshold, offers keys as the
// concurrency bound lets it, and opens the next wave once the open ones have closed.
func (a *releaseAdmin) stepRollouts(ctx context.Context) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, r := range a.runs.all() {
		rel := r.release()
		if r.sizes == nil && r.gate == nil || rel.State != protocol.ReleaseActive || r.paused.Load() {
			continue
		}
		if r.gate != nil && !a.stepGate(r) || r.sizes == nil {
			continue
		}
		if err := a.stepRollout(ctx, r); err != nil && ctx.Err() == nil {
			a.log.Warn().Err(err).Str("release", rel.ID.String()).Msg("moving the rollout on; will retry")
		}
	}
}

func (a *releaseAdmin) stepRollout(ctx context.Context, r *run) error {
	t, err := a.count(ctx, r)
	if err != nil {
		return err
	}
	if prev := r.tally.Swap(t); prev == nil || !prev.same(t) {
		a.status.releaseChanged(r.release().ID)
	}
	if err := a.recordWaveLog(ctx, r, t); err != nil {
		return err
	}
	if over, failed, limit := overThreshold(r.release(), t, r.open()); over {
		return a.trip(ctx, r, failed, limit)
	}
	rel, w, admitted := r.release(), int(r.wave.Load()), r.open()
	if r.cap > 0 && admitted < r.sizes[w] {
		// The sliding window inside the open wave: a key for every place free.
		if free := r.cap - t.holding; free > 0 {
			return a.offer(ctx, r, w, a.reach(r, admitted, free, r.sizes[w]))
		}
		return nil
	}
	closed := w < len(rel.WaveLog) && !rel.WaveLog[w].Closed.IsZero()
	if !closed || w+1 >= len(r.sizes) {
		return nil
	}
	// The open waves have closed: the next waits for its soak time and approval.
	if a.now().Before(rel.WaveLog[w].Closed.Add(rel.Soak)) || rel.Approve && rel.Approved <= w {
		return nil
	}
	next := r.sizes[w+1]
	if r.cap > 0 {
		next = a.reach(r, admitted, max(0, r.cap-t.holding), next)
	}
	if err := a.offer(ctx, r, w+1, next); err != nil {
		return err
	}
	a.stats.wavesOpened.Add(1)
	a.log.Info().Str("release", rel.ID.String()).Int("wave", w+2).Int("of", len(r.sizes)).Int("devices", r.open()).Msg("wave opened")
	return nil
}

// reach returns how many targets, from the start of the rollout order, may be offered
// the release when free places of its bound are free and admitted were offered before,
// at most limit: free more, or with the server's default bound, which only online
// targets hold, as far as the free-th online target not offered yet (12.5).
func (a *releaseAdmin) reach(r *run, admitted, free, limit int) int {
	if !r.release().DefaultBound {
		return min(limit, admitted+free)
	}
	n := admitted
	for n < limit && free > 0 {
		batch := r.sorted[n:min(limit, n+batchSize)]
		for _, on := range a.status.onlineOf(batch) {
			n++
			if on {
				if free--; free == 0 {
					break
				}
			}
		}
	}
	return n
}

// overThreshold applies a release's failure threshold (12.5) to t: over the devices
// offered so far (less the failures a resume accepted), and over each wave open that no
// resume exempted. It returns the failures and the limit crossed.
func overThreshold(rel *Release, t *tally, offered int) (over bool, failed, limit int) {
	if limit, _ = protocol.FailureLimit(rel.MaxFailures, offered); limit < 0 {
		return false, 0, 0
	}
	if failed = t.failed + t.timedOut; failed-rel.Tolerated > limit {
		return true, failed, limit
	}
	for _, ws := range t.waves[min(rel.ToleratedWaves, len(t.waves)):] {
		limit, _ := protocol.FailureLimit(rel.MaxFailures, ws.Size)
		if ws.Failed+ws.TimedOut > limit {
			return true, ws.Failed + ws.TimedOut, limit
		}
	}
	return false, failed, limit
}

// recordWaveLog keeps, with the release, when the wave open now opened (if nothing
// did yet: its first wave, or after a restart) and when the waves open closed.
func (a *releaseAdmin) recordWaveLog(ctx context.Context, r *run, t *tally) error {
	rel, w, now := r.release(), int(r.wave.Load()), a.now()
	times := slices.Clone(rel.WaveLog)
	for len(times) <= w {
		times = append(times, WaveRecord{Opened: now})
	}
	changed := len(times) != len(rel.WaveLog)
	for i := 0; i <= w; i++ {
		ws := t.waves[i]
		if times[i].Closed.IsZero() && ws.Installed+ws.Failed+ws.TimedOut >= ws.Size && (r.cap == 0 || r.open() >= r.sizes[i]) {
			times[i].Closed, changed = now, true
		}
	}
	if !changed {
		return nil
	}
	_, err := a.life.edit(ctx, rel.ID, func(rel *Release) { rel.WaveLog = times })
	a.status.releaseChanged(rel.ID)
	return err
}

// offer makes wave w open with its first n devices offered (n only counts with a
// concurrency bound), kept with the release before any of their keys goes out, and
// wraps the keys of the devices newly offered.
func (a *releaseAdmin) offer(ctx context.Context, r *run, w, n int) error {
	from := r.open()
	if r.done != nil {
		select {
		case <-r.done:
		default:
			// A fan-out is still wrapping its part: halting it would strand the devices
			// it has not reached. Wrap its part again (the same keys at the same
			// places) along with the new one.
			from = r.fanFrom
		}
	}
	now := a.now()
	if _, err := a.life.edit(ctx, r.release().ID, func(rel *Release) {
		if w > rel.Wave || len(rel.WaveLog) <= w {
			rel.WaveLog = append(rel.WaveLog[:min(w, len(rel.WaveLog))], WaveRecord{Opened: now})
		}
		rel.Wave, rel.Admitted = w, n
	}); err != nil {
		return err
	}
	a.place.halt(r)
	r.fanFrom = from
	r.wave.Store(int32(w))
	r.offered.Store(int32(n))
	a.place.start(r)
	a.status.releaseChanged(r.release().ID)
	return nil
}

// trip pauses, or with abort_on_failure cancels, a release whose counted failures crossed
// its threshold.
func (a *releaseAdmin) trip(ctx context.Context, r *run, failed, limit int) error {
	rel := r.release()
	a.stats.rolloutStops.Add(1)
	ev := a.log.Warn().Str("release", rel.ID.String()).Int("failed", failed).Int("limit", limit)
	to := protocol.ReleasePaused
	if rel.Abort {
		to = protocol.ReleaseCancelled
		ev.Msg("failure threshold crossed; cancelling the release")
	} else {
		ev.Msg("failure threshold crossed; pausing the release")
	}
	r.paused.Store(true)
	a.place.halt(r)
	if _, err := a.life.change(ctx, rel.ID, to, func(rel *Release) { rel.PauseReason = protocol.PausedByThreshold }, lastCounts(r)); err != nil {
		r.paused.Store(false)
		return err
	}
	a.status.releaseChanged(rel.ID)
	a.status.fleetChanged()
	if to == protocol.ReleaseCancelled {
		a.runs.remove(rel.ID)
		return a.place.withdraw(ctx, rel.ID)
	}
	return nil
}

// tally is what the rollout loop last counted of a release's offered targets
// (PROTOCOL.md 12.5).
type tally struct {
	installed, failed, timedOut int
	// holding is how many offered targets hold a key they have not settled and that has
	// not timed out (with the server's default bound, only those online): what the
	// concurrency bound counts.
	holding int
	waves   []protocol.WaveStatus // one a wave; only the counts and the size are set
	// codes counts the offered targets whose last result is a failure, by its code
	// (transient ones too: a device that retries still fails now).
	codes map[string]int
}

func (t *tally) same(o *tally) bool {
	return t.installed == o.installed && t.failed == o.failed && t.timedOut == o.timedOut && t.holding == o.holding &&
		slices.Equal(t.waves, o.waves) && maps.Equal(t.codes, o.codes)
}

// count counts, among the targets offered the release so far, those that installed it,
// failed it permanently, or did neither within the device timeout (the failures a
// threshold counts, 12.5), and those that hold the concurrency bound's slots. Targets
// known installed are not read again: a round reads only the targets still unsettled.
func (a *releaseAdmin) count(ctx context.Context, r *run) (*tally, error) {
	members := r.sorted[:r.open()]
	rel := r.release()
	if r.installed == nil {
		r.installed = make([]bool, len(r.sorted))
	}
	t := &tally{waves: r.planWaves(), codes: map[string]int{}}
	now := a.now()
	var idx []int
	var batch []string
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		results, err := a.store.Results(ctx, rel.ID, batch)
		if err != nil {
			return err
		}
		var online []bool
		if rel.DefaultBound {
			online = a.status.onlineOf(batch)
		}
		for k, res := range results {
			i, s := idx[k], batch[k]
			ws := &t.waves[r.waveOf(i)]
			if code, failed := strings.CutPrefix(res, ResultFailed+":"); failed {
				t.codes[code]++
			}
			switch {
			case res == ResultInstalled:
				r.installed[i] = true
			case permanentFailure(res):
				ws.Failed++
			case rel.DeviceTimeout > 0 && a.runs.timedOut(rel.ID, s, now, rel.DeviceTimeout):
				ws.TimedOut++
			case !rel.DefaultBound || online[k]:
				t.holding++
			}
		}
		idx, batch = idx[:0], batch[:0]
		return nil
	}
	removed := a.runs.removedFrom(rel.ID)
	// With only the server's default bound to apply, the offline targets need no
	// reading: they hold no place, and nothing else is counted.
	var online []bool
	if rel.DefaultBound && len(rel.Waves) == 0 && len(rel.Canary) == 0 && rel.MaxFailures == "" && rel.DeviceTimeout == 0 {
		online = a.status.onlineOf(members)
	}
	for i, s := range members {
		if removed[s] {
			t.waves[r.waveOf(i)].Size-- // deprovisioned: no longer a target
			continue
		}
		if r.installed[i] || online != nil && !online[i] {
			continue
		}
		idx, batch = append(idx, i), append(batch, s)
		if len(batch) == batchSize {
			if err := flush(); err != nil {
				return nil, err
			}
		}
	}
	if err := flush(); err != nil {
		return nil, err
	}
	for i, done := range r.installed[:len(members)] {
		if done && !removed[members[i]] {
			t.waves[r.waveOf(i)].Installed++
		}
	}
	for i := range t.waves {
		ws := &t.waves[i]
		t.installed, t.failed, t.timedOut = t.installed+ws.Installed, t.failed+ws.Failed, t.timedOut+ws.TimedOut
	}
	r.timedOut.Store(int32(t.timedOut))
	return t, nil
}

// finalCounts counts how each wave of a release whose targets have all settled ended:
// with none failed, every target installed; else from the results in the store.
// removed holds the targets deprovisioned since the release was loaded.
func finalCounts(ctx context.Context, store Store, r *run, removed map[string]bool, noneFailed bool) ([]protocol.WaveStatus, error) {
	t := &tally{waves: r.planWaves()}
	for i := 0; i < len(r.sorted); i += batchSize {
		batch := r.sorted[i:min(i+batchSize, len(r.sorted))]
		results := make([]string, len(batch))
		if noneFailed {
			for k := range results {
				results[k] = ResultInstalled
			}
		} else {
			var err error
			if results, err = store.Results(ctx, r.release().ID, batch); err != nil {
				return nil, err
			}
		}
		for k, res := range results {
			ws := &t.waves[r.waveOf(i+k)]
			switch {
			case removed[batch[k]]:
				ws.Size--
			case res == ResultInstalled:
				ws.Installed++
			case permanentFailure(res):
				ws.Failed++
			}
		}
	}
	return t.waves, nil
}

// keepCounts returns an edit that keeps the per-wave counts ws in a release's wave log.
func keepCounts(ws []protocol.WaveStatus) func(*Release) {
	return func(rel *Release) {
		for i := range min(len(ws), len(rel.WaveLog)) {
			rec := &rel.WaveLog[i]
			rec.Installed, rec.Failed, rec.TimedOut = ws[i].Installed, ws[i].Failed, ws[i].TimedOut
		}
	}
}

// lastCounts returns an edit that keeps what the rollout loop last counted of r's waves
// in its release's wave log (for a release cancelled).
func lastCounts(r *run) func(*Release) {
	if t := r.tally.Load(); t != nil {
		return keepCounts(t.waves)
	}
	return func(*Release) {}
}
