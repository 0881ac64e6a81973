package keychain

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"testing"
)

func BenchmarkStep(b *testing.B) {
	k := ChainKey{1}
	for b.Loop() {
		k = Step(k)
	}
}

// BenchmarkKey is a device's cost to derive its key: n chain steps.
func BenchmarkKey(b *testing.B) {
	for _, n := range []uint32{1000, 65536} {
		b.Run(fmt.Sprint("n=", n), func(b *testing.B) {
			for b.Loop() {
				Key(UnitData{1}, n)
			}
		})
	}
}

// BenchmarkTraversalAdvance is the server's cost per device per confirmed update.
func BenchmarkTraversalAdvance(b *testing.B) {
	for _, l := range []uint32{1024, 65536} {
		b.Run(fmt.Sprint("L=", l), func(b *testing.B) {
			t, _ := NewTraversal(UnitData{1}, l)
			hashes := 0
			for b.Loop() {
				if t.Pos() == 1 {
					t, _ = NewTraversal(UnitData{1}, l)
				}
				before := t.hashes
				t.Advance()
				_ = t.Current()
				hashes += t.hashes - before
			}
			b.ReportMetric(float64(hashes)/float64(b.N), "hashes/op")
		})
	}
}

func BenchmarkWrap(b *testing.B) {
	k := Key(UnitData{1}, 10)
	m := KeyMessage{Kind: KindRelease, Seq: 10}
	for b.Loop() {
		SealKeyMessage(m, k, "sensor-0001", ContentKey{})
	}
}

func BenchmarkUnwrap(b *testing.B) {
	k := Key(UnitData{1}, 10)
	raw, _ := SealKeyMessage(KeyMessage{Kind: KindRelease, Seq: 10}, k, "sensor-0001", ContentKey{})
	for b.Loop() {
		m, _ := ParseKeyMessage(raw)
		if _, err := m.Open(k, "sensor-0001"); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAckVerify(b *testing.B) {
	k := Key(UnitData{1}, 10)
	raw, _ := Ack{Kind: AckInstalled, Seq: 10, DeviceSeq: 9}.Seal(k, "sensor-0001")
	for b.Loop() {
		if err := VerifyAck(raw, k, "sensor-0001"); err != nil {
			b.Fatal(err)
		}
	}
}

const benchImage = 16 << 20

func BenchmarkEncryptImage(b *testing.B) {
	img := make([]byte, benchImage)
	b.SetBytes(benchImage)
	for b.Loop() {
		EncryptChunks(bytes.NewReader(img), int64(len(img)), [Size]byte{1}, DefaultChunkSize, func(uint32, []byte) error { return nil })
	}
}

func BenchmarkDecryptImage(b *testing.B) {
	var ct bytes.Buffer
	w, _ := EncryptStream(&ct, [Size]byte{1}, DefaultChunkSize)
	w.Write(make([]byte, benchImage))
	w.Close()
	b.SetBytes(benchImage)
	for b.Loop() {
		r, _ := DecryptStream(bytes.NewReader(ct.Bytes()), [Size]byte{1}, DefaultChunkSize)
		if n, err := io.Copy(io.Discard, r); err != nil || n != benchImage {
			b.Fatal(n, err)
		}
	}
}

// BenchmarkChunkOpen is a device's cost per chunk (64 KiB) of an image of 16,384 chunks
// (1 GiB, a tree of depth 14): verifying the chunk's proof against the signed root
// (PROTOCOL.md 4.3), beside the SHA-256 of the ciphertext it computed before (for the
// manifest's cipher_sha256, which the root replaced) and AES-GCM opening it.
func BenchmarkChunkOpen(b *testing.B) {
	const count = 16384
	pk := [Size]byte{1}
	c := NewChunkCipher(pk)
	ct := c.Seal(nil, 5, false, make([]byte, DefaultChunkSize))
	leaves := make([][Size]byte, count)
	for i := range leaves {
		leaves[i] = chunkLeaf(uint32(i), []byte{byte(i)})
	}
	leaves[5] = chunkLeaf(5, ct)
	tree := newChunkTree(leaves)
	payload := tree.appendProof(append([]byte(nil), ct...), 5)
	root := tree.root()
	b.Run("verify", func(b *testing.B) {
		b.SetBytes(DefaultChunkSize)
		for b.Loop() {
			if _, err := VerifyChunk(root, count, 5, payload); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(len(payload)-len(ct)), "proof-bytes/chunk")
	})
	// Before the chunk tree a device hashed every ciphertext for cipher_sha256: this.
	b.Run("sha256-before", func(b *testing.B) {
		b.SetBytes(DefaultChunkSize)
		for b.Loop() {
			sha256.Sum256(ct)
		}
	})
	b.Run("gcm", func(b *testing.B) {
		b.SetBytes(DefaultChunkSize)
		dst := make([]byte, 0, DefaultChunkSize)
		for b.Loop() {
			if _, err := c.Open(dst[:0], 5, count, DefaultChunkSize, ct); err != nil {
				b.Fatal(err)
			}
		}
	})
}
