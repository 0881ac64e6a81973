package broker

import (
	"strings"
	"testing"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// FuzzAllowed: the access rules never panic, and whatever topic or filter a hostile
// client sends, a device writes only its own ack, state and presence and subscribes to
// nothing that could deliver another device's key or receipt or the admin traffic, and a
// monitor writes nothing ([SC-9.2]).
func FuzzAllowed(f *testing.F) {
	for _, s := range []string{
		"sealcast/devices/d1/ack", "sealcast/devices/+/key", "#", "+/#", "$share/g/sealcast/devices/+/ack",
		"sealcast/releases/+/manifest", "sealcast/devices/d1/#", "sealcast/admin/requests", "+/+/+/key",
		"sealcast/devices/d1x/key", "sealcast/devices/d1/key/#", "$share//#", "sealcast/+/d1/receipt", "",
	} {
		f.Add(s, "d1")
	}
	f.Fuzz(func(t *testing.T, topic, serial string) {
		if !keychain.ValidSerial(serial) {
			serial = "d1"
		}
		for _, role := range []Role{RoleDevice, RoleMonitor, RoleAdmin, RoleUpdater, "nobody"} {
			Allowed(role, serial, topic, true)
			Allowed(role, serial, topic, false)
		}
		RetainAllowed(topic)
		if Allowed(RoleMonitor, serial, topic, true) {
			t.Fatalf("a monitor may publish to %q", topic)
		}
		if Allowed(RoleDevice, serial, topic, true) &&
			topic != protocol.AckTopic(serial) && topic != protocol.StateTopic(serial) && topic != protocol.PresenceTopic(serial) {
			t.Fatalf("device %s may publish to %q", serial, topic)
		}
		if Allowed(RoleDevice, serial, topic, false) {
			filter, _ := stripShare(topic)
			other := serial + "x"
			for _, secret := range []string{protocol.KeyTopic(other), protocol.ReceiptTopic(other), protocol.AckTopic(serial),
				protocol.AdminRequests, protocol.ReplyTopic("r1"), protocol.DeviceStatusTopic(serial)} {
				if matches(filter, secret) {
					t.Fatalf("device %s may subscribe to %q, which delivers %q", serial, topic, secret)
				}
			}
		}
	})
}

// matches is MQTT topic matching, written apart from filterWithin to check it.
func matches(filter, topic string) bool {
	if filter == "" || strings.HasPrefix(topic, "$") && !strings.HasPrefix(filter, "$") {
		return false
	}
	fs, ts := strings.Split(filter, "/"), strings.Split(topic, "/")
	for i, f := range fs {
		if f == "#" {
			return true
		}
		if i >= len(ts) || f != "+" && f != ts[i] {
			return false
		}
	}
	return len(fs) == len(ts)
}
