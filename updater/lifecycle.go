package updater

import (
	"errors"
	"fmt"
	"slices"

	"github.com/sealcast/sealcast/protocol"
)

// releaseTransitions is the release lifecycle (PROTOCOL.md 12.2), in one table: the states
// a release may move to from each state. completed and cancelled are final. Every change
// of a release's state goes through transition.
var releaseTransitions = map[protocol.ReleaseState][]protocol.ReleaseState{
	// The image is being published; a crash or a failed publish cancels it.
	protocol.ReleasePublishing: {protocol.ReleaseActive, protocol.ReleaseCancelled},
	protocol.ReleaseActive:     {protocol.ReleasePaused, protocol.ReleaseCompleted, protocol.ReleaseCancelled},
	protocol.ReleasePaused:     {protocol.ReleaseActive, protocol.ReleaseCancelled},
}

// ErrTransition is wrapped by every error for a state change the lifecycle does not allow.
var ErrTransition = errors.New("updater: illegal release state change")

// transition moves rel to state to, or returns an error wrapping ErrTransition and leaves
// rel as it was.
func transition(rel *Release, to protocol.ReleaseState) error {
	if !slices.Contains(releaseTransitions[rel.State], to) {
		return fmt.Errorf("%w: release %s is %s and cannot become %s", ErrTransition, rel.ID, rel.State, to)
	}
	rel.State = to
	return nil
}
