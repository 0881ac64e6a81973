package keychain

import (
	"bytes"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"strings"
	"testing"
	"time"
)

func TestSerials(t *testing.T) {
	for _, s := range []string{"a", "A1", "sensor-0001", "x.y_z-9", strings.Repeat("a", 64)} {
		if !ValidSerial(s) {
			t.Errorf("ValidSerial(%q) = false", s)
		}
	}
	for _, s := range []string{"", "-a", ".", "..", "a/b", "a+", "a#", "a b", "é", strings.Repeat("a", 65), "$SYS"} {
		if ValidSerial(s) {
			t.Errorf("ValidSerial(%q) = true", s)
		}
		if _, err := DeriveUnitData(RootSecret{}, s, 0); !errors.Is(err, ErrInvalidSerial) {
			t.Errorf("DeriveUnitData(%q): err = %v", s, err)
		}
	}
}

func TestUnitDataSeparation(t *testing.T) {
	r1, _ := NewRootSecret()
	r2, _ := NewRootSecret()
	a, _ := DeriveUnitData(r1, "dev-1", 0)
	seen := map[UnitData]string{a: "r1 dev-1 e0"}
	for name, f := range map[string]func() (UnitData, error){
		"r2 dev-1 e0": func() (UnitData, error) { return DeriveUnitData(r2, "dev-1", 0) },
		"r1 dev-2 e0": func() (UnitData, error) { return DeriveUnitData(r1, "dev-2", 0) },
		"r1 dev-1 e1": func() (UnitData, error) { return DeriveUnitData(r1, "dev-1", 1) },
	} {
		u, err := f()
		if err != nil {
			t.Fatal(err)
		}
		if prev, dup := seen[u]; dup {
			t.Errorf("%s has the same unit data as %s", name, prev)
		}
		seen[u] = name
	}
	again, _ := DeriveUnitData(r1, "dev-1", 0)
	if again != a {
		t.Error("unit data is not deterministic")
	}
}

func TestChainDirection(t *testing.T) {
	u := UnitData{7}
	// Claims 4-5: K_n is the n-th iterate; the next update uses K_{n-1}, from which K_n
	// (the used key) follows by one step, but not the other way round.
	if Key(u, 0) != ChainKey(u) {
		t.Error("K_0 is not the unit data")
	}
	for _, n := range []uint32{1, 2, 100, 1024} {
		if Step(Key(u, n-1)) != Key(u, n) {
			t.Errorf("Step(K_%d) != K_%d", n-1, n)
		}
		if Key(u, n) == Key(u, n-1) {
			t.Errorf("K_%d == K_%d", n, n-1)
		}
	}
	k := Key(u, 10)
	if k.WrapKey() == k.AckKey() || k.AckKey() == k.ReceiptKey() || [Size]byte(k) == k.WrapKey() {
		t.Error("subkeys are not distinct")
	}
}

func TestDevicePassword(t *testing.T) {
	r, _ := NewRootSecret()
	a := r.BrokerAuth()
	p, err := a.DevicePassword("dev-1")
	if err != nil || len(p) != 43 {
		t.Fatalf("DevicePassword = %q, %v", p, err)
	}
	if !a.CheckDevicePassword("dev-1", []byte(p)) {
		t.Error("own password refused")
	}
	if a.CheckDevicePassword("dev-2", []byte(p)) || a.CheckDevicePassword("dev-1", []byte(p[:42])) {
		t.Error("password accepted for another device or truncated")
	}
	other, _ := NewRootSecret()
	if other.BrokerAuth().CheckDevicePassword("dev-1", []byte(p)) {
		t.Error("password accepted under another root")
	}
}

func TestReleaseIDText(t *testing.T) {
	id, _ := NewReleaseID()
	got, err := ParseReleaseID(id.String())
	if err != nil || got != id {
		t.Fatalf("round trip: %v %v", got, err)
	}
	for _, s := range []string{"", "00", strings.Repeat("g", 32), strings.ToUpper(id.String()), id.String() + "0"} {
		if _, err := ParseReleaseID(s); !errors.Is(err, ErrMalformed) {
			t.Errorf("ParseReleaseID(%q) err = %v", s, err)
		}
	}
}

// fixture is a release encrypted for tests.
type fixture struct {
	pk       [Size]byte
	image    []byte
	chunks   [][]byte // payloads, as chunk topics carry them: C_i and its proof
	cts      [][]byte // C_i alone
	summary  Summary
	manifest []byte
	pub      ed25519.PublicKey
	priv     ed25519.PrivateKey
	id       ReleaseID
	ck       ContentKey
}

