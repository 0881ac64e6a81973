package protocol

import "strings"

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
	for _, r := range ReservedNames {
		if name == r {
			return true
		}
	}
	return strings.HasPrefix(name, ReservedPrefix)
}
