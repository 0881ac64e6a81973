// Package protocol holds the parts of the Sealcast protocol that are not cryptography: the
// MQTT topic tree, the JSON of admin commands, status topics and device files, and the
// error codes (docs/PROTOCOL.md sections 9 and 12-15). The updater and the device agent
// both import it; it imports only keychain.
package protocol

import (
	"strconv"
	"strings"

	"github.com/sealcast/sealcast/keychain"
)

// Root is the first level of every Sealcast topic.
const Root = "sealcast"

// Topics and filters that take no parameter ([SC-9.1]).
const (
	FleetStatusTopic = Root + "/status/fleet"
	AdminRequests    = Root + "/admin/requests"
	// AckFilter matches every device's ack topic; the updater subscribes to it, shared
	// between updaters as $share/<group>/sealcast/devices/+/ack.
	AckFilter = Root + "/devices/+/ack"
	// UploadFilter matches every upload part.
	UploadFilter = Root + "/admin/uploads/+/+"
	// StatusFilter matches all status topics, for monitors.
	StatusFilter = Root + "/status/#"

	// AllFilter matches every Sealcast topic (the updater's access, [SC-9.2]).
	AllFilter = Root + "/#"
	// ReleasesFilter matches every release's manifest and chunks.
	ReleasesFilter = Root + "/releases/#"
	// AdminFilter matches the admin requests, replies and uploads.
	AdminFilter = Root + "/admin/#"
	// KeyFilter, ReceiptFilter, StateFilter and PresenceFilter match that topic of every
	// device.
	KeyFilter      = Root + "/devices/+/key"
	ReceiptFilter  = Root + "/devices/+/receipt"
	StateFilter    = Root + "/devices/+/state"
	PresenceFilter = Root + "/devices/+/presence"
	// DeviceStatusFilter matches the updater's status of every device.
	DeviceStatusFilter = Root + "/status/devices/+"
	// KeysFilter matches every key statement (PROTOCOL.md 5.1).
	KeysFilter = Root + "/keys/+"

	// Prefixes of topic families, for matching topics by prefix.
	DevicesPrefix       = Root + "/devices/"
	ReleasesPrefix      = Root + "/releases/"
	ReleaseStatusPrefix = Root + "/status/releases/"
	DeviceStatusPrefix  = Root + "/status/devices/"
	UploadsPrefix       = Root + "/admin/uploads/"
	KeysPrefix          = Root + "/keys/"
)

// KeyStatementTopic is where key statement seq (>= 1) is retained (PROTOCOL.md 5.1).
func KeyStatementTopic(seq uint32) string { return KeysPrefix + strconv.FormatUint(uint64(seq), 10) }

// Presence payloads.
const (
	Online  = "online"
	Offline = "offline"
)

// MaxPacketSize is the largest MQTT packet a Sealcast broker needs to accept: a chunk of
// MaxChunkSize plus its tag, or an upload part of MaxPartSize, with room for the topic and
// header (PROTOCOL.md 9).
const MaxPacketSize = keychain.MaxChunkSize + 4096

// MaxPartSize is the largest upload part (PROTOCOL.md 12.3).
const MaxPartSize = 1 << 20

// ManifestTopic is where a release's signed manifest is retained.
func ManifestTopic(id keychain.ReleaseID) string {
	return ReleasesPrefix + id.String() + "/manifest"
}

// ChunkTopic is where chunk i of a release's encrypted image is retained.
func ChunkTopic(id keychain.ReleaseID, i uint32) string {
	return ReleasesPrefix + id.String() + "/chunks/" + strconv.FormatUint(uint64(i), 10)
}

// ReleaseFilter matches every retained topic of a release (manifest and chunks).
func ReleaseFilter(id keychain.ReleaseID) string { return ReleasesPrefix + id.String() + "/#" }

// DeviceFilter matches every topic of one device.
func DeviceFilter(serial string) string { return DevicesPrefix + serial + "/#" }

// UploadBase is the topic under which the parts of an upload are published
// (UploadTopic: UploadBase/{part}).
func UploadBase(upload string) string { return UploadsPrefix + upload }

func deviceTopic(serial, leaf string) string { return DevicesPrefix + serial + "/" + leaf }

