// Package fleettest plays the updater's part for device tests and the simulator, with
// the keychain package and a real paho client: it provisions devices, encrypts and
// publishes releases, wraps key messages, verifies acks and answers with receipts
// [SC-10.2], in a simplified, in-memory form.
package fleettest

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// Server is the test updater. Its methods are safe for concurrent use.
type Server struct {
	URL     string
	Root    keychain.RootSecret
	SignKey ed25519.PrivateKey
	// KeySeq is SignKey's sequence number (PROTOCOL.md 5.1); Rotate moves it up.
	KeySeq uint32
	Pub    ed25519.PublicKey
	// AnswerAcks makes the server answer valid acks and reports with receipts (true at
	// New).
	AnswerAcks atomic.Bool

	c    mqtt.Client
	mu   sync.Mutex
	devs map[string]*Dev
	// Rejected counts acks whose MAC or position did not verify.
	Rejected atomic.Int64
}

// Dev is the server's view of one device.
type Dev struct {
	Serial        string
	U             keychain.UnitData
	Epoch, C, L   uint32
	Version       uint64
	prevU         keychain.UnitData // of the previous epoch, for the re-key ack at index 1
	lastAccepted  []byte
	lastReceipt   []byte
	Acks          []Received // every valid ack and report, in arrival order
	Confirmations int        // acks that moved the counter
}

// Received is one ack or report that verified.
type Received struct {
	Ack  keychain.Ack
	Raw  []byte
	Time time.Time
}

// New connects the server to the broker at url.
func New(url string) (*Server, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	root, err := keychain.NewRootSecret()
	if err != nil {
		return nil, err
	}
	s := &Server{URL: url, Root: root, SignKey: priv, Pub: pub, devs: map[string]*Dev{}}
	s.AnswerAcks.Store(true)
	var id [6]byte
	rand.Read(id[:])
	o := mqtt.NewClientOptions().AddBroker(url).SetClientID(fmt.Sprintf("updater-%x", id)).
		SetCleanSession(true).SetAutoReconnect(true).SetOrderMatters(false).
		SetMessageChannelDepth(10000)
	s.c = mqtt.NewClient(o)
	if t := s.c.Connect(); !t.WaitTimeout(10*time.Second) || t.Error() != nil {
		return nil, fmt.Errorf("fleettest: connect: %v", t.Error())
	}
	if t := s.c.Subscribe(protocol.AckFilter, 1, s.onAck); !t.WaitTimeout(10*time.Second) || t.Error() != nil {
		return nil, fmt.Errorf("fleettest: subscribe: %v", t.Error())
	}
	return s, nil
}

// Close disconnects.
func (s *Server) Close() { s.c.Disconnect(100) }

// Provision creates a device with chain length l.
func (s *Server) Provision(serial string, l uint32) protocol.DeviceFile {
	u, err := keychain.DeriveUnitData(s.Root, serial, 0)
	if err != nil {
		panic(err)
	}
	pw, _ := s.Root.BrokerAuth().DevicePassword(serial)
	s.mu.Lock()
	s.devs[serial] = &Dev{Serial: serial, U: u, C: l, L: l}
	s.mu.Unlock()
	return protocol.DeviceFile{
		Serial: serial, UnitData: u[:], Seq: l, ChainLength: l, ReleasePublicKey: protocol.HexBytes(s.Pub),
		Broker: protocol.BrokerConfig{URL: s.URL, Username: serial, Password: pw},
	}
}

// Dev returns a copy of the server's view of a device.
func (s *Server) Dev(serial string) Dev {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := *s.devs[serial]
	d.Acks = append([]Received(nil), d.Acks...)
	return d
}

// Release is an encrypted release.
type Release struct {
	ID       keychain.ReleaseID
	CK       keychain.ContentKey
	M        *keychain.Manifest
	Manifest []byte
	Digest   [32]byte
	Chunks   [][]byte // nil when streamed by PublishStream
}

// NewRelease encrypts image (kept in memory) as a release of the given version.
func (s *Server) NewRelease(image []byte, version uint64, chunkSize uint32) *Release {
	r := &Release{}
	r.ID, _ = keychain.NewReleaseID()
	r.CK, _ = keychain.NewContentKey()
	sum, err := keychain.EncryptChunks(bytes.NewReader(image), int64(len(image)), r.CK.PayloadKey(r.ID), chunkSize, func(i uint32, c []byte) error {
		r.Chunks = append(r.Chunks, bytes.Clone(c))
		return nil
	})
	if err != nil {
		panic(err)
	}
	s.sign(r, version, sum)
	return r
}