func newFixture(t testing.TB, size int, chunkSize uint32) *fixture {
	t.Helper()
	f := &fixture{image: make([]byte, size)}
	rand.Read(f.image)
	f.id, _ = NewReleaseID()
	f.ck, _ = NewContentKey()
	f.pk = f.ck.PayloadKey(f.id)
	var err error
	f.summary, err = EncryptChunks(bytes.NewReader(f.image), int64(size), f.pk, chunkSize, func(_ uint32, c []byte) error {
		f.chunks = append(f.chunks, append([]byte(nil), c...))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	proof := ChunkTreeDepth(f.summary.ChunkCount) * Size
	for _, c := range f.chunks {
		f.cts = append(f.cts, c[:len(c)-proof])
	}
	f.pub, f.priv, _ = ed25519.GenerateKey(nil)
	f.manifest, err = NewManifest(f.id, 3, time.Now(), f.summary).Sign(f.priv)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fixture) stream() []byte { return bytes.Join(f.cts, nil) }

func TestEncryptChunksSizes(t *testing.T) {
	for _, c := range []struct{ size, chunks int }{{0, 1}, {1, 1}, {1024, 1}, {1025, 2}, {4096, 4}, {4097, 5}} {
		f := newFixture(t, c.size, 1024)
		if len(f.chunks) != c.chunks || int(f.summary.ChunkCount) != c.chunks || f.summary.ImageSize != uint64(c.size) {
			t.Errorf("size %d: %d chunks (summary %+v), want %d", c.size, len(f.chunks), f.summary, c.chunks)
		}
		n, _ := ChunkCount(uint64(c.size), 1024)
		if int(n) != c.chunks {
			t.Errorf("ChunkCount(%d) = %d", c.size, n)
		}
		// The stream API produces the same bytes as the chunk API (nonces are deterministic).
		var buf bytes.Buffer
		w, _ := EncryptStream(&buf, f.pk, 1024)
		w.Write(f.image)
		w.Close()
		if !bytes.Equal(buf.Bytes(), f.stream()) {
			t.Errorf("size %d: EncryptStream and EncryptChunks differ", c.size)
		}
		r, _ := DecryptStream(bytes.NewReader(buf.Bytes()), f.pk, 1024)
		got, err := io.ReadAll(r)
		if err != nil || !bytes.Equal(got, f.image) {
			t.Errorf("size %d: DecryptStream = %d bytes, %v", c.size, len(got), err)
		}
	}
	if _, err := ChunkCount(10, 1023); !errors.Is(err, ErrMalformed) {
		t.Error("chunk size 1023 accepted")
	}
	if _, err := ChunkCount(10, MaxChunkSize+1); !errors.Is(err, ErrMalformed) {
		t.Error("chunk size over 1 MiB accepted")
	}
}

// TestStreamAttacks: truncation, reordering, substitution, extra chunks and bit flips
// are all errors, and no plaintext of a bad chunk is released ([SC-4.2]).
func TestStreamAttacks(t *testing.T) {
	f := newFixture(t, 5000, 1024) // 5 chunks
	other := newFixture(t, 5000, 1024)
	cat := func(cs ...[]byte) []byte { return bytes.Join(cs, nil) }
	c := f.cts
	flipped := append([]byte(nil), c[2]...)
	flipped[10] ^= 1
	cases := map[string]struct {
		data []byte
		want error
	}{
		"truncated at chunk boundary": {cat(c[0], c[1], c[2]), ErrTruncated},
		"truncated inside chunk":      {cat(c[0], c[1], c[2][:500]), ErrAuth},
		"last chunk missing tag":      {cat(c[0], c[1], c[2], c[3], c[4][:8]), ErrTruncated},
		"empty":                       {nil, ErrTruncated},
		"reordered":                   {cat(c[0], c[2], c[1], c[3], c[4]), ErrAuth},
		"substituted from other":      {cat(c[0], other.cts[1], c[2], c[3], c[4]), ErrAuth},
		"extra chunk after last":      {cat(c[0], c[1], c[2], c[3], c[4], c[4]), ErrAuth},
		"bit flip":                    {cat(c[0], c[1], flipped, c[3], c[4]), ErrAuth},
		"last chunk dropped":          {cat(c[0], c[1], c[2], c[3]), ErrTruncated},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			r, _ := DecryptStream(bytes.NewReader(tc.data), f.pk, 1024)
			got, err := io.ReadAll(r)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			// What was released is a prefix of the image made only of whole good chunks.
			if len(got)%1024 != 0 || !bytes.Equal(got, f.image[:len(got)]) {
				t.Fatalf("released %d bytes that are not whole authentic chunks", len(got))
			}
		})
	}
	// Trailing garbage after a complete stream is not silently accepted either.
	r, _ := DecryptStream(bytes.NewReader(cat(f.stream(), []byte{1, 2, 3})), f.pk, 1024)
	if _, err := io.ReadAll(r); err == nil {
		t.Error("trailing bytes accepted")
	}
	// Wrong key.
	r, _ = DecryptStream(bytes.NewReader(f.stream()), other.pk, 1024)
	if _, err := io.ReadAll(r); !errors.Is(err, ErrAuth) {
		t.Errorf("wrong key: err = %v", err)
	}
}

