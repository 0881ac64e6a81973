package updater

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// batchSize is how many devices one store round trip and one publish burst cover.
const batchSize = 512

// run is an active or paused release held in memory: its targets, its content key, and
// the fan-out that wraps that key for each target.
type run struct {
	// rel is the release as last recorded: replaced whole (Store), never changed in
	// place, so that the fan-out, the ack workers and admin commands can read it at once.
	rel     atomic.Pointer[Release]
	ck      keychain.ContentKey
	digest  [32]byte
	targets map[string]struct{}
	sorted  []string // the targets in order, for the fan-out
	wrapped atomic.Int64
	paused  atomic.Bool
	cancel  context.CancelFunc // stops a fan-out in progress
	done    chan struct{}      // closed when the fan-out ends
}

// release returns the release as last recorded; the caller must not change it.
func (r *run) release() *Release { return r.rel.Load() }

func (u *Updater) newRun(rel *Release, targets []string) (*run, error) {
	ck, err := u.openContentKey(rel)
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
	r.paused.Store(rel.State == protocol.ReleasePaused)
	return r, nil
}

// loadRuns reads the active and paused releases from the store.
func (u *Updater) loadRuns(ctx context.Context) error {
	rels, err := u.o.Store.Releases(ctx)
	if err != nil {
		return fmt.Errorf("updater: loading releases: %w", err)
	}
	runs := map[keychain.ReleaseID]*run{}
	for _, rel := range rels {
		if rel.State != protocol.ReleaseActive && rel.State != protocol.ReleasePaused && rel.State != protocol.ReleasePublishing {
			continue
		}
		u.mu.Lock()
		old := u.runs[rel.ID]
		u.mu.Unlock()
		if old != nil && old.release().State == rel.State {
			runs[rel.ID] = old
			continue
		}
		targets, err := u.o.Store.Targets(ctx, rel.ID)
		if err != nil {
			return fmt.Errorf("updater: loading targets of release %s: %w", rel.ID, err)
		}
		r, err := u.newRun(rel, targets)
		if err != nil {
			return err
		}
		runs[rel.ID] = r
	}
	u.mu.Lock()
	u.runs = runs
	u.mu.Unlock()
	return nil
}

// refreshRunsLoop keeps an acks-only updater's view of releases current.
func (u *Updater) refreshRunsLoop(ctx context.Context) {
	t := time.NewTicker(u.o.RefreshInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := u.loadRuns(ctx); err != nil && ctx.Err() == nil {
				u.log.Warn().Err(err).Msg("refreshing releases")
			}
		}
	}
}

// resumeRuns restarts the fan-out of every active release after a restart: wrapping is
// idempotent at a given position, so devices that already have their key get the same
// key again and nothing else changes.
func (u *Updater) resumeRuns(ctx context.Context) {
	u.mu.Lock()
	var rs []*run
	for _, r := range u.runs {
		rs = append(rs, r)
	}
	u.mu.Unlock()
	for _, r := range rs {
		if rel := *r.release(); rel.State == protocol.ReleasePublishing {
			// The image was not completely published before a crash: the release
			// cannot be trusted to be whole, so it is cancelled; the operator re-creates it.
			u.log.Warn().Str("release", rel.ID.String()).Msg("release was still publishing at the last stop; cancelling it")
			_ = transition(&rel, protocol.ReleaseCancelled) // publishing -> cancelled is allowed
			r.rel.Store(&rel)
			if err := u.o.Store.PutRelease(ctx, &rel); err != nil {
				u.log.Error().Err(err).Msg("cancelling half-published release")
			}
			u.mu.Lock()
			delete(u.runs, r.release().ID)
			u.dirty[r.release().ID] = true
			u.mu.Unlock()
			continue
		}
		// The last process may have recorded the last results and died before it
		// noticed that the release is complete: look again.
		u.markDirty(r.release().ID)
		if !r.paused.Load() {
			u.startFanout(r)
		}
	}
}

// startFanout wraps the release's content key for every target that has not installed
// it, in the background.
func (u *Updater) startFanout(r *run) {
	ctx, cancel := context.WithCancel(u.ctx)
	r.cancel = cancel
	r.done = make(chan struct{})
	u.goRun(func() {
		defer close(r.done)
		defer cancel()
		start := time.Now()
		n, err := u.fanout(ctx, r)
		ev := u.log.Info()
		if err != nil && ctx.Err() == nil {
			ev = u.log.Error().Err(err)
		}
		ev.Str("release", r.release().ID.String()).Int("wrapped", n).Dur("took", time.Since(start)).Msg("key fan-out finished")
	})
}

// fanout wraps for all targets in batches, on Workers goroutines.
func (u *Updater) fanout(ctx context.Context, r *run) (int, error) {
	serials := r.sorted
	batches := make(chan []string)
	var (
		wg      sync.WaitGroup
		total   atomic.Int64
		errOnce sync.Once
		ferr    error
	)
	for w := 0; w < u.o.Workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for b := range batches {
				n, err := u.wrapBatch(ctx, r, b)
				total.Add(int64(n))
				if err != nil {
					errOnce.Do(func() { ferr = err })
				}
			}
		}()
	}
	for i := 0; i < len(serials) && ctx.Err() == nil && !r.paused.Load(); i += batchSize {
		select {
		case batches <- serials[i:min(i+batchSize, len(serials))]:
		case <-ctx.Done():
		}
	}
	close(batches)
	wg.Wait()
	return int(total.Load()), ferr
}

