package updater

import (
	"errors"
	"slices"
	"testing"

	"github.com/sealcast/sealcast/protocol"
)

// TestReleaseLifecycle: every state change the table allows happens, every other one is
// an ErrTransition that leaves the release as it was, and completed and cancelled are
// final.
func TestReleaseLifecycle(t *testing.T) {
	for _, from := range protocol.ReleaseStates {
		for _, to := range protocol.ReleaseStates {
			rel := &Release{State: from}
			err := transition(rel, to)
			allowed := slices.Contains(releaseTransitions[from], to)
			switch {
			case allowed && (err != nil || rel.State != to):
				t.Errorf("%s -> %s: %v, state %s", from, to, err, rel.State)
			case !allowed && (!errors.Is(err, ErrTransition) || rel.State != from):
				t.Errorf("%s -> %s allowed: %v, state %s", from, to, err, rel.State)
			}
		}
	}
	for _, final := range []protocol.ReleaseState{protocol.ReleaseCompleted, protocol.ReleaseCancelled} {
		if len(releaseTransitions[final]) != 0 {
			t.Errorf("%s is not final", final)
		}
	}
}