// KeyTopic is a device's key topic (retained key message).
func KeyTopic(serial string) string { return deviceTopic(serial, "key") }

// ReceiptTopic is a device's receipt topic (retained receipt).
func ReceiptTopic(serial string) string { return deviceTopic(serial, "receipt") }

// AckTopic is where a device publishes acks and reports.
func AckTopic(serial string) string { return deviceTopic(serial, "ack") }

// StateTopic is where a device publishes its own state (retained JSON).
func StateTopic(serial string) string { return deviceTopic(serial, "state") }

// PrefetchTopic is a device's retained prefetch notice (PROTOCOL.md 6.4).
func PrefetchTopic(serial string) string { return deviceTopic(serial, "prefetch") }

// PresenceTopic is a device's retained online/offline flag, also its will.
func PresenceTopic(serial string) string { return deviceTopic(serial, "presence") }

// ReleaseStatusTopic is the updater's retained status of a release.
func ReleaseStatusTopic(id keychain.ReleaseID) string {
	return ReleaseStatusPrefix + id.String()
}

// DeviceStatusTopic is the updater's retained view of a device.
func DeviceStatusTopic(serial string) string { return DeviceStatusPrefix + serial }

// ReplyTopic is where the reply to admin request id is published.
func ReplyTopic(requestID string) string { return Root + "/admin/replies/" + requestID }

// UploadTopic is where part n of an upload is published.
func UploadTopic(upload string, part uint32) string {
	return UploadBase(upload) + "/" + strconv.FormatUint(uint64(part), 10)
}

// DeviceOf returns the serial and leaf of a device topic such as
// sealcast/devices/{serial}/ack, and whether topic is one.
func DeviceOf(topic string) (serial, leaf string, ok bool) {
	rest, ok := strings.CutPrefix(topic, DevicesPrefix)
	if !ok {
		return "", "", false
	}
	serial, leaf, ok = strings.Cut(rest, "/")
	if !ok || strings.Contains(leaf, "/") || !keychain.ValidSerial(serial) {
		return "", "", false
	}
	return serial, leaf, true
}

// UploadOf returns the upload id and part number of an upload topic.
func UploadOf(topic string) (upload string, part uint32, ok bool) {
	rest, ok := strings.CutPrefix(topic, UploadsPrefix)
	if !ok {
		return "", 0, false
	}
	upload, p, ok := strings.Cut(rest, "/")
	if !ok || !ValidID(upload) {
		return "", 0, false
	}
	n, err := strconv.ParseUint(p, 10, 32)
	if err != nil || strconv.FormatUint(n, 10) != p {
		return "", 0, false
	}
	return upload, uint32(n), true
}

// ValidID reports whether s is a valid request or upload id: 1-64 characters of
// [A-Za-z0-9._-] (PROTOCOL.md 12), so that it is safe as a topic level.
func ValidID(s string) bool {
	if len(s) == 0 || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// OrderKey is what a bus keeps the order of messages by: a message is published after
// every earlier message with the same key. It is the topic's first three levels, so all
// messages of one device (sealcast/devices/{serial}/...) keep their order, as do those of
// one release (sealcast/releases/{rid}/...); a shorter topic is its own key.
func OrderKey(topic string) string {
	if n := strings.IndexByte(topic, '/'); n >= 0 {
		if m := strings.IndexByte(topic[n+1:], '/'); m >= 0 {
			if e := strings.IndexByte(topic[n+1+m+1:], '/'); e >= 0 {
				return topic[:n+1+m+1+e]
			}
		}
	}
	return topic
}

// OrderLane returns which of n lanes (connections, goroutines) a bus publishes topic on,
// so that messages with the same OrderKey take the same lane and keep their order: the
// 32-bit FNV-1a hash of the key, modulo n. It does not allocate.
func OrderLane(topic string, n int) int {
	h := uint32(2166136261)
	for _, c := range []byte(OrderKey(topic)) {
		h ^= uint32(c)
		h *= 16777619
	}
	return int(h % uint32(n))
}

// Message is one QoS 1 publish.
type Message struct {
	Topic   string
	Payload []byte
	Retain  bool
}
