package updater

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// versionBook answers, for one batch of acks, what the server knows of versions: the
// version of a release, and the highest version ever released to a device. The server
// records these, never the version an ack or report claims ([SC-10.2] 2 and 4).
type versionBook struct {
	store Store
	runs  *registry
	rel   map[keychain.ReleaseID]uint64
	all   []*Release // every release, read once per batch when a report needs it
}

func newVersionBook(store Store, runs *registry) *versionBook {
	return &versionBook{store: store, runs: runs, rel: map[keychain.ReleaseID]uint64{}}
}

// of returns the version of release id.
func (b *versionBook) of(ctx context.Context, id keychain.ReleaseID) (uint64, error) {
	if v, ok := b.rel[id]; ok {
		return v, nil
	}
	var v uint64
	if r := b.runs.get(id); r != nil {
		v = r.release().Version
	} else {
		rel, err := b.store.Release(ctx, id)
		if err != nil {
			return 0, fmt.Errorf("reading release %s: %w", id, err)
		}
		v = rel.Version
	}
	b.rel[id] = v
	return v, nil
}

// highestTo returns the highest version of a published release (in any state after
// publishing) that targets serial and is at most limit, or 0 if there is none.
func (b *versionBook) highestTo(ctx context.Context, serial string, limit uint64) (uint64, error) {
	if b.all == nil {
		rels, err := b.store.Releases(ctx)
		if err != nil {
			return 0, fmt.Errorf("reading releases: %w", err)
		}
		b.all = slices.SortedFunc(slices.Values(rels), func(x, y *Release) int {
			return cmp.Compare(y.Version, x.Version) // highest first
		})
	}
	for _, r := range b.all {
		if r.Version > limit || r.State == protocol.ReleasePublishing {
			continue
		}
		targets, err := b.store.Targets(ctx, r.ID)
		if err != nil {
			return 0, fmt.Errorf("reading the targets of release %s: %w", r.ID, err)
		}
		if _, found := slices.BinarySearch(targets, serial); found {
			return r.Version, nil
		}
	}
	return 0, nil
}

// errVersion is wrapped by versionsFor's errors: the store could not say, and the acks
// wait for their devices to re-send them.
var errVersion = errors.New("the versions the server knows are unreadable")

// versionsFor sets the version each advance records: for an installed ack, the version of
// the release the server wrapped; for a stale_key report that moves the counter down, the
// version the report claims, but never above the highest version ever released to the
// device. It returns how many claims differed from what is recorded.
func versionsFor(ctx context.Context, b *versionBook, vs []*verdict) (mismatches int, err error) {
	for _, v := range vs {
		d, a := v.dev, v.ack
		var known uint64
		switch a.Kind {
		case keychain.AckInstalled:
			if known, err = b.of(ctx, a.ID); err != nil {
				return mismatches, fmt.Errorf("%w: %w", errVersion, err)
			}
		case keychain.AckFailed: // a stale_key report from a device below the counter
			if a.Version <= d.Version {
				continue
			}
			if known, err = b.highestTo(ctx, d.Serial, a.Version); err != nil {
				return mismatches, fmt.Errorf("%w: %w", errVersion, err)
			}
		default:
			continue // a re-key confirms no version
		}
		if a.Version != known {
			mismatches++
		}
		v.advance.Version = max(d.Version, known)
	}
	return mismatches, nil
}
