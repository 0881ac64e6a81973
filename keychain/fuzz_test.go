package keychain

import (
	"bytes"
	"crypto/ed25519"
	"io"
	"testing"
	"time"
)

// The parsers face bytes from the network; none may panic, and whatever they accept must
// re-encode to the same bytes (no malleability).

func FuzzParseKeyMessage(f *testing.F) {
	k := Key(UnitData{1}, 5)
	b, _ := SealKeyMessage(KeyMessage{Kind: KindRelease, Seq: 5}, k, "dev", ContentKey{})
	r, _ := SealKeyMessage(KeyMessage{Kind: KindRekey, Seq: 5, NewLength: 16}, k, "dev", ContentKey{})
	f.Add(b)
	f.Add(r)
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ParseKeyMessage(b)
		if err != nil {
			return
		}
		if _, err := m.Open(k, "dev"); err == nil && !bytes.Equal(m.raw, b) {
			t.Fatal("opened a message that differs from its bytes")
		}
	})
}

func FuzzParseManifest(f *testing.F) {
	pub, priv, _ := ed25519.GenerateKey(nil)
	m := &Manifest{Version: 1, Created: time.Unix(1, 0), ImageSize: 10, ChunkSize: 1024, ChunkCount: 1}
	b, _ := m.Sign(priv)
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ParseManifest(b, pub)
		if err != nil {
			return
		}
		again, err := m.Sign(priv)
		if err != nil || !bytes.Equal(again[:manifestBodySize], b[:manifestBodySize]) {
			t.Fatalf("accepted manifest does not re-encode: %v", err)
		}
	})
}

func FuzzParseAck(f *testing.F) {
	k := Key(UnitData{2}, 9)
	a, _ := Ack{Kind: AckInstalled, Seq: 9, DeviceSeq: 8}.Seal(k, "dev")
	r, _ := Receipt{Kind: AckInstalled, Seq: 9}.Seal(k, "dev")
	f.Add(a)
	f.Add(r)
	f.Fuzz(func(t *testing.T, b []byte) {
		if a, err := ParseAck(b); err == nil && VerifyAck(b, k, "dev") == nil {
			again, _ := a.Seal(k, "dev")
			if !bytes.Equal(again, b) {
				t.Fatal("verified ack does not re-encode")
			}
		}
		if r, err := ParseReceipt(b); err == nil && VerifyReceipt(b, k, "dev") == nil {
			again, _ := r.Seal(k, "dev")
			if !bytes.Equal(again, b) {
				t.Fatal("verified receipt does not re-encode")
			}
		}
	})
}

func FuzzDecryptStream(f *testing.F) {
	pk := [Size]byte{4}
	var buf bytes.Buffer
	w, _ := EncryptStream(&buf, pk, 1024)
	w.Write(make([]byte, 3000))
	w.Close()
	f.Add(buf.Bytes())
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, _ := DecryptStream(bytes.NewReader(b), pk, 1024)
		out, err := io.ReadAll(r)
		if err == nil && !bytes.Equal(out, make([]byte, len(out))) {
			t.Fatal("forged plaintext accepted")
		}
	})
}

func FuzzTraversalState(f *testing.F) {
	tr, _ := NewTraversal(UnitData{}, 64)
	for range 7 {
		tr.Advance()
	}
	b, _ := tr.MarshalBinary()
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		var x Traversal
		if x.UnmarshalBinary(b) != nil {
			return
		}
		// A decodable state never panics however it is walked.
		for x.Pos() > 0 {
			x.Current()
			if x.Advance() != nil {
				break
			}
		}
	})
}

// FuzzChunkPayload: a chunk topic's payload from the network is checked against the
// signed root without panicking, and only the genuine payload passes ([SC-4.3]).
func FuzzChunkPayload(f *testing.F) {
	var payloads [][]byte
	img := bytes.Repeat([]byte{9}, 5000)
	sum, _ := EncryptChunks(bytes.NewReader(img), int64(len(img)), [Size]byte{3}, 1024, func(_ uint32, p []byte) error {
		payloads = append(payloads, bytes.Clone(p))
		return nil
	})
	for i, p := range payloads {
		f.Add(uint32(i), p)
	}
	f.Add(uint32(7), []byte{})
	f.Fuzz(func(t *testing.T, i uint32, p []byte) {
		if _, err := VerifyChunk(sum.ChunksRoot, sum.ChunkCount, i, p); err == nil && !bytes.Equal(p, payloads[i]) {
			t.Fatalf("a payload other than chunk %d's passed the tree", i)
		}
	})
}

func FuzzParseReceipt(f *testing.F) {
	k := Key(UnitData{1}, 5)
	b, _ := ReceiptFor(Ack{Kind: AckInstalled, Seq: 5}, ReceiptAccepted).Seal(k, "dev")
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		if _, err := ParseReceipt(b); err != nil {
			return
		}
		_ = VerifyReceipt(b, k, "dev")
	})
}

func FuzzParseKeyStatement(f *testing.F) {
	pub, priv, _ := ed25519.GenerateKey(nil)
	next, _, _ := ed25519.GenerateKey(nil)
	b, _ := KeyStatement{Seq: 1, Key: next}.Sign(priv)
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := ParseKeyStatement(b, pub)
		if err != nil {
			return
		}
		again, _ := KeyStatement{Seq: s.Seq, Key: s.Key}.Sign(priv) // Ed25519 is deterministic
		if !bytes.Equal(again, b) {
			t.Fatal("accepted a statement that differs from its re-encoding")
		}
	})
}
