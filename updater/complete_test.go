package updater_test

import (
	"context"
	"testing"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// TestReleaseCompletesWithPermanentFailures: a release is completed once every target
// installed it or failed permanently (PROTOCOL.md 12.2); a transient failure keeps it
// active until that device installs.
func TestReleaseCompletesWithPermanentFailures(t *testing.T) {
	e := startEnv(t, boltOpener)
	files := e.provision(3)
	a, b, c := connectDevice(t, e.b.URL, files[0]), connectDevice(t, e.b.URL, files[1]), connectDevice(t, e.b.URL, files[2])
	rid := e.release(randomImage(3000), 1)
	status := func(what string, ok func(*protocol.ReleaseStatus) bool) *protocol.ReleaseStatus {
		t.Helper()
		var st *protocol.ReleaseStatus
		eventually(t, what, func() bool {
			var err error
			st, err = e.op.ReleaseStatus(context.Background(), rid)
			return err == nil && ok(st)
		})
		return st
	}
	report := func(d *testDevice, km *keychain.KeyMessage, code protocol.Code) { t.Helper(); d.report(km, code) }

	ackA, kmA, _ := a.install()
	a.publishAck(ackA)
	a.receipt(ackA, keychain.Key(a.u, kmA.Seq))
	kmB, err := keychain.ParseKeyMessage(b.next(b.keys, "key"))
	if err != nil {
		t.Fatal(err)
	}
	report(b, kmB, protocol.CodeRollback)
	ackC, kmC, _ := c.install()
	report(c, kmC, protocol.CodeChunkCorrupt)
	st := status("1 installed, 2 failed", func(st *protocol.ReleaseStatus) bool { return st.Installed == 1 && st.Failed == 2 })
	if st.State != protocol.ReleaseActive {
		t.Fatalf("release %s with a transient failure outstanding; want active", st.State)
	}

	// C retries and installs: every target has now installed or failed permanently.
	c.publishAck(ackC)
	c.receipt(ackC, keychain.Key(c.u, kmC.Seq))
	st = status("completed", func(st *protocol.ReleaseStatus) bool { return st.State == protocol.ReleaseCompleted })
	if st.Installed != 2 || st.Failed != 1 || st.Pending != 0 {
		t.Fatalf("completed release status %+v; want 2 installed, 1 failed, none pending", st)
	}
}
