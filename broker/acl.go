package broker

import (
	"strings"

	"github.com/sealcast/sealcast/protocol"
)

// The share prefix of MQTT 5 shared subscriptions; every Sealcast topic and filter comes
// from package protocol (PROTOCOL.md 9).
const sharePrefix = "$share/"

// RetainAllowed reports whether a PUBLISH to topic may carry the retain flag: not on the
// topics PROTOCOL.md 9 lists as not retained (a device's ack topic and everything under
// sealcast/admin/), where a retained message would be garbage replayed to every new
// subscriber. [SC-9.2]
func RetainAllowed(topic string) bool {
	return !filterWithin(topic, protocol.AckFilter) && !filterWithin(topic, protocol.AdminFilter)
}

// Allowed reports whether a client of the given role may publish to topic (write) or
// subscribe to, and receive from, the topic filter topic (!write). serial is the device's
// serial and is only consulted for RoleDevice. It is a pure function of its arguments, does
// not allocate, and is what the ACL hook calls for every SUBSCRIBE filter, every PUBLISH and
// every delivery. [SC-9.2]
//
// A subscription filter is allowed only if every topic it can match is allowed: a device
// may subscribe to sealcast/releases/+/manifest but not to sealcast/devices/+/key, # or
// sealcast/devices/#. A shared subscription $share/{group}/{filter} is judged by its filter.
func Allowed(role Role, serial, topic string, write bool) bool {
	if !write {
		var ok bool
		if topic, ok = stripShare(topic); !ok {
			return false
		}
	}
	switch role {
	case RoleUpdater:
		// The updater MAY publish and subscribe to everything under sealcast/.
		return filterWithin(topic, protocol.AllFilter)
	case RoleAdmin:
		// An admin MAY publish to sealcast/admin/# and subscribe to everything.
		if write {
			return filterWithin(topic, protocol.AdminFilter)
		}
		return true
	case RoleMonitor:
		// A monitor MAY subscribe to status and device state/presence, and publish nothing.
		if write {
			return false
		}
		return filterWithin(topic, protocol.StatusFilter) || filterWithin(topic, protocol.StateFilter) ||
			filterWithin(topic, protocol.PresenceFilter)
	case RoleDevice:
		if write {
			// Only its own ack, state and presence.
			return ownTopic(topic, serial, "ack", "state", "presence")
		}
		// releases/#, the key statements, and its own key, receipt and prefetch notice,
		// named literally.
		return filterWithin(topic, protocol.ReleasesFilter) || filterWithin(topic, protocol.KeysFilter) ||
			ownTopic(topic, serial, "key", "receipt", "prefetch")
	}
	return false
}

// stripShare returns the filter part of a shared subscription $share/{group}/{filter}, or
// topic itself if it is not one. ok is false for a malformed shared subscription.
func stripShare(topic string) (string, bool) {
	rest, ok := strings.CutPrefix(topic, sharePrefix)
	if !ok {
		return topic, true
	}
	group, filter, ok := strings.Cut(rest, "/")
	if !ok || group == "" || filter == "" || strings.ContainsAny(group, "+#") {
		return "", false
	}
	return filter, true
}

// ownTopic reports whether topic is sealcast/devices/{serial}/{leaf} for one of the leaves
// (an empty leaf matches nothing). Wildcards never match: they are not the serial.
func ownTopic(topic, serial, leaf1, leaf2, leaf3 string) bool {
	rest, ok := strings.CutPrefix(topic, protocol.DevicesPrefix)
	if !ok || serial == "" {
		return false
	}
	rest, ok = strings.CutPrefix(rest, serial)
	if !ok {
		return false
	}
	leaf, ok := strings.CutPrefix(rest, "/")
	if !ok || leaf == "" {
		return false
	}
	return leaf == leaf1 || leaf == leaf2 || leaf == leaf3
}

// filterWithin reports whether every topic matched by filter f is matched by pattern p,
// using MQTT matching rules ('+' one level, '#' this level and everything below, including
// the parent: a/# matches a). A topic name is a filter without wildcards, so the same
// function judges publishes and deliveries. Topics starting with '$' are never within a
// pattern that does not start with '$' ([MQTT-4.7.2-1]).
func filterWithin(f, p string) bool {
	if strings.HasPrefix(f, "$") != strings.HasPrefix(p, "$") {
		return false
	}
	for {
		pl, prest, pmore := strings.Cut(p, "/")
		if pl == "#" {
			return true
		}
		fl, frest, fmore := strings.Cut(f, "/")
		switch {
		case fl == "#":
			return false // p's level is not '#' (handled above)
		case fl == "+":
			if pl != "+" {
				return false
			}
		case pl != "+" && pl != fl:
			return false
		}
		switch {
		case !fmore && !pmore:
			return true
		case !fmore:
			// f ends; p continues: only p's next level being a final '#' still matches.
			return prest == "#"
		case !pmore:
			return false
		}
		f, p = frest, prest
	}
}
