package keychain

import (
	"bytes"
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
		EncryptChunks(bytes.NewReader(img), [Size]byte{1}, DefaultChunkSize, func(uint32, []byte) error { return nil })
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