// wrapBatch wraps the release for a batch of devices: one store read, one store write,
// one publish burst. Devices that already run this version or newer are skipped.
func (u *Updater) wrapBatch(ctx context.Context, r *run, serials []string) (int, error) {
	devs, err := u.o.Store.Devices(ctx, serials)
	if err != nil {
		return 0, fmt.Errorf("reading devices: %w", err)
	}
	var (
		as   []Assignment
		msgs []protocol.Message
	)
	for _, d := range devs {
		if d == nil || d.Version >= r.release().Version {
			continue
		}
		a, m, err := u.wrapFor(d, r)
		if err != nil {
			u.log.Error().Err(err).Str("serial", d.Serial).Msg("wrapping key")
			continue
		}
		as = append(as, a)
		msgs = append(msgs, m)
	}
	return u.assignAndPublish(ctx, as, msgs)
}

// assignAndPublish records assignments, then publishes the key messages of those that
// were recorded, followed by extra messages (which need no assignment), in one publish.
// The order matters: a key message is never out before the store knows that its id was
// wrapped at that position, so the device's ack can always be matched. It returns how many
// key messages were published. If the store fails, only the extra messages are published.
func (u *Updater) assignAndPublish(ctx context.Context, as []Assignment, msgs []protocol.Message, extra ...protocol.Message) (int, error) {
	if len(as) == 0 && len(extra) == 0 {
		return 0, nil
	}
	var (
		ok   []bool
		aerr error
	)
	if len(as) > 0 {
		if ok, aerr = u.o.Store.Assign(ctx, as); aerr != nil {
			aerr = fmt.Errorf("recording assignments: %w", aerr)
			ok = make([]bool, len(as))
		}
	}
	out := msgs[:0]
	for i, applied := range ok {
		if applied {
			out = append(out, msgs[i])
		}
	}
	keys := len(out)
	out = append(out, extra...)
	if len(out) == 0 {
		return 0, aerr
	}
	if err := u.o.Bus.Publish(ctx, out...); err != nil {
		return 0, errors.Join(aerr, fmt.Errorf("publishing key messages: %w", err))
	}
	u.stats.keys.Add(int64(keys))
	u.mu.Lock()
	for i, applied := range ok {
		if !applied {
			continue
		}
		if as[i].State == protocol.DeviceRekeying {
			u.stats.rekeys.Add(1)
			continue
		}
		if r := u.runs[as[i].ID]; r != nil {
			r.wrapped.Add(1)
			u.dirty[r.release().ID] = true
		}
	}
	u.mu.Unlock()
	return keys, aerr
}

// wrapFor builds the key message for device d at its current position: the release's
// content key, or, at index 1, a re-key into the next chain ([SC-10.2], 10.3).
func (u *Updater) wrapFor(d *Device, r *run) (Assignment, protocol.Message, error) {
	tr, err := u.sealer.Open(d.Serial, d.Epoch, d.Chain)
	if err != nil {
		return Assignment{}, protocol.Message{}, fmt.Errorf("opening chain state: %w", err)
	}
	if tr.Pos() != d.Seq {
		return Assignment{}, protocol.Message{}, fmt.Errorf("chain state is at %d but the counter is at %d", tr.Pos(), d.Seq)
	}
	k := tr.Current()
	u.stats.chainSteps.Add(int64(tr.Steps()))
	if d.Seq == 1 {
		return u.rekeyFor(d, k)
	}
	m := keychain.KeyMessage{Kind: keychain.KindRelease, Epoch: d.Epoch, Seq: d.Seq, ID: r.release().ID, ManifestDigest: r.digest}
	b, err := keychain.SealKeyMessage(m, k, d.Serial, r.ck)
	if err != nil {
		return Assignment{}, protocol.Message{}, err
	}
	return Assignment{Serial: d.Serial, From: d.Pos(), ID: r.release().ID, State: protocol.DeviceWrapped},
		protocol.Message{Topic: protocol.KeyTopic(d.Serial), Payload: b, Retain: true}, nil
}

func (u *Updater) rekeyFor(d *Device, k1 keychain.ChainKey) (Assignment, protocol.Message, error) {
	next, err := keychain.DeriveUnitData(u.o.Root, d.Serial, d.Epoch+1)
	if err != nil {
		return Assignment{}, protocol.Message{}, err
	}
	id := u.rekeyID(d.Serial, d.Epoch)
	m := keychain.KeyMessage{Kind: keychain.KindRekey, Epoch: d.Epoch, Seq: 1, ID: id, NewLength: u.o.ChainLength}
	b, err := keychain.SealKeyMessage(m, k1, d.Serial, next)
	if err != nil {
		return Assignment{}, protocol.Message{}, err
	}
	return Assignment{Serial: d.Serial, From: d.Pos(), ID: id, State: protocol.DeviceRekeying},
		protocol.Message{Topic: protocol.KeyTopic(d.Serial), Payload: b, Retain: true}, nil
}