func TestImageDecryptor(t *testing.T) {
	f := newFixture(t, 3000, 1024)
	m, err := ParseManifest(f.manifest, f.pub)
	if err != nil {
		t.Fatal(err)
	}
	d := NewImageDecryptor(f.pk, m)
	if _, err := d.Open(nil, 1, f.chunks[1]); err == nil {
		t.Fatal("out-of-order chunk accepted")
	}
	if _, err := d.Open(nil, 0, f.chunks[1]); !errors.Is(err, ErrAuth) {
		t.Fatalf("chunk 1 at index 0: %v", err)
	}
	out, err := d.Open(nil, 0, f.chunks[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Finish(); !errors.Is(err, ErrTruncated) {
		t.Fatalf("Finish after 1 of 3 chunks: %v", err)
	}
	// Save progress, restore into a fresh decryptor (a device restart), finish there.
	state, _ := d.MarshalBinary()
	d2 := NewImageDecryptor(f.pk, m)
	if err := d2.UnmarshalBinary(state); err != nil || d2.Next() != 1 {
		t.Fatalf("restore: next=%d err=%v", d2.Next(), err)
	}
	for i := 1; i < 3; i++ {
		if out, err = d2.Open(out, uint32(i), f.chunks[i]); err != nil {
			t.Fatal(err)
		}
	}
	if err := d2.Finish(); err != nil || !bytes.Equal(out, f.image) {
		t.Fatalf("Finish: %v", err)
	}
	// A manifest signed over other hashes (the signer is honest, the image is not the one
	// signed) fails at Finish even though every chunk authenticates.
	bad := *m
	bad.ImageSHA256[0] ^= 1
	d3 := NewImageDecryptor(f.pk, &bad)
	for i := range f.chunks {
		if _, err := d3.Open(nil, uint32(i), f.chunks[i]); err != nil {
			t.Fatal(err)
		}
	}
	if err := d3.Finish(); !errors.Is(err, ErrAuth) {
		t.Fatalf("hash mismatch: %v", err)
	}
}

func TestManifest(t *testing.T) {
	f := newFixture(t, 3000, 1024)
	m, err := ParseManifest(f.manifest, f.pub)
	if err != nil {
		t.Fatal(err)
	}
	if m.Release != f.id || m.Version != 3 || m.ChunkCount != 3 || m.ImageSize != 3000 || m.ChunksRoot != f.summary.ChunksRoot {
		t.Fatalf("decoded %+v", m)
	}
	for i := range f.manifest {
		b := append([]byte(nil), f.manifest...)
		b[i] ^= 0x80
		if _, err := ParseManifest(b, f.pub); err == nil {
			t.Fatalf("manifest with byte %d flipped accepted", i)
		}
	}
	otherPub, _, _ := ed25519.GenerateKey(nil)
	if _, err := ParseManifest(f.manifest, otherPub); !errors.Is(err, ErrAuth) {
		t.Errorf("other signer: %v", err)
	}
	if _, err := ParseManifest(f.manifest[:179], f.pub); !errors.Is(err, ErrMalformed) {
		t.Errorf("short manifest: %v", err)
	}
	// Signed but inconsistent fields are refused at signing time.
	bad := *m
	bad.ChunkCount = 4
	if _, err := bad.Sign(f.priv); !errors.Is(err, ErrMalformed) {
		t.Errorf("inconsistent chunk count signed: %v", err)
	}
	bad = *m
	bad.Version = 0
	if _, err := bad.Sign(f.priv); !errors.Is(err, ErrMalformed) {
		t.Errorf("version 0 signed: %v", err)
	}
}

func TestKeyMessage(t *testing.T) {
	root, _ := NewRootSecret()
	u, _ := DeriveUnitData(root, "dev-a", 0)
	k := Key(u, 100)
	f := newFixture(t, 10, 1024)
	digest := ManifestDigest(f.manifest)
	hdr := KeyMessage{Kind: KindRelease, Epoch: 0, Seq: 100, ID: f.id, ManifestDigest: digest}
	b, err := SealKeyMessage(hdr, k, "dev-a", f.ck)
	if err != nil || len(b) != KeyMessageReleaseSize {
		t.Fatalf("seal: %d bytes, %v", len(b), err)
	}
	m, err := ParseKeyMessage(b)
	if err != nil {
		t.Fatal(err)
	}
	got, err := m.Open(k, "dev-a")
	if err != nil || ContentKey(got) != f.ck {
		t.Fatalf("open: %v", err)
	}
	if m.Seq != 100 || m.ID != f.id || m.ManifestDigest != digest || m.Kind != KindRelease {
		t.Fatalf("fields %+v", m)
	}
	// Wrong key (another index, another device's chain), wrong serial: ErrAuth.
	uB, _ := DeriveUnitData(root, "dev-b", 0)
	for name, c := range map[string]struct {
		k      ChainKey
		serial string
	}{
		"next index":     {Key(u, 99), "dev-a"},
		"previous index": {Key(u, 101), "dev-a"},
		"other device":   {Key(uB, 100), "dev-a"},
		"other serial":   {k, "dev-b"},
	} {
		if _, err := m.Open(c.k, c.serial); !errors.Is(err, ErrAuth) {
			t.Errorf("%s: %v", name, err)
		}
	}
	// Every byte is bound: flipping any byte breaks the open (or the parse).
	for i := range b {
		x := append([]byte(nil), b...)
		x[i] ^= 0x01
		pm, err := ParseKeyMessage(x)
		if err != nil {
			continue
		}
		if _, err := pm.Open(k, "dev-a"); !errors.Is(err, ErrAuth) {
			t.Fatalf("byte %d flipped: %v", i, err)
		}
	}
	for _, bad := range [][]byte{nil, b[:120], append(append([]byte{}, b...), 0), []byte("SCK2\x09" + strings.Repeat("\x00", 116)), []byte("SCK1\x01" + strings.Repeat("\x00", 116))} {
		if _, err := ParseKeyMessage(bad); !errors.Is(err, ErrMalformed) {
			t.Errorf("malformed %d bytes accepted: %v", len(bad), err)
		}
	}
	// Re-key.
	u1, _ := DeriveUnitData(root, "dev-a", 1)
	t1, _ := RekeySecret(root, "dev-a", 1)
	rb, err := SealKeyMessage(KeyMessage{Kind: KindRekey, Epoch: 0, Seq: 1, NewLength: 2048}, Key(u, 1), "dev-a", t1)
	if err != nil || len(rb) != KeyMessageRekeySize {
		t.Fatalf("rekey: %d bytes %v", len(rb), err)
	}
	rm, _ := ParseKeyMessage(rb)
	next, err := rm.Open(Key(u, 1), "dev-a")
	if err != nil || NextUnitData(u, next) != u1 || rm.NewLength != 2048 {
		t.Fatalf("rekey open: %v", err)
	}
	if _, err := SealKeyMessage(KeyMessage{Kind: KindRekey, Seq: 1, NewLength: 1000}, k, "dev-a", u1); !errors.Is(err, ErrInvalidChainLength) {
		t.Errorf("rekey to length 1000: %v", err)
	}
}

func TestAckAndReceipt(t *testing.T) {
	u := UnitData{3}
	k := Key(u, 50)
	id, _ := NewReleaseID()
	a := Ack{Kind: AckInstalled, Epoch: 2, Seq: 50, ID: id, Version: 9, DeviceSeq: 49}
	b, err := a.Seal(k, "dev-a")
	if err != nil || len(b) != AckSize {
		t.Fatal(err)
	}
	got, err := ParseAck(b)
	if err != nil || got != a {
		t.Fatalf("ParseAck = %+v, %v", got, err)
	}
	if err := VerifyAck(b, k, "dev-a"); err != nil {
		t.Fatal(err)
	}
	// Forged (another key), replayed on another device, or from the previous index: ErrAuth.
	if err := VerifyAck(b, Key(u, 51), "dev-a"); !errors.Is(err, ErrAuth) {
		t.Error("ack verified under the previous release's key")
	}
	if err := VerifyAck(b, k, "dev-b"); !errors.Is(err, ErrAuth) {
		t.Error("ack verified for another serial")
	}
	for i := 0; i < AckSize; i++ {
		x := append([]byte(nil), b...)
		x[i] ^= 1
		if VerifyAck(x, k, "dev-a") == nil {
			t.Fatalf("ack with byte %d flipped verified", i)
		}
	}
	if _, err := (Ack{Kind: AckFailed, Seq: 1}).Seal(k, "dev-a"); !errors.Is(err, ErrMalformed) {
		t.Error("report without code sealed")
	}
	if _, err := (Ack{Kind: AckInstalled, Seq: 1, Code: 3}).Seal(k, "dev-a"); !errors.Is(err, ErrMalformed) {
		t.Error("ack with error code sealed")
	}
	r := ReceiptFor(a, ReceiptAccepted)
	rb, err := r.Seal(k, "dev-a")
	if err != nil || len(rb) != ReceiptSize {
		t.Fatal(err)
	}
	pr, err := ParseReceipt(rb)
	if err != nil || pr != r || !pr.Answers(a) {
		t.Fatalf("ParseReceipt = %+v, %v", pr, err)
	}
	if VerifyReceipt(rb, k, "dev-a") != nil || VerifyReceipt(rb, Key(u, 49), "dev-a") == nil {
		t.Error("receipt MAC check wrong")
	}
	other := a
	other.Seq = 49
	if pr.Answers(other) {
		t.Error("receipt answers another ack")
	}
}

func TestSealSecret(t *testing.T) {
	key := RootSecret{5}.StateSealKey()
	s := [Size]byte{1, 2, 3}
	b, err := SealSecret(key, "release x", s)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(b, s[:3]) {
		t.Error("secret visible in sealed form")
	}
	got, err := OpenSecret(key, "release x", b)
	if err != nil || got != s {
		t.Fatalf("OpenSecret: %v", err)
	}
	if _, err := OpenSecret(key, "release y", b); !errors.Is(err, ErrAuth) {
		t.Error("opened under another context")
	}
	if _, err := OpenSecret(RootSecret{6}.StateSealKey(), "release x", b); !errors.Is(err, ErrAuth) {
		t.Error("opened under another key")
	}
	if _, err := OpenSecret(key, "release x", b[:10]); !errors.Is(err, ErrMalformed) {
		t.Error("short input accepted")
	}
}

// TestRekeyID: re-key ids come from a key of their own, not the AES-GCM state-seal key
// ([SC-3.6]); they are deterministic per serial and epoch and differ otherwise.
func TestRekeyID(t *testing.T) {
	var root RootSecret
	root[0] = 7
	k := root.RekeyIDKey()
	if k == root.StateSealKey() {
		t.Fatal("the re-key id key is the state-seal key")
	}
	a, b := RekeyID(k, "dev-1", 0), RekeyID(k, "dev-1", 0)
	if a != b {
		t.Fatal("RekeyID is not deterministic")
	}
	for _, o := range []ReleaseID{RekeyID(k, "dev-1", 1), RekeyID(k, "dev-2", 0), RekeyID(root.StateSealKey(), "dev-1", 0)} {
		if o == a {
			t.Fatalf("two re-key ids collide: %s", a)
		}
	}
	// HMAC(key, S || be32(e)), first 16 bytes.
	m := hmac.New(sha256.New, k[:])
	m.Write([]byte("dev-1\x00\x00\x00\x00"))
	if !bytes.Equal(m.Sum(nil)[:16], a[:]) {
		t.Fatal("RekeyID is not the first 16 bytes of HMAC(key, S || be32(e))")
	}
}

// TestChunkTree: every target device knows the payload key, so one can encrypt chunks
// that AES-GCM accepts. The chunk tree, signed in the manifest, refuses them before a
// byte is decrypted ([SC-4.3]); a genuine chunk moved to another index, or with a
// damaged proof, is refused too.
func TestChunkTree(t *testing.T) {
	for _, size := range []int{0, 1000, 3000, 5000, 8192} { // 1, 1, 3, 5 and 8 chunks
		f := newFixture(t, size, 1024)
		m, err := ParseManifest(f.manifest, f.pub)
		if err != nil {
			t.Fatal(err)
		}
		n := m.ChunkCount
		depth := ChunkTreeDepth(n)
		for i := range n {
			p := f.chunks[i]
			if len(p) != len(f.cts[i])+depth*Size {
				t.Fatalf("size %d chunk %d: payload %d bytes, want the ciphertext and %d proof hashes", size, i, len(p), depth)
			}
			if ct, err := VerifyChunk(m.ChunksRoot, n, i, p); err != nil || !bytes.Equal(ct, f.cts[i]) {
				t.Fatalf("size %d chunk %d: %v", size, i, err)
			}
			// A co-target's forgery: valid AES-GCM under the payload key, the genuine proof.
			evil := NewChunkCipher(f.pk).Seal(nil, i, i == n-1, bytes.Repeat([]byte{0xee}, len(f.cts[i])-TagSize))
			if bytes.Equal(evil, f.cts[i]) {
				continue // an empty chunk has one possible ciphertext: nothing to forge
			}
			forged := append(evil, p[len(f.cts[i]):]...)
			d := NewImageDecryptor(f.pk, m)
			for j := range i {
				if _, err := d.Open(nil, j, f.chunks[j]); err != nil {
					t.Fatal(err)
				}
			}
			if out, err := d.Open(nil, i, forged); !errors.Is(err, ErrAuth) || out != nil {
				t.Fatalf("size %d chunk %d: a forged chunk opened (%d bytes out, %v)", size, i, len(out), err)
			}
			if depth > 0 {
				bad := append([]byte(nil), p...)
				bad[len(bad)-1] ^= 1
				if _, err := VerifyChunk(m.ChunksRoot, n, i, bad); !errors.Is(err, ErrAuth) {
					t.Fatalf("size %d chunk %d: a damaged proof passed: %v", size, i, err)
				}
				if _, err := VerifyChunk(m.ChunksRoot, n, (i+1)%n, p); !errors.Is(err, ErrAuth) {
					t.Fatalf("size %d chunk %d at index %d passed: %v", size, i, (i+1)%n, err)
				}
			}
		}
		if _, err := VerifyChunk(m.ChunksRoot, n, 0, make([]byte, depth*Size+TagSize-1)); !errors.Is(err, ErrMalformed) {
			t.Fatalf("size %d: a payload too short for a tag and a proof: %v", size, err)
		}
	}
}

// TestKeyStatement: a statement verifies under the key before it and no other, and
// carries the next key exactly ([SC-5.3]).
func TestKeyStatement(t *testing.T) {
	pub0, priv0, _ := ed25519.GenerateKey(nil)
	pub1, priv1, _ := ed25519.GenerateKey(nil)
	b, err := KeyStatement{Seq: 1, Key: pub1}.Sign(priv0)
	if err != nil || len(b) != KeyStatementSize {
		t.Fatalf("%d bytes, %v", len(b), err)
	}
	s, err := ParseKeyStatement(b, pub0)
	if err != nil || s.Seq != 1 || !s.Key.Equal(pub1) {
		t.Fatalf("%+v, %v", s, err)
	}
	if _, err := ParseKeyStatement(b, pub1); !errors.Is(err, ErrAuth) {
		t.Fatalf("verified under the key it names: %v", err)
	}
	if _, err := (KeyStatement{Seq: 0, Key: pub1}).Sign(priv0); !errors.Is(err, ErrMalformed) {
		t.Fatalf("statement 0 signed: %v", err)
	}
	if _, err := ParseKeyStatement(b[:KeyStatementSize-1], pub0); !errors.Is(err, ErrMalformed) {
		t.Fatalf("short statement: %v", err)
	}
	m := &Manifest{Version: 1, ChunkSize: 1024, ChunkCount: 1, KeySeq: 1, Created: time.Unix(1, 0)}
	mb, err := m.Sign(priv1)
	if err != nil {
		t.Fatal(err)
	}
	if seq, ok := ManifestKeySeq(mb); !ok || seq != 1 {
		t.Fatalf("ManifestKeySeq = %d, %v", seq, ok)
	}
	if _, err := ParseManifest(mb, pub0); !errors.Is(err, ErrAuth) {
		t.Fatalf("a key 1 manifest verified under key 0: %v", err)
	}
}
