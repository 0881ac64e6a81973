package updater_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// TestPauseResumeCancelWhileRunning hammers pause, resume and cancel while a fan-out runs
// and devices install and ack. Run under the race detector (scripts/test.sh does): admin
// commands, the fan-out and the ack workers all read the in-memory releases. Every device
// that acked moved its counter exactly once, and every command either worked or was
// refused with conflict.
func TestPauseResumeCancelWhileRunning(t *testing.T) {
	e := startEnv(t, boltOpener)
	files := e.provision(400)
	serials := make([]string, len(files))
	for i, f := range files {
		serials[i] = f.Serial
	}
	img := randomImage(5000)
	devs := make([]*testDevice, 100)
	for i := range devs {
		devs[i] = connectDevice(t, e.b.URL, files[i])
	}
	rid := e.release(img, 1) // to all 400: a fan-out to run while the commands come

	var wg sync.WaitGroup
	for _, d := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ack, km, _ := d.install()
			d.publishAck(ack)
			d.receipt(ack, keychain.Key(d.u, km.Seq))
		}()
	}

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	do := func(cmd string, id keychain.ReleaseID) {
		err := e.op.Do(ctx, cmd, protocol.ReleaseArgs{Release: id}, nil)
		var pe *protocol.Error
		if err != nil && !(errors.As(err, &pe) && pe.Code == protocol.ErrConflict) {
			t.Errorf("%s %s: %v", cmd, id, err)
		}
	}
	for range 40 {
		do(protocol.CmdReleasePause, rid)
		do(protocol.CmdReleaseResume, rid)
	}
	for v := uint64(2); v <= 4; v++ {
		other := e.release(img, v, serials[len(devs):]...) // devices that are not connected
		do(protocol.CmdReleasePause, other)
		do(protocol.CmdReleaseResume, other)
		do(protocol.CmdReleaseCancel, other)
	}
	do(protocol.CmdReleaseResume, rid) // conflict if it is active, as it should be
	wg.Wait()

	for _, d := range devs {
		if got := e.device(d.file.Serial); got.Seq != d.file.Seq-1 || got.Version != 1 {
			t.Errorf("%s: counter %d, version %d; want %d, 1", d.file.Serial, got.Seq, got.Version, d.file.Seq-1)
		}
	}
	if st := e.u.Stats(); st.AcksAccepted != int64(len(devs)) {
		t.Errorf("acks accepted %d, want %d", st.AcksAccepted, len(devs))
	}
}
