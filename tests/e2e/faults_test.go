package e2e_test

import (
	"errors"
	"sync"
	"testing"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/internal/testkit/updatertest"
)

// TestDropMidDownloadResumes: four devices, each holding a window of one chunk
// subscription, lose their link after chunk 4 of 12. After the reconnect each fetches
// again only the chunk that was in flight (5), and only if its copy had not made it
// through before the link went down; it installs, and the updater moves its counter once.
func TestDropMidDownloadResumes(t *testing.T) {
	for _, s := range updatertest.Stores {
		t.Run(s.Name, func(t *testing.T) {
			e := updatertest.Start(t, s.Open)
			devs := provision(t, e, 0, "drop-1", "drop-2", "drop-3", "drop-4")
			const chunks, k = 12, 4
			runs := make([]*agent, len(devs))
			for i, d := range devs {
				var once sync.Once
				runs[i] = d.start(func(o *device.Options) {
					o.Window = 1
					o.Faults.DropAfterChunk = func(i uint32) bool {
						hit := false
						if i == k {
							once.Do(func() { hit = true })
						}
						return hit
					}
				})
			}
			img := image(chunks*1024, 3)
			rid := e.Release(t, img, 1)
			refetched := 0
			for i, d := range devs {
				r := runs[i]
				converged(t, e, d, 1, 1)
				d.checkSlot(img)
				if c, dc := r.rec.Count(device.EventConnected), r.rec.Count(device.EventDisconnected); c != 2 || dc != 1 {
					t.Fatalf("%s: connected %d times, lost the connection %d times; want 2 and 1", d.serial, c, dc)
				}
				inFlight := 2
				if r.rec.Before(device.EventChunkReceived, k+1, device.EventDisconnected) {
					inFlight = 1 // chunk k+1 arrived before the link went down
				} else {
					refetched++
				}
				f := r.rec.Fetches()
				for i := uint32(0); i < chunks; i++ {
					want := 1
					if i == k+1 {
						want = inFlight
					}
					if f[i] != want {
						t.Errorf("%s: chunk %d fetched %d times, want %d (fetches per index: %v)", d.serial, i, f[i], want, f)
					}
				}
			}
			t.Logf("%d of %d devices fetched the interrupted chunk again; the others had it before the drop", refetched, len(devs))
			waitInstalled(t, e, rid, len(devs))
			if st := e.Updater.Stats(); st.AcksAccepted != int64(len(devs)) || len(st.AcksRejected) != 0 {
				t.Errorf("updater stats %+v; want %d accepted acks", st, len(devs))
			}
		})
	}
}

// cutVault loses power when the agent writes a state that cut selects: the write does not
// happen and Save fails, so the agent stops as a device whose power went out would.
type cutVault struct {
	device.Vault
	cut func(device.State) bool
}

var errPowerLost = errors.New("power lost while writing the vault")

func (v *cutVault) Save(s device.State) error {
	if v.cut(s) {
		return errPowerLost
	}
	return v.Vault.Save(s)
}

// TestPowerLoss: the device loses power at each step of [SC-10.1] that matters, restarts
// on the same vault and slots, and meets the updater again: the counter moved exactly
// once, and the next release works.
func TestPowerLoss(t *testing.T) {
	for _, s := range updatertest.Stores {
		t.Run(s.Name, func(t *testing.T) {
			t.Run("before_persist", func(t *testing.T) { powerLossBeforePersist(t, s.Open) })
			t.Run("before_ack", func(t *testing.T) { powerLossBeforeAck(t, s.Open) })
			t.Run("before_receipt", func(t *testing.T) { powerLossBeforeReceipt(t, s.Open) })
		})
	}
}

// powerLossBeforePersist: installed, but D not yet written. The retained key message is
// delivered again after the reboot and the update is redone.
func powerLossBeforePersist(t *testing.T, open updatertest.Opener) {
	e := updatertest.Start(t, open)
	d := provision(t, e, 0, "pl-persist")[0]
	r0 := d.start(func(o *device.Options) { o.Faults.CrashAfterInstall = true })
	img := image(5*1024, 4)
	rid := e.Release(t, img, 1)
	if err := r0.wait(t); !errors.Is(err, device.ErrCrashed) {
		t.Fatalf("Run = %v, want ErrCrashed", err)
	}
	if s := d.state(); s.Seq != d.file.Seq || s.Version != 0 || s.LastAck != nil {
		t.Fatalf("the crash before persist changed the vault: D=%d v=%d", s.Seq, s.Version)
	}
	if ds, cs := between(t, e, d); ds != cs {
		t.Fatalf("device at %d, server at %d; nothing was acked", ds, cs)
	}
	r1 := d.start(nil)
	converged(t, e, d, 1, 1)
	d.checkSlot(img)
	if n := r1.rec.Count(device.EventCommitted); n != 1 {
		t.Fatalf("after the reboot the update was committed %d times, want 1 (redone)", n)
	}
	waitInstalled(t, e, rid, 1)
	nextRelease(t, e, d, 2, 2)
}

