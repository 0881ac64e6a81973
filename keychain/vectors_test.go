package keychain

import (
	"bytes"
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"flag"
	"os"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite testdata/vectors.json from the implementation")

const vectorsPath = "testdata/vectors.json"

// Vectors is the schema of testdata/vectors.json (PROTOCOL.md 11). Every byte string is
// lowercase hex. Inputs are fixed so that a second implementation can recompute every
// output from this file and PROTOCOL.md alone.
type Vectors struct {
	Comment  string `json:"comment"`
	Root     string `json:"root_secret"`
	Serial   string `json:"serial"`
	UnitData []struct {
		Epoch    uint32 `json:"epoch"`
		UnitData string `json:"unit_data"`
	} `json:"unit_data"`
	Chain []struct {
		N   uint32 `json:"n"`
		Key string `json:"key"`
	} `json:"chain_epoch0"`
	Subkeys struct {
		Epoch      uint32 `json:"epoch"`
		N          uint32 `json:"n"`
		WrapKey    string `json:"wrap_key"`
		AckKey     string `json:"ack_key"`
		ReceiptKey string `json:"receipt_key"`
	} `json:"subkeys"`
	Broker struct {
		AuthKey  string `json:"broker_auth_key"`
		Password string `json:"password"`
	} `json:"broker"`
	Release struct {
		SigningSeed string   `json:"signing_key_seed"`
		PublicKey   string   `json:"release_public_key"`
		ReleaseID   string   `json:"release_id"`
		ContentKey  string   `json:"content_key"`
		PayloadKey  string   `json:"payload_key"`
		Version     uint64   `json:"version"`
		Created     int64    `json:"created"`
		ChunkSize   uint32   `json:"chunk_size"`
		Image       string   `json:"image"`
		Chunks      []string `json:"chunks"`
		ImageSHA256 string   `json:"image_sha256"`
		ChunksRoot  string   `json:"chunks_root"`
		Manifest    string   `json:"manifest"`
		Digest      string   `json:"manifest_digest"`
		EmptyImage  string   `json:"empty_image_chunk"`
	} `json:"release"`
	KeyMessage struct {
		Epoch   uint32 `json:"epoch"`
		Seq     uint32 `json:"seq"`
		Nonce   string `json:"nonce"`
		Secret  string `json:"secret"`
		Message string `json:"message"`
	} `json:"key_message_release"`
	Rekey struct {
		Epoch     uint32 `json:"epoch"`
		Seq       uint32 `json:"seq"`
		RekeyID   string `json:"rekey_id"`
		NewLength uint32 `json:"new_length"`
		Nonce     string `json:"nonce"`
		Secret    string `json:"secret"`
		// NextUnitData is U_{e+1} = HMAC(U_e, "sealcast/v2 rekey" || secret) (3.2).
		NextUnitData string `json:"next_unit_data"`
		Message      string `json:"message"`
	} `json:"key_message_rekey"`
	Ack            ackVector `json:"ack_installed"`
	Report         ackVector `json:"report_failed"`
	ReportStaleKey ackVector `json:"report_stale_key"`
	// ReportUnhealthy: a failed trial (10.5 step 5), the device back on version 6.
	ReportUnhealthy ackVector     `json:"report_unhealthy"`
	AckRekeyed      ackVector     `json:"ack_rekeyed"`
	ReceiptAccepted receiptVector `json:"receipt_accepted"`
	ReceiptRecorded receiptVector `json:"receipt_recorded"`
	// KeyStatement makes the key of NextSeed release key 1, signed by the release key (5.1);
	// RotatedManifest is the release's manifest with key_seq 1, signed by that key.
	KeyStatement struct {
		Seq       uint32 `json:"seq"`
		NextSeed  string `json:"next_key_seed"`
		PublicKey string `json:"next_public_key"`
		Message   string `json:"message"`
	} `json:"key_statement"`
	RotatedManifest string `json:"rotated_manifest"`
	// Prefetch is a prefetch notice (6.4) for the release, at the key message's position.
	Prefetch struct {
		Epoch          uint32 `json:"epoch"`
		Seq            uint32 `json:"seq"`
		ID             string `json:"id"`
		ManifestDigest string `json:"manifest_digest"`
		Jitter         uint32 `json:"jitter"`
		MACKey         string `json:"mac_key"`
		Message        string `json:"message"`
	} `json:"prefetch_notice"`
	// Negative holds messages a decoder must refuse, each with what it must conclude.
	Negative []negativeVector `json:"negative"`
}

// negativeVector is a message a decoder must refuse. Kind says which decoder:
// "key_message" (for the device of the vectors at D = seq, epoch 0), "manifest" (under
// the release public key), "chunk" (chunk Index of the release, after the chunks before
// it), "ack" (at the server, device at (0, seq)), "receipt" (at the device whose
// last_ack is ack_installed) or "key_statement" (at a device holding release key 0). Error is the code the device reports (15.1), or for the
// server's side of an ack the rejection reason, or "ignored" for a receipt.
type negativeVector struct {
	Name    string `json:"name"`
	Kind    string `json:"kind"`
	Index   uint32 `json:"index,omitempty"`
	Message string `json:"message"`
	Error   string `json:"error"`
}

type ackVector struct {
	Kind      byte   `json:"kind"`
	Epoch     uint32 `json:"epoch"`
	Seq       uint32 `json:"seq"`
	ID        string `json:"id"`
	Version   uint64 `json:"version"`
	DeviceSeq uint32 `json:"device_seq"`
	Code      uint16 `json:"code"`
	MACKey    string `json:"mac_key"`
	Message   string `json:"message"`
}

type receiptVector struct {
	Kind    byte   `json:"kind"`
	Epoch   uint32 `json:"epoch"`
	Seq     uint32 `json:"seq"`
	ID      string `json:"id"`
	Status  byte   `json:"status"`
	MACKey  string `json:"mac_key"`
	Message string `json:"message"`
}

func ackVectorOf(t *testing.T, a Ack, k ChainKey, serial string) ackVector {
	t.Helper()
	b, err := a.Seal(k, serial)
	if err != nil {
		t.Fatal(err)
	}
	ak := k.AckKey()
	return ackVector{byte(a.Kind), a.Epoch, a.Seq, a.ID.String(), a.Version, a.DeviceSeq, a.Code, hex.EncodeToString(ak[:]), hex.EncodeToString(b)}
}

func receiptVectorOf(t *testing.T, r Receipt, k ChainKey, serial string) receiptVector {
	t.Helper()
	b, err := r.Seal(k, serial)
	if err != nil {
		t.Fatal(err)
	}
	rk := k.ReceiptKey()
	return receiptVector{byte(r.Kind), r.Epoch, r.Seq, r.ID.String(), byte(r.Status), hex.EncodeToString(rk[:]), hex.EncodeToString(b)}
}

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad hex %q: %v", s, err)
	}
	return b
}

