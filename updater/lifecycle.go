package updater

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// releaseTransitions is the release lifecycle (PROTOCOL.md 12.2), in one table: the states
// a release may move to from each state; retired is final, and completed and cancelled
// may only be retired. Every change of a release's state goes through transition.
var releaseTransitions = map[protocol.ReleaseState][]protocol.ReleaseState{
	// The image is being published; a crash or a failed publish cancels it.
	protocol.ReleasePublishing: {protocol.ReleaseActive, protocol.ReleaseCancelled},
	protocol.ReleaseActive:     {protocol.ReleasePaused, protocol.ReleaseCompleted, protocol.ReleaseCancelled},
	protocol.ReleasePaused:     {protocol.ReleaseActive, protocol.ReleaseCancelled},
	// Retiring takes a finished release out of the version floor (release.retire).
	protocol.ReleaseCompleted: {protocol.ReleaseRetired},
	protocol.ReleaseCancelled: {protocol.ReleaseRetired},
}

// ErrTransition is wrapped by every error for a state change the lifecycle does not allow.
var ErrTransition = errors.New("updater: illegal release state change")

// transition moves rel to state to, or returns an error wrapping ErrTransition and leaves
// rel as it was.
func transition(rel *Release, to protocol.ReleaseState) error {
	if !canTransition(rel.State, to) {
		return fmt.Errorf("%w: release %s is %s and cannot become %s", ErrTransition, rel.ID, rel.State, to)
	}
	rel.State = to
	return nil
}

// canTransition reports whether the lifecycle allows a release in state from to become to.
func canTransition(from, to protocol.ReleaseState) bool {
	return slices.Contains(releaseTransitions[from], to)
}

// lifecycle is the one writer of release states: every change reads the release's
// record, checks the transition, and stores it, one change at a time, so that a
// completion and a cancel never overwrite each other. A held run's record is replaced
// by the stored one.
type lifecycle struct {
	store Store
	runs  *registry
	mu    sync.Mutex
}

// change moves release id to state to. It returns the stored record, an error wrapping
// ErrNotFound for an unknown release, or one wrapping ErrTransition, with nothing
// changed, when the release's current state cannot become to.
// edits change other fields of the record in the same write (a pause's reason).
func (l *lifecycle) change(ctx context.Context, id keychain.ReleaseID, to protocol.ReleaseState, edits ...func(*Release)) (*Release, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	rel, err := l.store.Release(ctx, id)
	if err != nil {
		return nil, err
	}
	for _, e := range edits {
		e(rel)
	}
	return rel, l.put(ctx, rel, to)
}

// edit changes fields of release id's record other than its state (the wave open now).
func (l *lifecycle) edit(ctx context.Context, id keychain.ReleaseID, e func(*Release)) (*Release, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	rel, err := l.store.Release(ctx, id)
	if err != nil {
		return nil, err
	}
	e(rel)
	if err := l.store.PutRelease(ctx, rel); err != nil {
		return nil, err
	}
	if r := l.runs.get(rel.ID); r != nil {
		stored := *rel
		r.rel.Store(&stored)
	}
	return rel, nil
}

// record moves rel, which the caller holds alone (a release being created), to state to
// and stores it.
func (l *lifecycle) record(ctx context.Context, rel *Release, to protocol.ReleaseState) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.put(ctx, rel, to)
}

func (l *lifecycle) put(ctx context.Context, rel *Release, to protocol.ReleaseState) error {
	from := rel.State
	if err := transition(rel, to); err != nil {
		return err
	}
	if err := l.store.PutRelease(ctx, rel); err != nil {
		rel.State = from
		return err
	}
	if r := l.runs.get(rel.ID); r != nil {
		stored := *rel
		r.rel.Store(&stored)
	}
	return nil
}