// powerLossBeforeAck: D = n-1 and the ack are written, the ack never left. The agent
// re-sends it at the next connection; nothing is installed again.
func powerLossBeforeAck(t *testing.T, open updatertest.Opener) {
	e := updatertest.Start(t, open)
	d := provision(t, e, 0, "pl-ack")[0]
	r0 := d.start(func(o *device.Options) { o.Faults.CrashAfterPersist = true })
	img := image(5*1024, 5)
	e.Release(t, img, 1)
	if err := r0.wait(t); !errors.Is(err, device.ErrCrashed) {
		t.Fatalf("Run = %v, want ErrCrashed", err)
	}
	s := d.state()
	if s.Seq != d.file.Seq-1 || s.LastAck == nil || s.LastAckConfirmed {
		t.Fatalf("after persist: D=%d ack=%v confirmed=%v", s.Seq, s.LastAck != nil, s.LastAckConfirmed)
	}
	if ds, cs := between(t, e, d); cs != ds+1 {
		t.Fatalf("device at %d, server at %d; want the server one behind", ds, cs)
	}
	if n := e.Updater.Stats().AcksAccepted; n != 0 {
		t.Fatalf("the updater accepted %d acks from a device that crashed before sending one", n)
	}
	r1 := d.start(nil)
	converged(t, e, d, 1, 1)
	if n := r1.rec.Count(device.EventCommitted); n != 0 {
		t.Fatalf("the image was installed again (%d); only the ack should be re-sent", n)
	}
	d.checkSlot(img)
	if st := e.Updater.Stats(); st.AcksAccepted != 1 {
		t.Fatalf("updater stats %+v; want one accepted ack", st)
	}
	nextRelease(t, e, d, 2, 2)
}

// powerLossBeforeReceipt: the ack reached the updater, which moved the counter and
// published its receipt, but the power went out before the device recorded the receipt.
// After the reboot the device re-sends the ack, the updater treats it as a duplicate
// (the counter does not move again) and the retained receipt confirms it.
func powerLossBeforeReceipt(t *testing.T, open updatertest.Opener) {
	e := updatertest.Start(t, open)
	d := provision(t, e, 0, "pl-receipt")[0]
	cut := &cutVault{Vault: d.vault, cut: func(s device.State) bool { return s.LastAckConfirmed }}
	r0 := d.start(func(o *device.Options) { o.Vault = cut })
	img := image(5*1024, 6)
	e.Release(t, img, 1)
	if err := r0.wait(t); !errors.Is(err, errPowerLost) {
		t.Fatalf("Run = %v, want the power loss", err)
	}
	if r0.rec.Count(device.EventAckSent) == 0 {
		t.Fatal("no ack was sent before the power loss")
	}
	s := d.state()
	if s.Seq != d.file.Seq-1 || s.LastAck == nil || s.LastAckConfirmed {
		t.Fatalf("after the power loss: D=%d ack=%v confirmed=%v", s.Seq, s.LastAck != nil, s.LastAckConfirmed)
	}
	// The receipt was on its way: the updater has moved already.
	if ds, cs := between(t, e, d); cs != ds {
		t.Fatalf("device at %d, server at %d; want the server to have moved", ds, cs)
	}
	dup := e.Updater.Stats().AcksDuplicate
	r1 := d.start(nil)
	converged(t, e, d, 1, 1)
	eventually(t, "the re-sent ack answered as a duplicate", func() bool { return e.Updater.Stats().AcksDuplicate > dup })
	if n := r1.rec.Count(device.EventCommitted); n != 0 {
		t.Fatalf("the image was installed again (%d)", n)
	}
	if st := e.Updater.Stats(); st.AcksAccepted != 1 || len(st.AcksRejected) != 0 {
		t.Fatalf("updater stats %+v; want one accepted ack", st)
	}
	nextRelease(t, e, d, 2, 2)
}