func seqBytes(n int, start byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = start + byte(i)
	}
	return b
}

// makeVectors computes every vector from the fixed inputs.
func makeVectors(t *testing.T) *Vectors {
	t.Helper()
	h := hex.EncodeToString
	v := &Vectors{Comment: "Sealcast protocol v2 test vectors; see docs/PROTOCOL.md section 11. Regenerate: go test ./keychain -run TestVectors -update"}
	var root RootSecret
	copy(root[:], seqBytes(32, 0x00))
	v.Root = h(root[:])
	v.Serial = "sensor-0001"

	for _, e := range []uint32{0, 1, 7} {
		u, err := DeriveUnitData(root, v.Serial, e)
		if err != nil {
			t.Fatal(err)
		}
		v.UnitData = append(v.UnitData, struct {
			Epoch    uint32 `json:"epoch"`
			UnitData string `json:"unit_data"`
		}{e, h(u[:])})
	}
	u0, _ := DeriveUnitData(root, v.Serial, 0)
	for _, n := range []uint32{0, 1, 2, 3, 16, 1000, 1023, 1024} {
		k := Key(u0, n)
		v.Chain = append(v.Chain, struct {
			N   uint32 `json:"n"`
			Key string `json:"key"`
		}{n, h(k[:])})
	}
	const n = 1024
	k := Key(u0, n)
	wk, ak, rk := k.WrapKey(), k.AckKey(), k.ReceiptKey()
	v.Subkeys.N, v.Subkeys.WrapKey, v.Subkeys.AckKey, v.Subkeys.ReceiptKey = n, h(wk[:]), h(ak[:]), h(rk[:])

	a := root.BrokerAuth()
	v.Broker.AuthKey = h(a[:])
	v.Broker.Password, _ = a.DevicePassword(v.Serial)

	r := &v.Release
	seed := seqBytes(32, 0x40)
	priv := ed25519.NewKeyFromSeed(seed)
	r.SigningSeed, r.PublicKey = h(seed), h(priv.Public().(ed25519.PublicKey))
	var id ReleaseID
	copy(id[:], seqBytes(16, 0x80))
	var ck ContentKey
	copy(ck[:], seqBytes(32, 0xa0))
	pk := ck.PayloadKey(id)
	r.ReleaseID, r.ContentKey, r.PayloadKey = h(id[:]), h(ck[:]), h(pk[:])
	r.Version, r.Created, r.ChunkSize = 7, 1764000000, 1024
	image := make([]byte, 2500) // 3 chunks: 1024, 1024, 452
	for i := range image {
		image[i] = byte(i % 251)
	}
	r.Image = h(image)
	sum, err := EncryptChunks(bytes.NewReader(image), int64(len(image)), pk, r.ChunkSize, func(_ uint32, c []byte) error {
		r.Chunks = append(r.Chunks, h(c))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	r.ImageSHA256, r.ChunksRoot = h(sum.ImageSHA256[:]), h(sum.ChunksRoot[:])
	m := NewManifest(id, r.Version, time.Unix(r.Created, 0), sum)
	mb, err := m.Sign(priv)
	if err != nil {
		t.Fatal(err)
	}
	digest := ManifestDigest(mb)
	r.Manifest, r.Digest = h(mb), h(digest[:])
	r.EmptyImage = h(NewChunkCipher(pk).Seal(nil, 0, true, nil))

	var nonce [12]byte
	copy(nonce[:], seqBytes(12, 0xc0))
	km := KeyMessage{Kind: KindRelease, Epoch: 0, Seq: n, ID: id, ManifestDigest: digest}
	kb, err := sealKeyMessage(km, k, v.Serial, ck, nonce)
	if err != nil {
		t.Fatal(err)
	}
	v.KeyMessage.Epoch, v.KeyMessage.Seq, v.KeyMessage.Nonce, v.KeyMessage.Secret, v.KeyMessage.Message = 0, n, h(nonce[:]), h(ck[:]), h(kb)

	var rid ReleaseID
	copy(rid[:], seqBytes(16, 0xd0))
	var nonce2 [12]byte
	copy(nonce2[:], seqBytes(12, 0xe0))
	u1, _ := DeriveUnitData(root, v.Serial, 1)
	t1, _ := RekeySecret(root, v.Serial, 1)
	if NextUnitData(u0, t1) != u1 {
		t.Fatal("U_1 is not NextUnitData(U_0, T_1)")
	}
	rkm := KeyMessage{Kind: KindRekey, Epoch: 0, Seq: 1, ID: rid, NewLength: 1024}
	rb, err := sealKeyMessage(rkm, Key(u0, 1), v.Serial, t1, nonce2)
	if err != nil {
		t.Fatal(err)
	}
	v.Rekey.Epoch, v.Rekey.Seq, v.Rekey.RekeyID, v.Rekey.NewLength, v.Rekey.Nonce, v.Rekey.Secret, v.Rekey.Message = 0, 1, h(rid[:]), 1024, h(nonce2[:]), h(t1[:]), h(rb)
	v.Rekey.NextUnitData = h(u1[:])

	ack := Ack{Kind: AckInstalled, Epoch: 0, Seq: n, ID: id, Version: 7, DeviceSeq: n - 1}
	v.Ack = ackVectorOf(t, ack, k, v.Serial)
	rep := Ack{Kind: AckFailed, Epoch: 0, Seq: n, ID: id, Version: 7, DeviceSeq: n, Code: 5}
	v.Report = ackVectorOf(t, rep, k, v.Serial)
	// A stale_key report (10.1 step 2): the device at D = n-3 answers a key message for n.
	stale := Ack{Kind: AckFailed, Epoch: 0, Seq: n, ID: id, Version: 7, DeviceSeq: n - 3, Code: 8}
	v.ReportStaleKey = ackVectorOf(t, stale, k, v.Serial)
	unhealthy := Ack{Kind: AckFailed, Epoch: 0, Seq: n, ID: id, Version: 6, DeviceSeq: n, Code: 11}
	v.ReportUnhealthy = ackVectorOf(t, unhealthy, k, v.Serial)
	v.AckRekeyed = ackVectorOf(t, Ack{Kind: AckRekeyed, Epoch: 0, Seq: 1, ID: rid, DeviceSeq: 1024}, Key(u0, 1), v.Serial)
	pn := PrefetchNotice{Epoch: 0, Seq: n, ID: id, ManifestDigest: ManifestDigest(mustHex(t, v.Release.Manifest)), Jitter: 600}
	pb, err := pn.Seal(k, v.Serial)
	if err != nil {
		t.Fatal(err)
	}
	pfk := k.PrefetchKey()
	v.Prefetch.Epoch, v.Prefetch.Seq, v.Prefetch.ID, v.Prefetch.ManifestDigest = pn.Epoch, pn.Seq, h(id[:]), h(pn.ManifestDigest[:])
	v.Prefetch.Jitter, v.Prefetch.MACKey, v.Prefetch.Message = pn.Jitter, h(pfk[:]), h(pb)
	v.ReceiptAccepted = receiptVectorOf(t, ReceiptFor(ack, ReceiptAccepted), k, v.Serial)
	v.ReceiptRecorded = receiptVectorOf(t, ReceiptFor(rep, ReceiptRecorded), k, v.Serial)
	next := ed25519.NewKeyFromSeed(seqBytes(32, 0x60))
	st, err := KeyStatement{Seq: 1, Key: next.Public().(ed25519.PublicKey)}.Sign(priv)
	if err != nil {
		t.Fatal(err)
	}
	v.KeyStatement.Seq, v.KeyStatement.NextSeed, v.KeyStatement.PublicKey, v.KeyStatement.Message = 1, h(next.Seed()), h(next.Public().(ed25519.PublicKey)), h(st)
	rotated := *m
	rotated.KeySeq = 1
	rb2, err := rotated.Sign(next)
	if err != nil {
		t.Fatal(err)
	}
	v.RotatedManifest = h(rb2)
	v.Negative = negativeVectors(t, v, priv, pk, m)
	return v
}

// negativeVectors derives from the positive vectors the messages a decoder must refuse.
func negativeVectors(t *testing.T, v *Vectors, priv ed25519.PrivateKey, pk [Size]byte, m *Manifest) []negativeVector {
	t.Helper()
	h := hex.EncodeToString
	flip := func(s string, i int) string {
		b := mustHex(t, s)
		b[i] ^= 1
		return h(b)
	}
	resign := func(mm Manifest) string { // signed by the release key, fields unchecked
		body := mm.body()
		return h(append(body, ed25519.Sign(priv, signedMessage(body))...))
	}
	km := mustHex(t, v.KeyMessage.Message)
	v1 := append([]byte("SCK1"), km[4:]...)
	zeroVersion, badCount := *m, *m
	zeroVersion.Version = 0
	badCount.ChunkCount = 2
	evil := NewChunkCipher(pk).Seal(nil, 1, false, bytes.Repeat([]byte{0xee}, int(v.Release.ChunkSize)))
	genuine := mustHex(t, v.Release.Chunks[1])
	forged := append(evil, genuine[len(evil):]...)
	return []negativeVector{
		{Name: "key message of protocol version 1 (magic SCK1)", Kind: "key_message", Message: h(v1), Error: "bad_message"},
		{Name: "key message one byte short", Kind: "key_message", Message: h(km[:len(km)-1]), Error: "bad_message"},
		{Name: "key message of unknown kind 3", Kind: "key_message", Message: func() string { b := bytes.Clone(km); b[4] = 3; return h(b) }(), Error: "bad_message"},
		{Name: "key message with a flipped bit in sealed", Kind: "key_message", Message: flip(v.KeyMessage.Message, 100), Error: "unwrap_failed"},
		{Name: "key message with a flipped bit in manifest_digest", Kind: "key_message", Message: flip(v.KeyMessage.Message, 40), Error: "unwrap_failed"},
		{Name: "manifest with a flipped signature bit", Kind: "manifest", Message: flip(v.Release.Manifest, 170), Error: "bad_manifest"},
		{Name: "manifest with a flipped version bit", Kind: "manifest", Message: flip(v.Release.Manifest, 27), Error: "bad_manifest"},
		{Name: "manifest one byte short", Kind: "manifest", Message: v.Release.Manifest[:2*(ManifestSize-1)], Error: "bad_manifest"},
		{Name: "manifest claiming key_seq 0, signed by release key 1", Kind: "manifest", Message: func() string {
			mm := *m
			body := mm.body()
			next := ed25519.NewKeyFromSeed(seqBytes(32, 0x60))
			return h(append(body, ed25519.Sign(next, signedMessage(body))...))
		}(), Error: "bad_manifest"},
		{Name: "key statement 1 with a flipped key bit", Kind: "key_statement", Message: flip(v.KeyStatement.Message, 10), Error: "ignored"},
		{Name: "key statement 1 signed by the key it names", Kind: "key_statement", Message: func() string {
			next := ed25519.NewKeyFromSeed(seqBytes(32, 0x60))
			b, _ := KeyStatement{Seq: 1, Key: next.Public().(ed25519.PublicKey)}.Sign(next)
			return h(b)
		}(), Error: "ignored"},
		{Name: "manifest signed with version 0", Kind: "manifest", Message: resign(zeroVersion), Error: "bad_manifest"},
		{Name: "manifest signed with a chunk_count that its sizes contradict", Kind: "manifest", Message: resign(badCount), Error: "bad_manifest"},
		{Name: "chunk 1 with a flipped ciphertext bit", Kind: "chunk", Index: 1, Message: flip(v.Release.Chunks[1], 3), Error: "chunk_corrupt"},
		{Name: "chunk 1 with a flipped proof bit", Kind: "chunk", Index: 1, Message: flip(v.Release.Chunks[1], len(genuine)-1), Error: "chunk_corrupt"},
		{Name: "chunk 1 forged by a co-target (valid AES-GCM, genuine proof)", Kind: "chunk", Index: 1, Message: h(forged), Error: "chunk_corrupt"},
		{Name: "chunk 0 published as chunk 1", Kind: "chunk", Index: 1, Message: v.Release.Chunks[0], Error: "chunk_corrupt"},
		{Name: "ack with a flipped MAC bit", Kind: "ack", Message: flip(v.Ack.Message, 60), Error: "forged"},
		{Name: "ack with a flipped version bit", Kind: "ack", Message: flip(v.Ack.Message, 36), Error: "forged"},
		{Name: "ack of protocol version 1 (magic SCA1)", Kind: "ack", Message: h(append([]byte("SCA1"), mustHex(t, v.Ack.Message)[4:]...)), Error: "malformed"},
		{Name: "receipt with a flipped MAC bit", Kind: "receipt", Message: flip(v.ReceiptAccepted.Message, 61), Error: "ignored"},
		{Name: "receipt with a flipped status bit", Kind: "receipt", Message: flip(v.ReceiptAccepted.Message, 29), Error: "ignored"},
		{Name: "prefetch notice with a flipped MAC bit", Kind: "prefetch_notice", Message: flip(v.Prefetch.Message, 90), Error: "ignored"},
		{Name: "prefetch notice with a flipped jitter bit", Kind: "prefetch_notice", Message: flip(v.Prefetch.Message, 63), Error: "ignored"},
	}
}

// refusal is what the implementation concludes of a negative vector.
func refusal(t *testing.T, v *Vectors, n negativeVector) string {
	t.Helper()
	var root RootSecret
	copy(root[:], mustHex(t, v.Root))
	u0, _ := DeriveUnitData(root, v.Serial, 0)
	k := Key(u0, v.KeyMessage.Seq)
	pub := ed25519.PublicKey(mustHex(t, v.Release.PublicKey))
	b := mustHex(t, n.Message)
	switch n.Kind {
	case "key_message":
		km, err := ParseKeyMessage(b)
		if err != nil {
			return "bad_message"
		}
		if _, err := km.Open(Key(u0, km.Seq), v.Serial); err != nil {
			return "unwrap_failed"
		}
	case "manifest":
		if _, err := ParseManifest(b, pub); err != nil {
			return "bad_manifest"
		}
	case "chunk":
		m, _ := ParseManifest(mustHex(t, v.Release.Manifest), pub)
		var ck ContentKey
		copy(ck[:], mustHex(t, v.Release.ContentKey))
		d := NewImageDecryptor(ck.PayloadKey(m.Release), m)
		for i := range n.Index {
			if _, err := d.Open(nil, i, mustHex(t, v.Release.Chunks[i])); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := d.Open(nil, n.Index, b); err != nil {
			return "chunk_corrupt"
		}
	case "ack":
		if _, err := ParseAck(b); err != nil {
			return "malformed"
		}
		if VerifyAck(b, k, v.Serial) != nil {
			return "forged"
		}
	case "receipt":
		if _, err := ParseReceipt(b); err != nil || VerifyReceipt(b, k, v.Serial) != nil {
			return "ignored"
		}
	case "key_statement":
		if _, err := ParseKeyStatement(b, pub); err != nil {
			return "ignored"
		}
	case "prefetch_notice":
		if _, err := ParsePrefetchNotice(b); err != nil || VerifyPrefetchNotice(b, k, v.Serial) != nil {
			return "ignored"
		}
	}
	return "accepted"
}

// TestVectors checks that the implementation reproduces every vector in the file, and that
// the parsers accept the file's messages and recover its inputs.
func TestVectors(t *testing.T) {
	got := makeVectors(t)
	enc, _ := json.MarshalIndent(got, "", "  ")
	enc = append(enc, '\n')
	if *update {
		if err := os.WriteFile(vectorsPath, enc, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	file, err := os.ReadFile(vectorsPath)
	if err != nil {
		t.Fatalf("%v (generate with: go test ./keychain -run TestVectors -update)", err)
	}
	if !bytes.Equal(file, enc) {
		t.Fatalf("%s differs from what the implementation computes; if the protocol changed on purpose, regenerate it with -update and update PROTOCOL.md", vectorsPath)
	}

	// Now use the file only, through the device-side API.
	var v Vectors
	if err := json.Unmarshal(file, &v); err != nil {
		t.Fatal(err)
	}
	var u0 UnitData
	copy(u0[:], mustHex(t, v.UnitData[0].UnitData))
	k := Key(u0, v.KeyMessage.Seq)
	km, err := ParseKeyMessage(mustHex(t, v.KeyMessage.Message))
	if err != nil {
		t.Fatal(err)
	}
	ck, err := km.Open(k, v.Serial)
	if err != nil {
		t.Fatal(err)
	}
	if hex.EncodeToString(ck[:]) != v.Release.ContentKey {
		t.Fatal("unwrapped content key differs from the vector")
	}
	m, err := ParseManifest(mustHex(t, v.Release.Manifest), ed25519.PublicKey(mustHex(t, v.Release.PublicKey)))
	if err != nil {
		t.Fatal(err)
	}
	if ManifestDigest(mustHex(t, v.Release.Manifest)) != km.ManifestDigest {
		t.Fatal("manifest digest in the key message differs")
	}
	d := NewImageDecryptor(ContentKey(ck).PayloadKey(m.Release), m)
	var image []byte
	for i, c := range v.Release.Chunks {
		if image, err = d.Open(image, uint32(i), mustHex(t, c)); err != nil {
			t.Fatalf("chunk %d: %v", i, err)
		}
	}
	if err := d.Finish(); err != nil || hex.EncodeToString(image) != v.Release.Image {
		t.Fatalf("decrypted image differs (%v)", err)
	}
	rk, err := ParseKeyMessage(mustHex(t, v.Rekey.Message))
	if err != nil {
		t.Fatal(err)
	}
	t1, err := rk.Open(Key(u0, rk.Seq), v.Serial)
	u1 := NextUnitData(u0, t1)
	if err != nil || hex.EncodeToString(u1[:]) != v.UnitData[1].UnitData || v.Rekey.NextUnitData != v.UnitData[1].UnitData {
		t.Fatalf("re-key did not yield U_1 (%v)", err)
	}
	ks, err := ParseKeyStatement(mustHex(t, v.KeyStatement.Message), ed25519.PublicKey(mustHex(t, v.Release.PublicKey)))
	if err != nil || ks.Seq != 1 || hex.EncodeToString(ks.Key) != v.KeyStatement.PublicKey {
		t.Fatalf("key statement: %+v, %v", ks, err)
	}
	if rm, err := ParseManifest(mustHex(t, v.RotatedManifest), ks.Key); err != nil || rm.KeySeq != 1 {
		t.Fatalf("rotated manifest: %+v, %v", rm, err)
	}
	for _, n := range v.Negative {
		if got := refusal(t, &v, n); got != n.Error {
			t.Errorf("negative vector %q: the implementation concludes %s, the file says %s", n.Name, got, n.Error)
		}
	}
	for _, av := range []ackVector{v.Ack, v.Report, v.ReportStaleKey, v.ReportUnhealthy, v.AckRekeyed} {
		b := mustHex(t, av.Message)
		a, err := ParseAck(b)
		if err != nil {
			t.Fatal(err)
		}
		if byte(a.Kind) != av.Kind || a.Seq != av.Seq || a.ID.String() != av.ID || a.Version != av.Version || a.DeviceSeq != av.DeviceSeq || a.Code != av.Code {
			t.Fatalf("ack fields %+v differ from %+v", a, av)
		}
		if err := VerifyAck(b, Key(u0, a.Seq), v.Serial); err != nil {
			t.Fatal(err)
		}
	}
	pb := mustHex(t, v.Prefetch.Message)
	pn, err := ParsePrefetchNotice(pb)
	if err != nil || pn.Epoch != v.Prefetch.Epoch || pn.Seq != v.Prefetch.Seq || hex.EncodeToString(pn.ID[:]) != v.Prefetch.ID ||
		hex.EncodeToString(pn.ManifestDigest[:]) != v.Prefetch.ManifestDigest || pn.Jitter != v.Prefetch.Jitter {
		t.Fatalf("prefetch notice %+v, %v: fields differ from the file", pn, err)
	}
	if err := VerifyPrefetchNotice(pb, Key(u0, pn.Seq), v.Serial); err != nil {
		t.Fatal(err)
	}
	if pk := Key(u0, pn.Seq).PrefetchKey(); hex.EncodeToString(pk[:]) != v.Prefetch.MACKey {
		t.Fatal("prefetch key differs from the file")
	}
	for _, rv := range []receiptVector{v.ReceiptAccepted, v.ReceiptRecorded} {
		b := mustHex(t, rv.Message)
		r, err := ParseReceipt(b)
		if err != nil || byte(r.Status) != rv.Status || r.Seq != rv.Seq {
			t.Fatalf("receipt %+v: %v", r, err)
		}
		if err := VerifyReceipt(b, k, v.Serial); err != nil {
			t.Fatal(err)
		}
	}
}