// pendingFor returns the release device d should be offered next: the newest active
// release that targets it with a version above what it runs.
func (u *Updater) pendingFor(d *Device) *run {
	u.mu.Lock()
	defer u.mu.Unlock()
	var best *run
	for _, r := range u.runs {
		if r.paused.Load() || r.release().State != protocol.ReleaseActive || r.release().Version <= d.Version {
			continue
		}
		if _, ok := r.targets[d.Serial]; !ok {
			continue
		}
		if best == nil || r.release().Version > best.release().Version {
			best = r
		}
	}
	return best
}

// next returns the key message device d should see now, and its assignment: a re-key at
// index 1, else its pending release. The assignment is nil when nothing is due (the
// caller clears the key topic).
func (u *Updater) next(d *Device) (*Assignment, protocol.Message, error) {
	var (
		a   Assignment
		m   protocol.Message
		err error
	)
	r := u.pendingFor(d)
	switch {
	case d.Seq == 1:
		tr, oerr := u.sealer.Open(d.Serial, d.Epoch, d.Chain)
		if oerr != nil {
			return nil, m, oerr
		}
		a, m, err = u.rekeyFor(d, tr.Current())
		u.stats.chainSteps.Add(int64(tr.Steps()))
	case r != nil:
		a, m, err = u.wrapFor(d, r)
	default:
		return nil, protocol.Message{}, nil
	}
	if err != nil {
		return nil, m, err
	}
	return &a, m, nil
}

// nextForAll publishes what each device should see on its key topic now that it has
// moved: a re-key at index 1, else its pending release, else nothing (the topic is
// cleared). One store call for the assignments and one publish, followed by the extra
// messages. A device whose next
// message cannot be built is skipped, and named in the error.
func (u *Updater) nextForAll(ctx context.Context, devs []*Device, extra ...protocol.Message) error {
	var (
		as   []Assignment
		keys []protocol.Message
		errs []error
	)
	// place builds the key message of each device with something due and returns the
	// devices with nothing due in this updater's view.
	place := func(ds []*Device) (idle []*Device) {
		for _, d := range ds {
			a, m, err := u.next(d)
			switch {
			case err != nil:
				errs = append(errs, fmt.Errorf("device %s: %w", d.Serial, err))
			case a == nil:
				idle = append(idle, d)
			default:
				as = append(as, *a)
				keys = append(keys, m)
			}
		}
		return idle
	}
	idle := place(devs)
	if len(idle) > 0 && u.o.AcksOnly {
		// An acks-only updater's view of the releases is refreshed now and then; a
		// release created since may have been wrapped for a device at the index it just
		// left, by the other updater, whose fan-out will not come back to it. Ask the
		// store before clearing: it has every release whose wrap preceded this advance.
		if err := u.loadRuns(ctx); err != nil {
			// Leave the key topics as they are: a device that finds its old key there
			// reports stale_key, and the answer publishes what is pending then.
			errs = append(errs, fmt.Errorf("refreshing the releases before clearing %d key topics: %w", len(idle), err))
			idle = nil
		} else {
			idle = place(idle)
		}
	}
	clears := make([]protocol.Message, 0, len(idle)+len(extra))
	for _, d := range idle {
		clears = append(clears, protocol.Message{Topic: protocol.KeyTopic(d.Serial), Retain: true})
	}
	_, err := u.assignAndPublish(ctx, as, keys, append(clears, extra...)...)
	return errors.Join(append(errs, err)...)
}

// publishImage encrypts the image once and publishes its chunks and manifest, retained.
func (u *Updater) publishImage(ctx context.Context, img io.Reader, id keychain.ReleaseID, ck keychain.ContentKey, version uint64, chunkSize uint32) (*keychain.Manifest, []byte, error) {
	pk := ck.PayloadKey(id)
	// Chunks are published in bursts so that the broker's inbound queue stays short.
	const burst = 16
	var pending []protocol.Message
	flush := func() error {
		err := u.o.Bus.Publish(ctx, pending...)
		pending = pending[:0]
		return err
	}
	sum, err := keychain.EncryptChunks(img, pk, chunkSize, func(i uint32, c []byte) error {
		pending = append(pending, protocol.Message{Topic: protocol.ChunkTopic(id, i), Payload: append([]byte(nil), c...), Retain: true})
		if len(pending) == burst {
			return flush()
		}
		return nil
	})
	if err == nil {
		err = flush()
	}
	if err != nil {
		return nil, nil, fmt.Errorf("publishing the encrypted image: %w", err)
	}
	m := keychain.NewManifest(id, version, u.o.Now(), sum)
	mb, err := m.Sign(u.o.SigningKey)
	if err != nil {
		return nil, nil, err
	}
	if err := u.o.Bus.Publish(ctx, protocol.Message{Topic: protocol.ManifestTopic(id), Payload: mb, Retain: true}); err != nil {
		return nil, nil, fmt.Errorf("publishing the manifest: %w", err)
	}
	return m, mb, nil
}
