package updater

import (
	"errors"
	"slices"
	"testing"

	"github.com/sealcast/sealcast/protocol"
)

// TestReleaseLifecycle: every state change the table allows happens, every other one is
// an ErrTransition that leaves the release as it was; retired is final, and completed and
// cancelled may only be retired ([SC-12.2a]).
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
	if len(releaseTransitions[protocol.ReleaseRetired]) != 0 {
		t.Error("retired is not final")
	}
	for _, done := range []protocol.ReleaseState{protocol.ReleaseCompleted, protocol.ReleaseCancelled} {
		if !slices.Equal(releaseTransitions[done], []protocol.ReleaseState{protocol.ReleaseRetired}) {
			t.Errorf("%s may become %v; want retired only", done, releaseTransitions[done])
		}
	}
}
