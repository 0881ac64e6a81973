package updater

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// CreateRelease encrypts a finished upload once, publishes it, and starts wrapping its
// content key for every target (release.create).
func (a *releaseAdmin) CreateRelease(ctx context.Context, args protocol.ReleaseCreateArgs) (*protocol.ReleaseCreateResult, error) {
	if err := checkCreate(&args); err != nil {
		return nil, err
	}
	bound, byDefault := args.MaxConcurrent, false
	if bound == 0 && !args.Follow {
		// The server's default; a release that follows has none (12.5).
		bound, byDefault = a.maxConcurrent, a.maxConcurrent > 0
	}
	bound = max(bound, 0)
	soak, _ := time.ParseDuration(args.Soak)                // checked
	devTimeout, _ := time.ParseDuration(args.DeviceTimeout) // checked
	jitter := protocol.DefaultPrefetchJitter
	if args.PrefetchJitter != "" {
		jitter, _ = time.ParseDuration(args.PrefetchJitter) // checked
	}
	if !args.Prefetch {
		jitter = 0
	}
	var startAt time.Time
	if args.StartAt != nil {
		startAt = *args.StartAt
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	up, err := a.uploads.get(args.Upload)
	if err != nil {
		return nil, err
	}
	targets, err := releaseTargets(ctx, a.store, args)
	if err != nil {
		return nil, err
	}
	id, err := keychain.NewReleaseID()
	if err != nil {
		return nil, err
	}
	ck, err := keychain.NewContentKey()
	if err != nil {
		return nil, err
	}
	sealed, err := a.keys.sealContentKey(id, ck)
	if err != nil {
		return nil, err
	}
	rel := &Release{ID: id, Version: args.Version, Label: args.Label, State: protocol.ReleasePublishing, All: args.All,
		Select: args.Select, Follow: args.Follow, Waves: args.Waves, Canary: args.Canary, MaxFailures: args.MaxFailures, Abort: args.AbortOnFailure,
		Prefetch: args.Prefetch, PrefetchJitter: jitter, MaxConcurrent: bound, DefaultBound: byDefault, Approve: args.Approve, Soak: soak, Window: args.Window, StartAt: startAt, DeviceTimeout: devTimeout,
		Created: a.now(), ContentKey: sealed, ChunkSize: args.ChunkSize}
	// The release is recorded as publishing before anything is published, so that a
	// crash half way leaves a release that the restart cancels, not orphan topics.
	if err := a.store.PutRelease(ctx, rel); err != nil {
		return nil, unavailable(err)
	}
	if err := a.store.AddTargets(ctx, id, targets); err != nil {
		return nil, unavailable(err)
	}
	m, mb, err := publishImage(ctx, a.bus, a.keys, a.now(), up.reader(), id, ck, args.Version, args.ChunkSize)
	if err != nil {
		_ = a.life.record(ctx, rel, protocol.ReleaseCancelled)
		return nil, protocol.Errorf(protocol.ErrUnavailable, "%v; the release was cancelled, create it again", err)
	}
	rel.Manifest, rel.ImageSize, rel.ChunkCount = mb, m.ImageSize, m.ChunkCount
	if err := a.life.record(ctx, rel, protocol.ReleaseActive); errors.Is(err, ErrTransition) {
		return nil, protocol.Errorf(protocol.ErrInternal, "%v", err)
	} else if err != nil {
		return nil, unavailable(err)
	}
	r, err := newRun(a.keys, rel, targets)
	if err != nil {
		return nil, err
	}
	a.runs.add(r)
	a.status.releaseChanged(id)
	a.status.fleetChanged()
	a.log.Info().Str("release", id.String()).Uint64("version", args.Version).Int("targets", len(targets)).Uint32("chunks", m.ChunkCount).Msg("release created")
	// The image is published; its upload would otherwise hold a copy on disk for a day.
	a.uploads.remove(args.Upload)
	if rel.Prefetch {
		a.place.announce(r)
	}
	a.startIfOpen(r)
	return &protocol.ReleaseCreateResult{Release: id, Targets: len(targets)}, nil
}

// checkCreate checks a release.create request's own fields and fills in the defaults.
func checkCreate(a *protocol.ReleaseCreateArgs) error {
	if err := protocol.CheckVersion(a.Version, a.AllowJump, nil); err != nil {
		return err
	}
	modes := 0
	for _, on := range []bool{a.All, len(a.Devices) > 0, len(a.Select) > 0} {
		if on {
			modes++
		}
	}
	if modes != 1 {
		return protocol.Errorf(protocol.ErrBadRequest, "give one of devices, all: true, or select")
	}
	if a.Follow && len(a.Devices) > 0 {
		return protocol.Errorf(protocol.ErrBadRequest, "follow is for all: true or select, not a list of devices")
	}
	for k, v := range a.Select {
		if err := protocol.CheckTag(k, v); err != nil {
			return err
		}
	}
	if a.MaxConcurrent < protocol.NoBound {
		return protocol.Errorf(protocol.ErrBadRequest, "max_concurrent %d: give a bound, 0 for the server's default, or -1 for none", a.MaxConcurrent)
	}
	if (len(a.Waves) > 0 || len(a.Canary) > 0 || a.MaxConcurrent > 0) && a.Follow {
		return protocol.Errorf(protocol.ErrBadRequest, "waves or max_concurrent together with follow are not supported: a device that joins later has no place in the rollout order")
	}
	for _, s := range a.Canary {
		if err := keychain.CheckSerial(s); err != nil {
			return protocol.Errorf(protocol.ErrBadRequest, "canary: %v", err)
		}
	}
	if len(a.Waves) > 0 || len(a.Canary) > 0 {
		if _, err := protocol.WaveSizes(a.Waves, 100); err != nil {
			return err
		}
	}
	if _, err := protocol.FailureLimit(a.MaxFailures, 100); err != nil {
		return err
	}
	if a.Window != "" {
		if _, err := protocol.ParseWindow(a.Window); err != nil {
			return err
		}
	}
	if a.DeviceTimeout != "" {
		if d, err := time.ParseDuration(a.DeviceTimeout); err != nil || d <= 0 {
			return protocol.Errorf(protocol.ErrBadRequest, "device_timeout %q: give a duration such as 30m", a.DeviceTimeout)
		}
		if len(a.Waves) == 0 && (a.MaxConcurrent == protocol.NoBound || a.Follow) && a.MaxFailures == "" {
			return protocol.Errorf(protocol.ErrBadRequest, "device_timeout counts toward waves, max_concurrent and max_failures: give one of them")
		}
	}
	if a.PrefetchJitter != "" {
		if d, err := time.ParseDuration(a.PrefetchJitter); err != nil || d < 0 || d > 24*time.Hour || !a.Prefetch {
			return protocol.Errorf(protocol.ErrBadRequest, "prefetch_jitter %q: give a duration from 0 to 24h, with prefetch", a.PrefetchJitter)
		}
	}
	if a.Soak != "" {
		if d, err := time.ParseDuration(a.Soak); err != nil || d < 0 {
			return protocol.Errorf(protocol.ErrBadRequest, "soak %q: give a duration such as 10m", a.Soak)
		}
	}
	if (a.Soak != "" || a.Approve) && len(a.Waves) == 0 {
		return protocol.Errorf(protocol.ErrBadRequest, "soak and approve hold back the next wave: give waves")
	}
	if a.AbortOnFailure && a.MaxFailures == "" {
		return protocol.Errorf(protocol.ErrBadRequest, "abort_on_failure needs max_failures")
	}
	if a.ChunkSize == 0 {
		a.ChunkSize = keychain.DefaultChunkSize
	}
	if a.ChunkSize < keychain.MinChunkSize || a.ChunkSize > keychain.MaxChunkSize {
		return protocol.Errorf(protocol.ErrBadRequest, "chunk_size %d must be from %d to %d", a.ChunkSize, keychain.MinChunkSize, keychain.MaxChunkSize)
	}
	if len(a.Label) > 64 {
		return protocol.Errorf(protocol.ErrBadRequest, "label is over 64 characters")
	}
	return nil
}

// releaseTargets checks that args' version is newer than every release not cancelled, and
// returns the serials the release targets: every provisioned device, or the listed ones
// (each once, all known).
func releaseTargets(ctx context.Context, store Store, args protocol.ReleaseCreateArgs) ([]string, error) {
	rels, err := store.Releases(ctx)
	if err != nil {
		return nil, unavailable(err)
	}
	existing := make([]protocol.ReleaseVersion, len(rels))
	for i, r := range rels {
		existing[i] = protocol.ReleaseVersion{Release: r.ID, Version: r.Version, State: r.State}
	}
	if err := protocol.CheckVersion(args.Version, args.AllowJump, existing); err != nil {
		return nil, err
	}
	if args.All {
		targets, err := store.Serials(ctx)
		if err != nil {
			return nil, unavailable(err)
		}
		if len(targets) == 0 && !args.Follow {
			return nil, protocol.Errorf(protocol.ErrNotFound, "no device is provisioned")
		}
		return targets, nil
	}
	if len(args.Select) > 0 {
		return selectTargets(ctx, store, args.Select, args.Follow)
	}
	for _, s := range args.Devices {
		if err := keychain.CheckSerial(s); err != nil {
			return nil, protocol.Errorf(protocol.ErrBadRequest, "devices: %v", err)
		}
	}
	devs, err := store.Devices(ctx, args.Devices)
	if err != nil {
		return nil, unavailable(err)
	}
	var targets, unknown []string
	seen := map[string]bool{}
	for i, d := range devs {
		if d == nil {
			unknown = append(unknown, args.Devices[i])
		} else if !seen[d.Serial] {
			seen[d.Serial] = true
			targets = append(targets, d.Serial)
		}
	}
	if len(unknown) > 0 {
		return nil, protocol.Errorf(protocol.ErrNotFound, "unknown devices: %s", strings.Join(first(unknown, 10), ", "))
	}
	return targets, nil
}

// selectTargets returns the devices whose tags include every pair of sel ([SC-12.4]),
// reading the fleet in batches. None is an error unless the release follows sel.
func selectTargets(ctx context.Context, store Store, sel map[string]string, follow bool) ([]string, error) {
	serials, err := store.Serials(ctx)
	if err != nil {
		return nil, unavailable(err)
	}
	var targets []string
	for i := 0; i < len(serials); i += batchSize {
		devs, err := store.Devices(ctx, serials[i:min(i+batchSize, len(serials))])
		if err != nil {
			return nil, unavailable(err)
		}
		for _, d := range devs {
			if d != nil && protocol.Matches(d.Tags, sel) {
				targets = append(targets, d.Serial)
			}
		}
	}
	if len(targets) == 0 && !follow {
		return nil, protocol.Errorf(protocol.ErrNotFound, "no device has the tags %s (give follow to release to devices tagged later)", protocol.FormatTags(sel))
	}
	return targets, nil
}

// publishImage encrypts the image once and publishes its chunks, each with its proof in
// the chunk tree (PROTOCOL.md 4.3), and then its manifest, retained.
func publishImage(ctx context.Context, bus Bus, k *keys, now time.Time, img *io.SectionReader, id keychain.ReleaseID, ck keychain.ContentKey, version uint64, chunkSize uint32) (*keychain.Manifest, []byte, error) {
	pk := ck.PayloadKey(id)
	// Chunks are published in bursts so that the broker's inbound queue stays short.
	const burst = 16
	var pending []protocol.Message
	flush := func() error {
		err := bus.Publish(ctx, pending...)
		pending = pending[:0]
		return err
	}
	sum, err := keychain.EncryptChunks(img, img.Size(), pk, chunkSize, func(i uint32, c []byte) error {
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
	m := keychain.NewManifest(id, version, now, sum)
	seq, key := k.release.current()
	m.KeySeq = seq
	mb, err := m.Sign(key)
	if err != nil {
		return nil, nil, err
	}
	if err := bus.Publish(ctx, protocol.Message{Topic: protocol.ManifestTopic(id), Payload: mb, Retain: true}); err != nil {
		return nil, nil, fmt.Errorf("publishing the manifest: %w", err)
	}
	return m, mb, nil
}

// PauseRelease stops offering a release; devices that have its key may still install it
// (release.pause).
func (a *releaseAdmin) PauseRelease(ctx context.Context, id keychain.ReleaseID) (protocol.ReleaseStatus, error) {
	return a.setState(ctx, id, protocol.ReleasePaused, protocol.CmdReleasePause)
}

// ResumeRelease offers a paused release again (release.resume).
func (a *releaseAdmin) ResumeRelease(ctx context.Context, id keychain.ReleaseID) (protocol.ReleaseStatus, error) {
	return a.setState(ctx, id, protocol.ReleaseActive, protocol.CmdReleaseResume)
}

// CancelRelease ends a release and withdraws its keys from the devices that have not
// used them (release.cancel).
func (a *releaseAdmin) CancelRelease(ctx context.Context, id keychain.ReleaseID) (protocol.ReleaseStatus, error) {
	return a.setState(ctx, id, protocol.ReleaseCancelled, protocol.CmdReleaseCancel)
}

// RetireRelease takes a completed or cancelled release out of the version floor, so that
// a later release may have a lower version (release.retire). Devices keep their own
// floor: one that installed the retired release refuses a lower version.
func (a *releaseAdmin) RetireRelease(ctx context.Context, id keychain.ReleaseID) (protocol.ReleaseStatus, error) {
	return a.setState(ctx, id, protocol.ReleaseRetired, protocol.CmdReleaseRetire)
}

// ApproveRelease lets the next wave of a release with approve open once the open waves
// have settled and soaked (release.approve).
func (a *releaseAdmin) ApproveRelease(ctx context.Context, id keychain.ReleaseID) (protocol.ReleaseStatus, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	r := a.runs.get(id)
	if r == nil || r.sizes == nil || !r.release().Approve {
		return protocol.ReleaseStatus{}, protocol.Errorf(protocol.ErrConflict, "release %s is not a release in progress whose waves wait for approval", id)
	}
	w := int(r.wave.Load())
	rel, err := a.life.edit(ctx, id, func(rel *Release) { rel.Approved = max(rel.Approved, w+1) })
	if err != nil {
		return protocol.ReleaseStatus{}, unavailable(err)
	}
	a.log.Info().Str("release", id.String()).Int("wave", w+2).Msg("next wave approved")
	a.status.releaseChanged(id)
	return a.status.releaseStatus(ctx, rel), nil
}

// setState moves a release to state to, for the command cmd, and starts, stops or
// withdraws its fan-out to match.
func (a *releaseAdmin) setState(ctx context.Context, id keychain.ReleaseID, to protocol.ReleaseState, cmd string) (protocol.ReleaseStatus, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	rel, err := findRelease(ctx, a.store, id)
	if err != nil {
		return protocol.ReleaseStatus{}, err
	}
	conflict := protocol.Errorf(protocol.ErrConflict, "release %s is %s, so it cannot be %s (%s)", id, rel.State, map[protocol.ReleaseState]string{
		protocol.ReleasePaused: "paused", protocol.ReleaseActive: "resumed", protocol.ReleaseCancelled: "cancelled", protocol.ReleaseRetired: "retired",
	}[to], cmd)
	r := a.runs.get(id)
	if rel.State == to && (to == protocol.ReleasePaused || to == protocol.ReleaseActive) && r != nil {
		// Pausing a paused release, or resuming an active one, is what was asked already.
		return a.status.releaseStatus(ctx, rel), nil
	}
	running := r != nil && !r.paused.Load()
	// A release still publishing belongs to the release.create publishing it; pause and
	// resume need it running in this updater.
	held := to == protocol.ReleasePaused || to == protocol.ReleaseActive
	if rel.State == protocol.ReleasePublishing || held && r == nil || !canTransition(rel.State, to) {
		return protocol.ReleaseStatus{}, conflict
	}
	if to == protocol.ReleasePaused {
		r.paused.Store(true)
	}
	if r != nil && to != protocol.ReleaseActive {
		a.place.halt(r)
	}
	edit := func(rel *Release) { rel.PauseReason = "" }
	switch to {
	case protocol.ReleaseCancelled:
		if r != nil {
			keep := lastCounts(r)
			edit = func(rel *Release) { rel.PauseReason = ""; keep(rel) }
		}
	case protocol.ReleasePaused:
		edit = func(rel *Release) { rel.PauseReason = protocol.PausedByOperator }
	case protocol.ReleaseActive:
		// A resume accepts the failures counted so far: the release's threshold applies
		// to new ones, and the waves open now are exempt from their own.
		if r.sizes != nil {
			t, err := a.count(ctx, r)
			if err != nil {
				return protocol.ReleaseStatus{}, unavailable(err)
			}
			r.tally.Store(t)
			w := int(r.wave.Load())
			edit = func(rel *Release) {
				rel.PauseReason, rel.Tolerated, rel.ToleratedWaves = "", t.failed+t.timedOut, w+1
			}
		}
	}
	if rel, err = a.life.change(ctx, id, to, edit); err != nil {
		if running {
			// Nothing changed: the fan-out goes on.
			r.paused.Store(false)
			a.place.start(r)
		}
		if errors.Is(err, ErrTransition) {
			return protocol.ReleaseStatus{}, conflict
		}
		return protocol.ReleaseStatus{}, unavailable(err)
	}
	switch to {
	case protocol.ReleaseActive:
		r.paused.Store(false)
		r.fanFrom = 0
		a.startIfOpen(r)
	case protocol.ReleaseCancelled:
		a.runs.remove(id)
		if err := a.place.withdraw(ctx, id); err != nil {
			return protocol.ReleaseStatus{}, err
		}
	}
	a.status.releaseChanged(id)
	a.status.fleetChanged()
	return a.status.releaseStatus(ctx, rel), nil
}

// Pending names the targets of a release that have no result yet (release.pending): the
// first limit serials in order (100 if limit is 0, at most 1,000), and how many there are.
func (a *releaseAdmin) Pending(ctx context.Context, args protocol.ReleasePendingArgs) (protocol.ReleasePendingResult, error) {
	limit := args.Limit
	switch {
	case limit == 0:
		limit = 100
	case limit < 0 || limit > 1000:
		return protocol.ReleasePendingResult{}, protocol.Errorf(protocol.ErrBadRequest, "limit %d must be from 1 to 1000", limit)
	}
	if _, err := findRelease(ctx, a.store, args.Release); err != nil {
		return protocol.ReleasePendingResult{}, err
	}
	targets, err := a.store.Targets(ctx, args.Release)
	if err != nil {
		return protocol.ReleasePendingResult{}, unavailable(err)
	}
	out := protocol.ReleasePendingResult{Pending: []string{}}
	for i := 0; i < len(targets); i += batchSize {
		batch := targets[i:min(i+batchSize, len(targets))]
		results, err := a.store.Results(ctx, args.Release, batch)
		if err != nil {
			return protocol.ReleasePendingResult{}, unavailable(err)
		}
		for j, r := range results {
			if r != ResultNone {
				continue
			}
			out.Total++
			if len(out.Pending) < limit {
				out.Pending = append(out.Pending, batch[j])
			}
		}
	}
	return out, nil
}

// Release returns a release's status (release.get).
func (a *releaseAdmin) Release(ctx context.Context, id keychain.ReleaseID) (protocol.ReleaseStatus, error) {
	rel, err := findRelease(ctx, a.store, id)
	if err != nil {
		return protocol.ReleaseStatus{}, err
	}
	return a.status.releaseStatus(ctx, rel), nil
}

// findRelease reads a release, with the admin error for a missing one.
func findRelease(ctx context.Context, store Store, id keychain.ReleaseID) (*Release, error) {
	rel, err := store.Release(ctx, id)
	if errors.Is(err, ErrNotFound) {
		return nil, protocol.Errorf(protocol.ErrNotFound, "no release %s", id)
	} else if err != nil {
		return nil, unavailable(err)
	}
	return rel, nil
}

// Releases returns every release's status, oldest first (release.list).
func (a *releaseAdmin) Releases(ctx context.Context) (protocol.ReleaseListResult, error) {
	rels, err := a.store.Releases(ctx)
	if err != nil {
		return protocol.ReleaseListResult{}, unavailable(err)
	}
	out := protocol.ReleaseListResult{Releases: []protocol.ReleaseStatus{}}
	for _, r := range rels {
		out.Releases = append(out.Releases, a.status.releaseStatus(ctx, r))
	}
	return out, nil
}

// resume restarts the fan-out of every active release after a restart: wrapping is
// idempotent at a given position, so devices that already have their key get the same
// key again and nothing else changes. A release still publishing at the last stop is
// cancelled.
func (a *releaseAdmin) resume(ctx context.Context) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, r := range a.runs.all() {
		id := r.release().ID
		a.status.releaseChanged(id)
		if r.release().State == protocol.ReleasePublishing {
			// The image was not completely published before a crash: the release
			// cannot be trusted to be whole, so it is cancelled; the operator re-creates it.
			a.log.Warn().Str("release", id.String()).Msg("release was still publishing at the last stop; cancelling it")
			if _, err := a.life.change(ctx, id, protocol.ReleaseCancelled); err != nil {
				a.log.Error().Err(err).Msg("cancelling half-published release")
			}
			a.runs.remove(id)
			continue
		}
		// The last process may have recorded the last results and died before it
		// noticed that the release is complete: the status publisher looks again.
		if r.release().Prefetch {
			a.place.announce(r) // the notices the last process had not published yet
		}
		if !r.paused.Load() {
			a.startIfOpen(r)
		}
	}
}