func (s *Server) sign(r *Release, version uint64, sum keychain.Summary) {
	r.M = keychain.NewManifest(r.ID, version, time.Now(), sum)
	r.M.KeySeq = s.KeySeq
	b, err := r.M.Sign(s.SignKey)
	if err != nil {
		panic(err)
	}
	r.Manifest, r.Digest = b, keychain.ManifestDigest(b)
}

// PublishStream encrypts the image of size bytes in image and publishes each chunk as it
// is made, without keeping the ciphertext, then the manifest: for large images.
func (s *Server) PublishStream(image io.ReaderAt, size int64, version uint64, chunkSize uint32) (*Release, error) {
	r := &Release{}
	r.ID, _ = keychain.NewReleaseID()
	r.CK, _ = keychain.NewContentKey()
	sum, err := keychain.EncryptChunks(image, size, r.CK.PayloadKey(r.ID), chunkSize, func(i uint32, c []byte) error {
		return s.Publish(protocol.ChunkTopic(r.ID, i), bytes.Clone(c), true)
	})
	if err != nil {
		return nil, err
	}
	s.sign(r, version, sum)
	return r, s.Publish(protocol.ManifestTopic(r.ID), r.Manifest, true)
}

// Publish publishes retained or not, QoS 1, and waits for the broker.
func (s *Server) Publish(topic string, payload []byte, retained bool) error {
	t := s.c.Publish(topic, 1, retained, payload)
	if !t.WaitTimeout(30*time.Second) || t.Error() != nil {
		return fmt.Errorf("fleettest: publish %s: %v", topic, t.Error())
	}
	return nil
}

// PublishRelease publishes the manifest and every chunk, retained.
func (s *Server) PublishRelease(r *Release) error {
	for i, c := range r.Chunks {
		if err := s.Publish(protocol.ChunkTopic(r.ID, uint32(i)), c, true); err != nil {
			return err
		}
	}
	return s.Publish(protocol.ManifestTopic(r.ID), r.Manifest, true)
}

// KeyMessage seals a release key message for serial at (e, C), without publishing.
func (s *Server) KeyMessage(r *Release, serial string) []byte {
	s.mu.Lock()
	d := s.devs[serial]
	e, c, u := d.Epoch, d.C, d.U
	s.mu.Unlock()
	km := keychain.KeyMessage{Kind: keychain.KindRelease, Epoch: e, Seq: c, ID: r.ID, ManifestDigest: r.Digest}
	b, err := keychain.SealKeyMessage(km, keychain.Key(u, c), serial, r.CK)
	if err != nil {
		panic(err)
	}
	return b
}

// Notice seals a prefetch notice of the release for serial at (e, C), without publishing.
func (s *Server) Notice(r *Release, serial string, jitter uint32) []byte {
	s.mu.Lock()
	d := s.devs[serial]
	e, c, u := d.Epoch, d.C, d.U
	s.mu.Unlock()
	b, err := keychain.PrefetchNotice{Epoch: e, Seq: c, ID: r.ID, ManifestDigest: r.Digest, Jitter: jitter}.Seal(keychain.Key(u, c), serial)
	if err != nil {
		panic(err)
	}
	return b
}

// Wrap publishes the release's key message for serial at (e, C), retained.
func (s *Server) Wrap(r *Release, serial string) error {
	return s.Publish(protocol.KeyTopic(serial), s.KeyMessage(r, serial), true)
}

// Rekey publishes a re-key message at (e, C) carrying U_{e+1} and length l.
func (s *Server) Rekey(serial string, l uint32) (keychain.ReleaseID, error) {
	s.mu.Lock()
	d := s.devs[serial]
	e, c, u := d.Epoch, d.C, d.U
	s.mu.Unlock()
	next, err := keychain.RekeySecret(s.Root, serial, e+1)
	if err != nil {
		return keychain.ReleaseID{}, err
	}
	id, _ := keychain.NewReleaseID()
	km := keychain.KeyMessage{Kind: keychain.KindRekey, Epoch: e, Seq: c, ID: id, NewLength: l}
	b, err := keychain.SealKeyMessage(km, keychain.Key(u, c), serial, next)
	if err != nil {
		return id, err
	}
	return id, s.Publish(protocol.KeyTopic(serial), b, true)
}

