package updater_test

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater"
	"github.com/sealcast/sealcast/updater/mqttbus"
)

// withoutAcks is a Bus that never subscribes to acks: the updater using it sees none.
type withoutAcks struct{ updater.Bus }

func (b withoutAcks) Subscribe(ctx context.Context, filter string, h func(string, []byte)) error {
	if strings.HasSuffix(filter, protocol.AckFilter) {
		return nil
	}
	return b.Bus.Subscribe(ctx, filter, h)
}

// TestReleaseCompletesOnAcksOfAnotherUpdater: with two updaters in one ack group, the
// broker may hand every ack of a release to the acks-only one. The updater that runs the
// release must still see that all targets installed and complete it. Here the first
// updater's bus drops its ack subscription, so all acks go to the second.
func TestReleaseCompletesOnAcksOfAnotherUpdater(t *testing.T) {
	e := startEnv(t, boltOpener, func(o *updater.Options) {
		o.AckGroup = "g"
		o.Bus = withoutAcks{o.Bus}
	})
	ctx, cancel := context.WithCancel(context.Background())
	bus, err := mqttbus.Dial(ctx, mqttbus.Options{URL: e.b.URL, ClientID: "acks-only", Username: e.b.Updater.Username, Password: e.b.Updater.Password})
	if err != nil {
		t.Fatal(err)
	}
	acksOnly, err := updater.New(updater.Options{
		Root: e.b.Root, SigningKey: e.signer, Store: e.store, Bus: bus, AckGroup: "g", AcksOnly: true,
		ChainLength: 16, Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel),
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); acksOnly.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done; bus.Close() })

	files := e.provision(3)
	devs := make([]*testDevice, len(files))
	for i, f := range files {
		devs[i] = connectDevice(t, e.b.URL, f)
	}
	// Watch the release's status topic: the acks are sent only after the updater running
	// the release has published what its fan-out did, so nothing it did itself is left to
	// make it look at the release again.
	wrapped := make(chan struct{})
	wctx, stopWatch := context.WithCancel(context.Background())
	defer stopWatch()
	var once sync.Once
	rid := e.release(randomImage(3000), 1)
	go e.op.Watch(wctx, []string{protocol.ReleaseStatusTopic(rid)}, func(_ string, b []byte) {
		var st protocol.ReleaseStatus
		if json.Unmarshal(b, &st) == nil && st.Wrapped == 3 && st.Installed == 0 {
			once.Do(func() { close(wrapped) })
		}
	})
	acks := make([][]byte, len(devs))
	keys := make([]keychain.ChainKey, len(devs))
	for i, d := range devs {
		ack, km, _ := d.install()
		acks[i], keys[i] = ack, keychain.Key(d.u, km.Seq)
	}
	select {
	case <-wrapped:
	case <-time.After(30 * time.Second):
		t.Fatal("no release status with 3 keys wrapped")
	}
	for i, d := range devs {
		d.ackUntilReceipt(acks[i], keys[i])
	}
	if a, b := e.u.Stats().AcksAccepted, acksOnly.Stats().AcksAccepted; a != 0 || b != 3 {
		t.Fatalf("acks accepted: %d by the release's updater, %d by the acks-only one; want 0 and 3", a, b)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, err := e.op.ReleaseStatus(context.Background(), rid)
		if err == nil && st.State == protocol.ReleaseCompleted && st.Installed == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("release not completed 30 s after every target installed: %+v (%v)", st, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestAcksOnlyUpdaterOffersNewerRelease: a device acks release 1 to the acks-only
// updater just after release 2 was created and wrapped for it at the same index, before
// the acks-only updater refreshed its view of the releases (every hour, here). The
// device must still be offered release 2 at its next index: the acks-only updater reads
// the releases again before it clears a key topic (it used to clear it, and the device
// was stranded on release 1).
func TestAcksOnlyUpdaterOffersNewerRelease(t *testing.T) {
	e := startEnv(t, boltOpener, func(o *updater.Options) {
		o.AckGroup = "g"
		o.Bus = withoutAcks{o.Bus}
	})
	ctx, cancel := context.WithCancel(context.Background())
	bus, err := mqttbus.Dial(ctx, mqttbus.Options{URL: e.b.URL, ClientID: "acks-only", Username: e.b.Updater.Username, Password: e.b.Updater.Password})
	if err != nil {
		t.Fatal(err)
	}
	acksOnly, err := updater.New(updater.Options{
		Root: e.b.Root, SigningKey: e.signer, Store: e.store, Bus: bus, AckGroup: "g", AcksOnly: true,
		ChainLength: 16, RefreshInterval: time.Hour, Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel),
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); acksOnly.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done; bus.Close() })
	<-acksOnly.Ready() // its view of the releases: none

	f := e.provision(1)[0]
	d := connectDevice(t, e.b.URL, f)
	e.release(randomImage(3000), 1)
	ack1, km1, _ := d.install()
	rid2 := e.release(randomImage(3000), 2)
	// The device installed release 1 (its ack not yet sent); release 2 is wrapped at the
	// same index.
	if km, err := keychain.ParseKeyMessage(d.next(d.keys, "release 2 key")); err != nil || km.ID != rid2 || km.Seq != f.Seq {
		t.Fatalf("want release 2's key at %d, got %+v (%v)", f.Seq, km, err)
	}
	d.ackUntilReceipt(ack1, keychain.Key(d.u, km1.Seq))
	// Release 2 again, at the next index.
	ack2, km2, _ := d.install()
	if km2.ID != rid2 || km2.Seq != f.Seq-1 {
		t.Fatalf("got %s at %d, want release 2 at %d", km2.ID, km2.Seq, f.Seq-1)
	}
	d.ackUntilReceipt(ack2, keychain.Key(d.u, km2.Seq))
}
