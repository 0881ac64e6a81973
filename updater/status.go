package updater

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// statusInterval is how often changed release and fleet statuses are re-published: often
// enough for a person watching, rarely enough to cost nothing during a large fan-out.
const statusInterval = 250 * time.Millisecond

func deviceStatus(d *Device, state protocol.DeviceStatusState, result string, now time.Time) protocol.DeviceStatus {
	s := protocol.DeviceStatus{Serial: d.Serial, State: state, Version: d.Version, Epoch: d.Epoch, Seq: d.Seq, LastResult: result, Updated: now}
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

func (u *Updater) releaseStatus(ctx context.Context, rel *Release) protocol.ReleaseStatus {
	// Counts come from the store so that every updater sharing it publishes the same.
	if fresh, err := u.o.Store.Release(ctx, rel.ID); err == nil {
		rel = fresh
	}
	u.mu.Lock()
	r := u.runs[rel.ID]
	u.mu.Unlock()
	st := protocol.ReleaseStatus{
		Release: rel.ID, Version: rel.Version, Label: rel.Label, State: rel.State,
		Installed: rel.Installed, Failed: rel.Failed, ChunkSize: rel.ChunkSize, ChunkCount: rel.ChunkCount,
		ImageSize: rel.ImageSize, Created: rel.Created, Updated: u.o.Now(),
	}
	if r != nil {
		st.Targets = len(r.targets)
		st.Wrapped = int(r.wrapped.Load())
	} else if ts, err := u.o.Store.Targets(ctx, rel.ID); err == nil {
		st.Targets = len(ts)
	}
	st.Pending = max(0, st.Targets-st.Installed-st.Failed)
	return st
}

// statusLoop publishes the statuses that changed, and completes releases whose targets
// have all installed.
func (u *Updater) statusLoop(ctx context.Context) {
	t := time.NewTicker(statusInterval)
	defer t.Stop()
	lastFleet := time.Time{}
	for {
		select {
		case <-ctx.Done():
			// One last round with a fresh context so the final numbers are out.
			fctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			u.flushStatus(fctx, true)
			cancel()
			return
		case <-t.C:
			force := time.Since(lastFleet) > 5*time.Second
			u.flushStatus(ctx, force)
			if force {
				lastFleet = time.Now()
			}
		}
	}
}

func (u *Updater) flushStatus(ctx context.Context, fleet bool) {
	u.mu.Lock()
	if fleet {
		// Acks that another updater of the ack group processed mark nothing dirty here:
		// look at every release now and then, so that it completes all the same.
		for id := range u.runs {
			u.dirty[id] = true
		}
	}
	ids := make([]keychain.ReleaseID, 0, len(u.dirty))
	for id := range u.dirty {
		ids = append(ids, id)
	}
	u.dirty = map[keychain.ReleaseID]bool{}
	fleet = fleet || u.fleetDir
	u.fleetDir = false
	u.mu.Unlock()
	var msgs []protocol.Message
	for _, id := range ids {
		rel, err := u.o.Store.Release(ctx, id)
		if err != nil {
			if !errors.Is(err, ErrNotFound) {
				u.markDirty(id) // the store is down: try again, or a completion is never noticed
			}
			continue
		}
		st := u.releaseStatus(ctx, rel)
		if st.State == protocol.ReleaseActive && u.settled(ctx, rel, st) && transition(rel, protocol.ReleaseCompleted) == nil {
			if err := u.o.Store.PutRelease(ctx, rel); err == nil {
				st.State = protocol.ReleaseCompleted
				u.mu.Lock()
				delete(u.runs, id)
				u.mu.Unlock()
				u.log.Info().Str("release", id.String()).Int("installed", st.Installed).Int("failed", st.Failed).Msg("release completed")
				fleet = true
			} else {
				u.log.Warn().Err(err).Str("release", id.String()).Msg("marking the release completed; will retry")
				u.markDirty(id)
			}
		}
		b, _ := json.Marshal(st)
		msgs = append(msgs, protocol.Message{Topic: protocol.ReleaseStatusTopic(id), Payload: b, Retain: true})
	}
	if fleet {
		if fs, err := u.fleetStatus(ctx); err == nil {
			b, _ := json.Marshal(fs)
			msgs = append(msgs, protocol.Message{Topic: protocol.FleetStatusTopic, Payload: b, Retain: true})
		}
	}
	if len(msgs) > 0 {
		if err := u.o.Bus.Publish(ctx, msgs...); err != nil && ctx.Err() == nil {
			u.log.Warn().Err(err).Msg("publishing status")
		}
	}
}

// settled reports whether every target of rel has installed it or failed permanently, so
// that the release is completed ([SC-12.2]). st holds the release's counts. A target
// whose failure is transient (the device retries) keeps the release active.
func (u *Updater) settled(ctx context.Context, rel *Release, st protocol.ReleaseStatus) bool {
	if st.Targets == 0 || st.Installed+st.Failed < st.Targets {
		return false
	}
	if st.Failed == 0 {
		return true
	}
	targets, err := u.o.Store.Targets(ctx, rel.ID)
	if err != nil {
		return false // checked again at the next report
	}
	for i := 0; i < len(targets); i += batchSize {
		results, err := u.o.Store.Results(ctx, rel.ID, targets[i:min(i+batchSize, len(targets))])
		if err != nil {
			return false
		}
		for _, r := range results {
			if r == ResultInstalled {
				continue
			}
			name, failed := strings.CutPrefix(r, ResultFailed+":")
			var c protocol.Code
			if !failed || c.UnmarshalText([]byte(name)) != nil || !c.Permanent() {
				return false
			}
		}
	}
	return true
}

func (u *Updater) fleetStatus(ctx context.Context) (protocol.FleetStatus, error) {
	serials, err := u.o.Store.Serials(ctx)
	if err != nil {
		return protocol.FleetStatus{}, err
	}
	rels, err := u.o.Store.Releases(ctx)
	if err != nil {
		return protocol.FleetStatus{}, err
	}
	fs := protocol.FleetStatus{Devices: len(serials), Releases: map[protocol.ReleaseState]int{}, Updated: u.o.Now()}
	for _, r := range rels {
		fs.Releases[r.State]++
	}
	u.mu.Lock()
	fs.Online = len(u.online)
	u.mu.Unlock()
	return fs, nil
}