// onAck verifies and answers an ack or report [SC-10.2], on paho's goroutine.
func (s *Server) onAck(_ mqtt.Client, m mqtt.Message) {
	serial, _, ok := protocol.DeviceOf(m.Topic())
	if !ok {
		return
	}
	raw := bytes.Clone(m.Payload())
	a, err := keychain.ParseAck(raw)
	s.mu.Lock()
	d := s.devs[serial]
	if err != nil || d == nil {
		s.mu.Unlock()
		s.Rejected.Add(1)
		return
	}
	var key keychain.ChainKey
	switch {
	case a.Epoch == d.Epoch && (a.Seq == d.C || a.Seq == d.C+1):
		key = keychain.Key(d.U, a.Seq)
	case d.Epoch > 0 && a.Epoch == d.Epoch-1 && a.Seq == 1:
		key = keychain.Key(d.prevU, 1)
	default:
		s.mu.Unlock()
		s.Rejected.Add(1)
		return
	}
	if keychain.VerifyAck(raw, key, serial) != nil {
		s.mu.Unlock()
		s.Rejected.Add(1)
		return
	}
	d.Acks = append(d.Acks, Received{Ack: a, Raw: raw, Time: time.Now()})
	var receipt []byte
	clearKey := false
	switch {
	case bytes.Equal(raw, d.lastAccepted):
		receipt = d.lastReceipt // duplicate
	case a.Kind != keychain.AckFailed && a.Epoch == d.Epoch && a.Seq == d.C:
		if a.Kind == keychain.AckInstalled {
			d.C--
			d.Version = a.Version
		} else {
			next, _ := keychain.DeriveUnitData(s.Root, serial, d.Epoch+1)
			d.prevU, d.U, d.Epoch, d.C, d.L = d.U, next, d.Epoch+1, a.DeviceSeq, a.DeviceSeq
		}
		d.Confirmations++
		receipt, _ = keychain.ReceiptFor(a, keychain.ReceiptAccepted).Seal(key, serial)
		d.lastAccepted, d.lastReceipt = raw, receipt
		clearKey = true
	case a.Kind == keychain.AckFailed && a.Epoch == d.Epoch && a.Seq == d.C:
		receipt, _ = keychain.ReceiptFor(a, keychain.ReceiptRecorded).Seal(key, serial)
	}
	s.mu.Unlock()
	if receipt == nil || !s.AnswerAcks.Load() {
		return
	}
	// Never wait on paho's goroutine.
	if clearKey {
		s.c.Publish(protocol.KeyTopic(serial), 1, true, []byte{})
	}
	s.c.Publish(protocol.ReceiptTopic(serial), 1, true, receipt)
}

// Resend publishes the receipt of the last accepted ack again (after AnswerAcks was off).
func (s *Server) Resend(serial string) error {
	s.mu.Lock()
	r := s.devs[serial].lastReceipt
	s.mu.Unlock()
	if r == nil {
		return fmt.Errorf("fleettest: no receipt for %s", serial)
	}
	return s.Publish(protocol.ReceiptTopic(serial), r, true)
}

// WaitAck waits until a valid ack or report of serial satisfies ok.
func (s *Server) WaitAck(serial string, timeout time.Duration, ok func(keychain.Ack) bool) (Received, error) {
	deadline := time.Now().Add(timeout)
	for {
		s.mu.Lock()
		for _, r := range s.devs[serial].Acks {
			if ok(r.Ack) {
				s.mu.Unlock()
				return r, nil
			}
		}
		s.mu.Unlock()
		if time.Now().After(deadline) {
			return Received{}, fmt.Errorf("fleettest: no matching ack from %s within %v", serial, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Rotate makes a new release key, publishes its key statement retained, signed by the
// current key, and signs later releases with it.
func (s *Server) Rotate() error {
	pub, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		return err
	}
	st, err := keychain.KeyStatement{Seq: s.KeySeq + 1, Key: pub}.Sign(s.SignKey)
	if err != nil {
		return err
	}
	if err := s.Publish(protocol.KeyStatementTopic(s.KeySeq+1), st, true); err != nil {
		return err
	}
	s.SignKey, s.Pub, s.KeySeq = priv, pub, s.KeySeq+1
	return nil
}
