package protocol

import (
	"slices"
	"strings"

	"github.com/sealcast/sealcast/keychain"
)

// ReservedNames are the broker account names that no serial may take ([SC-2.2]): the
// accounts the documents and examples create. Every name that begins with
// ReservedPrefix is reserved too.
var ReservedNames = []string{"admin", "monitor", "updater"}

// ReservedPrefix begins the reserved names of the service's own accounts
// (sealcast-updater, sealcast-updater-2, ...).
const ReservedPrefix = "sealcast"

// Reserved reports whether name is reserved for a broker account, so that no device may
// have it as its serial ([SC-2.2]).
func Reserved(name string) bool {
	return slices.Contains(ReservedNames, name) || strings.HasPrefix(name, ReservedPrefix)
}

// ReleaseVersion is what the version rules of release.create need of an existing release.
type ReleaseVersion struct {
	Release keychain.ReleaseID
	Version uint64
	State   ReleaseState
}

// CheckVersion applies release.create's version rules ([SC-12.2a]) to version, given the
// existing releases: it must be above the version floor, the highest version of a
// release neither cancelled nor retired, and, unless allowJump, at most MaxVersionJump
// above it.
func CheckVersion(version uint64, allowJump bool, existing []ReleaseVersion) *Error {
	if version == 0 {
		return Errorf(ErrBadRequest, "version must be a positive integer")
	}
	var floor uint64
	for _, r := range existing {
		if r.State == ReleaseCancelled || r.State == ReleaseRetired {
			continue
		}
		if r.Version >= version {
			return Errorf(ErrVersionNotNewer, "version %d is not newer than release %s (version %d, %s); versions only go up (a release with a wrong version can be cancelled, then retired)", version, r.Release, r.Version, r.State)
		}
		floor = max(floor, r.Version)
	}
	if version-floor > MaxVersionJump && !allowJump {
		return Errorf(ErrBadRequest, "version %d is more than %d above the highest release's (%d): a mistyped version would block every later release; give allow_jump if it is meant", version, uint64(MaxVersionJump), floor)
	}
	return nil
}
