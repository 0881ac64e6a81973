package protocol

import (
	"encoding/json"
	"testing"
)

// FuzzTopicParsers: the parsers of topics that devices and operators publish to never
// panic, and what they accept is exactly what the topic builders make of their result.
func FuzzTopicParsers(f *testing.F) {
	for _, s := range []string{
		"sealcast/devices/d1/ack", "sealcast/devices/d1/ack/x", "sealcast/devices//ack", "sealcast/devices/-x/ack",
		"sealcast/uploads/up-1/0", "sealcast/uploads/up-1/007", "sealcast/uploads/up-1/4294967296",
		"sealcast/uploads//1", "sealcast/uploads/up-1/+1", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, topic string) {
		if serial, leaf, ok := DeviceOf(topic); ok && deviceTopic(serial, leaf) != topic {
			t.Fatalf("DeviceOf(%q) = %q, %q, which make %q", topic, serial, leaf, deviceTopic(serial, leaf))
		}
		if up, part, ok := UploadOf(topic); ok && UploadTopic(up, part) != topic {
			t.Fatalf("UploadOf(%q) = %q, %d, which make %q", topic, up, part, UploadTopic(up, part))
		}
	})
}

// FuzzAdminRequest: decoding an admin request, and every command's arguments, strictly
// as the updater does, never panics; a request that decodes re-encodes to one that
// decodes to the same.
func FuzzAdminRequest(f *testing.F) {
	for _, s := range []string{
		`{"id":"r1","cmd":"device.provision","args":{"count":3,"prefix":"d-"}}`,
		`{"id":"r1","cmd":"release.create","args":{"upload":"up-1","version":2,"all":true}}`,
		`{"id":"r1","cmd":"release.pause","args":{"release":"00112233445566778899aabbccddeeff"}}`,
		`{"id":"r1","cmd":"release.pause","args":{"release":"zz"}}`, `{"id":1}`, `[]`, `null`, ``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var req Request
		if json.Unmarshal(b, &req) != nil {
			return
		}
		for _, v := range []any{&ProvisionArgs{}, &SerialArgs{}, &UploadBeginArgs{}, &UploadArgs{}, &ReleaseCreateArgs{}, &ReleaseArgs{}} {
			_ = json.Unmarshal(req.Args, v)
		}
		again, err := json.Marshal(req)
		if err != nil {
			t.Fatalf("re-encoding %+v: %v", req, err)
		}
		var req2 Request
		if err := json.Unmarshal(again, &req2); err != nil || req2.ID != req.ID || req2.Cmd != req.Cmd {
			t.Fatalf("%q re-encoded as %q decodes to %+v, %v", b, again, req2, err)
		}
	})
}
