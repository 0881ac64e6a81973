package updater

import (
	"bytes"
	"testing"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// FuzzAdminArgs: the strict decoding of every admin command's arguments, as the MQTT
// transport does it, never panics and refuses with bad_request, never anything else.
func FuzzAdminArgs(f *testing.F) {
	for _, s := range []string{`{"count":3,"prefix":"d-"}`, `{"serials":["a","b"],"chain_length":16}`, `{"upload":"up-1","version":2,"all":true,"devices":["x"]}`,
		`{"release":"00112233445566778899aabbccddeeff"}`, `{"release":"zz"}`, `{"all":"yes"}`, `{"typo":1}`, `[]`, `null`, ``, `{`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		req := protocol.Request{ID: "r1", Cmd: "fuzz", Args: b}
		for _, v := range []any{&protocol.ProvisionArgs{}, &protocol.SerialArgs{}, &protocol.UploadBeginArgs{}, &protocol.UploadArgs{},
			&protocol.ReleaseCreateArgs{}, &protocol.ReleaseArgs{}, &struct{}{}} {
			if err := args(req, v); err != nil && protocol.CodeOf(err) != protocol.ErrBadRequest {
				t.Fatalf("args(%q) into %T: %v, want bad_request", b, v, err)
			}
		}
	})
}

// FuzzReleaseMeta: a store's release record, however damaged, decodes to a release or to
// an error, and what decodes encodes back to the same release.
func FuzzReleaseMeta(f *testing.F) {
	good, _ := MarshalReleaseMeta(&Release{Version: 3, Label: "x", State: protocol.ReleaseActive, Manifest: []byte{1}, ChunkSize: 1024})
	for _, s := range [][]byte{good, []byte(`{}`), []byte(`{"version":-1}`), []byte(`{"manifest":"!!"}`), nil} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		id := keychain.ReleaseID{7}
		r, err := UnmarshalReleaseMeta(id, b)
		if err != nil {
			return
		}
		again, err := MarshalReleaseMeta(r)
		if err != nil {
			t.Fatal(err)
		}
		r2, err := UnmarshalReleaseMeta(id, again)
		if err != nil || r2.Version != r.Version || r2.State != r.State || !bytes.Equal(r2.Manifest, r.Manifest) || !r2.Created.Equal(r.Created) {
			t.Fatalf("%q: %+v re-encoded decodes to %+v, %v", b, r, r2, err)
		}
	})
}
