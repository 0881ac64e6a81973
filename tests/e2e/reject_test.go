package e2e_test

import (
	"bytes"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/internal/testkit/brokertest"
	"github.com/sealcast/sealcast/internal/testkit/updatertest"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// rejectEnv is a stack, a device provisioned but not yet running, and watchers on the
// updater's status topics (as the monitor) and the device's receipt topic (as an admin).
type rejectEnv struct {
	e        *updatertest.Env
	d        *dev
	status   *watcher
	receipts *watcher
}

func newRejectEnv(t *testing.T, open updatertest.Opener, serial string) *rejectEnv {
	t.Helper()
	e := updatertest.Start(t, open)
	return &rejectEnv{
		e:        e,
		d:        provision(t, e, 0, serial)[0],
		status:   watch(t, e.Broker, e.Broker.Monitor, protocol.StatusFilter),
		receipts: watch(t, e.Broker, e.Broker.Admin, protocol.ReceiptTopic(serial)),
	}
}

// tamperer publishes retained messages on a release's topics with the updater's account:
// what an attacker holding that account, or a faulty broker, could put there.
type tamperer struct {
	b *brokertest.Env
	w *watcher // an admin subscribed to the topics, to see each publication delivered
}

func newTamperer(t *testing.T, b *brokertest.Env, rid keychain.ReleaseID) *tamperer {
	t.Helper()
	return &tamperer{b: b, w: watch(t, b, b.Admin, protocol.ReleaseFilter(rid))}
}

// retained returns the retained message on topic.
func (tm *tamperer) retained(t *testing.T, topic string) []byte {
	t.Helper()
	var p []byte
	eventually(t, "retained message on "+topic, func() bool { p = tm.w.last(topic); return p != nil })
	return bytes.Clone(p)
}

// set replaces the retained message on topic and returns once the broker has delivered
// the publication to its subscribers: mochi retains a message before it fans it out, so
// a client subscribing in between would get it twice, retained and live.
func (tm *tamperer) set(t *testing.T, topic string, payload []byte) {
	t.Helper()
	if err := tm.publish(topic, payload); err != nil {
		t.Fatal(err)
	}
}

// publish is set without the testing.T, for hooks on other goroutines.
func (tm *tamperer) publish(topic string, payload []byte) error {
	who := tm.b.Updater
	o := mqtt.NewClientOptions().AddBroker(tm.b.URL).SetClientID(fmt.Sprintf("tamper-%p", &payload)).
		SetUsername(who.Username).SetPassword(who.Password).SetCleanSession(true)
	c := mqtt.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(deadline) || tok.Error() != nil {
		return fmt.Errorf("connecting as %s: %v", who.Username, tok.Error())
	}
	defer c.Disconnect(100)
	if tok := c.Publish(topic, 1, true, payload); !tok.WaitTimeout(deadline) || tok.Error() != nil {
		return fmt.Errorf("publishing %s as %s: %v", topic, who.Username, tok.Error())
	}
	for end := time.Now().Add(deadline); !bytes.Equal(tm.w.last(topic), payload); time.Sleep(time.Millisecond) {
		if time.Now().After(end) {
			return fmt.Errorf("the publication on %s was never delivered", topic)
		}
	}
	return nil
}

// rejected checks both sides of a rejected update: the agent reported code once and left
// its vault alone; the updater recorded the report (device status, release status,
// receipt with status recorded) and left the counter alone.
func (re *rejectEnv) rejected(t *testing.T, r *agent, rid keychain.ReleaseID, code protocol.Code) {
	t.Helper()
	d, e := re.d, re.e
	eventually(t, "a report", func() bool { return r.rec.Count(device.EventReportSent) > 0 })
	if got := r.rec.Codes(); !slices.Equal(got, []protocol.Code{code}) {
		t.Fatalf("reports sent with codes %v, want [%v]", got, code)
	}
	if s := d.state(); s.Seq != d.file.Seq || s.Version != d.file.Version || s.LastAck != nil {
		t.Fatalf("a rejected update changed the vault: D=%d v=%d", s.Seq, s.Version)
	}
	ds := re.status.deviceStatus(t, d.serial, "last_result "+code.String(), func(s protocol.DeviceStatus) bool { return s.LastResult == code.String() })
	if ds.State != protocol.DeviceFailed || ds.Seq != d.file.Seq {
		t.Fatalf("device status %+v; want failed at %d", ds, d.file.Seq)
	}
	// A permanent failure settles the release's only target: the release is completed. A
	// transient one keeps it active, for the device retries [SC-12.2].
	want := protocol.ReleaseActive
	if code.Permanent() {
		want = protocol.ReleaseCompleted
	}
	rs := re.status.releaseStatus(t, rid, "one failure, "+string(want), func(s protocol.ReleaseStatus) bool { return s.Failed == 1 && s.State == want })
	if rs.Installed != 0 || rs.Targets != 1 {
		t.Fatalf("release status %+v", rs)
	}
	var u keychain.UnitData
	copy(u[:], d.file.UnitData)
	eventually(t, "a receipt recording the report", func() bool {
		b := re.receipts.last(protocol.ReceiptTopic(d.serial))
		rc, err := keychain.ParseReceipt(b)
		return err == nil && rc.Kind == keychain.AckFailed && rc.Status == keychain.ReceiptRecorded && rc.ID == rid &&
			keychain.VerifyReceipt(b, keychain.Key(u, d.file.Seq), d.serial) == nil
	})
	if got := e.Device(t, d.serial); got.Seq != d.file.Seq || got.Version != 0 {
		t.Fatalf("a report moved the server to %d, version %d", got.Seq, got.Version)
	}
	if st := e.Updater.Stats(); st.ReportsRecorded != 1 || st.AcksAccepted != 0 {
		t.Fatalf("updater stats %+v; want one report, no ack", st)
	}
}

// TestTamperedChunk: a retained chunk overwritten with corrupted bytes fails to open on
// every try; the device reports chunk_corrupt and nothing moves. Once the chunk is
// repaired, the device's next attempt (after a reconnect: chunk_corrupt is transient)
// installs, and the release's failure turns into an install.
func TestTamperedChunk(t *testing.T) {
	for _, s := range updatertest.Stores {
		t.Run(s.Name, func(t *testing.T) {
			re := newRejectEnv(t, s.Open, "tamper-1")
			img := image(6*1024, 7)
			rid := re.e.Release(t, img, 1)
			tm := newTamperer(t, re.e.Broker, rid)
			topic := protocol.ChunkTopic(rid, 2)
			good := tm.retained(t, topic)
			bad := bytes.Clone(good)
			bad[10] ^= 1
			tm.set(t, topic, bad)

			r := re.d.start(nil)
			re.rejected(t, r, rid, protocol.CodeChunkCorrupt)
			if f := r.rec.Fetches(); f[2] != 3 || f[0] != 1 || f[5] != 1 {
				t.Fatalf("chunk fetches %v; want chunk 2 three times, the others (up to the window) once", f)
			}
			if n := r.a.Stats().ChunksBad; n != 3 {
				t.Fatalf("%d chunks failed to open, want 3", n)
			}

			// Repaired; the device reboots and tries the retained key message again.
			tm.set(t, topic, good)
			r.stop(t)
			r2 := re.d.start(nil)
			converged(t, re.e, re.d, 1, 1)
			re.d.checkSlot(img)
			if n := r2.rec.Count(device.EventReportSent); n != 0 {
				t.Fatalf("%d reports after the repair", n)
			}
			rs := re.status.releaseStatus(t, rid, "installed", func(s protocol.ReleaseStatus) bool { return s.Installed == 1 })
			if rs.Failed != 0 || rs.State != protocol.ReleaseCompleted {
				t.Fatalf("release status %+v; the failure should have turned into an install", rs)
			}
			re.status.deviceStatus(t, re.d.serial, "installed", func(s protocol.DeviceStatus) bool {
				return s.LastResult == "ok" && s.Seq == re.d.file.Seq-1
			})
		})
	}
}

// TestTamperedChunkRepairedBeforeRefetch: the corruption affects one delivery only: the
// updater's account re-publishes the correct chunk before the device fetches it again,
// so the device recovers within its tries and never reports.
func TestTamperedChunkRepairedBeforeRefetch(t *testing.T) {
	re := newRejectEnv(t, updatertest.Bolt, "tamper-2")
	img := image(6*1024, 8)
	rid := re.e.Release(t, img, 1)
	tm := newTamperer(t, re.e.Broker, rid)
	topic := protocol.ChunkTopic(rid, 3)
	good := tm.retained(t, topic)
	bad := bytes.Clone(good)
	bad[0] ^= 0xff
	tm.set(t, topic, bad)
	var (
		once     sync.Once
		repaired = make(chan struct{})
	)
	r := re.d.start(func(o *device.Options) {
		rec := o.OnEvent
		o.OnEvent = func(ev device.Event) {
			rec(ev)
			if ev.Kind == device.EventChunkBad && ev.Index == 3 {
				// The agent waits for this hook: the repair is retained before the
				// agent subscribes to the chunk again.
				once.Do(func() {
					if err := tm.publish(topic, good); err != nil {
						t.Error(err)
					}
					close(repaired)
				})
			}
		}
	})
	select {
	case <-repaired:
	case <-time.After(deadline):
		t.Fatal("chunk 3 never failed to open")
	}
	converged(t, re.e, re.d, 1, 1)
	re.d.checkSlot(img)
	f, nbad := r.rec.Fetches(), r.rec.Count(device.EventChunkBad)
	if f[3] != 2 || nbad != 1 || r.rec.Count(device.EventReportSent) != 0 {
		t.Fatalf("chunk 3 fetched %d times, %d bad, %d reports; want 2, 1, 0", f[3], nbad, r.rec.Count(device.EventReportSent))
	}
	for i := uint32(0); i < 6; i++ {
		if i != 3 && f[i] != 1 {
			t.Fatalf("chunk %d fetched %d times, want once", i, f[i])
		}
	}
	waitInstalled(t, re.e, rid, 1)
}

// TestBadManifestSignature: the manifest is re-published with a broken signature. The key
// message binds the digest of the signed manifest, so the device rejects it with
// bad_manifest before trusting any field; nothing moves, and the next release works.
func TestBadManifestSignature(t *testing.T) {
	for _, s := range updatertest.Stores {
		t.Run(s.Name, func(t *testing.T) {
			re := newRejectEnv(t, s.Open, "manifest-1")
			rid := re.e.Release(t, image(3*1024, 9), 1)
			tm := newTamperer(t, re.e.Broker, rid)
			topic := protocol.ManifestTopic(rid)
			m := tm.retained(t, topic)
			m[len(m)-1] ^= 1 // the last byte of the Ed25519 signature
			tm.set(t, topic, m)
			r := re.d.start(nil)
			re.rejected(t, r, rid, protocol.CodeBadManifest)
			if n := r.rec.Count(device.EventChunkFetch); n != 0 {
				t.Fatalf("%d chunks fetched for a rejected manifest", n)
			}
			nextRelease(t, re.e, re.d, 2, 1)
		})
	}
}

// TestDowngrade: a device that already runs version 5 (its vault says so; the server
// never saw it) is offered version 3 and refuses it with rollback, reporting the offered
// version. Nothing moves; version 6 then installs at the same index.
func TestDowngrade(t *testing.T) {
	for _, s := range updatertest.Stores {
		t.Run(s.Name, func(t *testing.T) {
			re := newRejectEnv(t, s.Open, "downgrade-1")
			st := re.d.state()
			st.Version = 5
			if err := re.d.vault.Save(st); err != nil {
				t.Fatal(err)
			}
			re.d.file.Version = 5
			rid := re.e.Release(t, image(2*1024, 10), 3)
			r := re.d.start(nil)
			re.rejected(t, r, rid, protocol.CodeRollback)
			var fail device.Event
			if fs := r.rec.Events(device.EventFailed); len(fs) > 0 {
				fail = fs[len(fs)-1]
			}
			if fail.Version != 3 {
				t.Fatalf("the rollback report names version %d, want 3", fail.Version)
			}
			img := image(2*1024, 11)
			rid6 := re.e.Release(t, img, 6, re.d.serial)
			s := re.d.waitConfirmed(6)
			re.d.checkSlot(img)
			if got := re.e.Device(t, re.d.serial); got.Seq != s.Seq || s.Seq != re.d.file.Seq-1 || got.Version != 6 {
				t.Fatalf("after version 6: device at %d, server at %d version %d", s.Seq, got.Seq, got.Version)
			}
			waitInstalled(t, re.e, rid6, 1)
		})
	}
}
