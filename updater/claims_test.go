package updater_test

import (
	"context"
	"testing"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// TestServerDecidesVersion: a device's authenticated ack that claims a version above the
// release it installed (a firmware bug, or a compromised device) does not make the server
// believe it: the server records the release's version, and the next release is wrapped
// for the device as for any other ([SC-10.2b]).
func TestServerDecidesVersion(t *testing.T) {
	e := startEnv(t, boltOpener)
	f := e.provision(1)[0]
	d := connectDevice(t, e.b.URL, f)
	e.release(randomImage(2000), 1)
	_, km, _ := d.install()
	k := keychain.Key(d.u, km.Seq)
	lying, err := keychain.Ack{Kind: keychain.AckInstalled, Epoch: km.Epoch, Seq: km.Seq, ID: km.ID, Version: 999_999, DeviceSeq: km.Seq - 1}.Seal(k, f.Serial)
	if err != nil {
		t.Fatal(err)
	}
	if r := d.ackUntilReceipt(lying, k); r.Status != keychain.ReceiptAccepted {
		t.Fatalf("receipt status %d, want accepted (the MAC proves the install)", r.Status)
	}
	if got := e.device(f.Serial); got.Version != 1 || got.Seq != km.Seq-1 {
		t.Fatalf("the server recorded version %d at %d; want the release's version 1 at %d", got.Version, got.Seq, km.Seq-1)
	}
	if n := e.u.Stats().VersionClaims; n != 1 {
		t.Fatalf("%d version claims counted, want 1", n)
	}
	rel2 := e.release(randomImage(2000), 2)
	ack2, km2, _ := d.install()
	if km2.ID != rel2 {
		t.Fatalf("the device was offered %s, want release 2 (%s)", km2.ID, rel2)
	}
	d.ackUntilReceipt(ack2, keychain.Key(d.u, km2.Seq))
	if got := e.device(f.Serial); got.Version != 2 {
		t.Fatalf("version %d after release 2, want 2", got.Version)
	}
}

// TestStaleKeyReportCannotRaiseVersion: a stale_key report that moves the counter down
// ([SC-10.2] 4) raises the recorded version at most to the highest version released to
// the device, however high the report's version ([SC-10.2c]); the next release still
// reaches it.
func TestStaleKeyReportCannotRaiseVersion(t *testing.T) {
	e := startEnv(t, boltOpener)
	f := e.provision(1)[0]
	d := connectDevice(t, e.b.URL, f)
	rel1 := e.release(randomImage(2000), 1)
	raw := d.next(d.keys, "key message")
	km, err := keychain.ParseKeyMessage(raw)
	if err != nil || km.ID != rel1 {
		t.Fatalf("key message %v, %v", km, err)
	}
	k := keychain.Key(d.u, km.Seq)
	report, err := keychain.Ack{Kind: keychain.AckFailed, Epoch: km.Epoch, Seq: km.Seq, ID: km.ID, Version: ^uint64(0), DeviceSeq: km.Seq - 5, Code: uint16(protocol.CodeStaleKey)}.Seal(k, f.Serial)
	if err != nil {
		t.Fatal(err)
	}
	d.publishAck(report)
	d.receipt(report, k)
	eventually(t, "the counter moved down to the report's index", func() bool { return e.device(f.Serial).Seq == km.Seq-5 })
	if got := e.device(f.Serial); got.Version != 1 {
		t.Fatalf("the server recorded version %d; want 1, the highest it released to the device", got.Version)
	}
	if n := e.u.Stats().VersionClaims; n != 1 {
		t.Fatalf("%d version claims counted, want 1", n)
	}
	d.d = km.Seq - 5
	rel2 := e.release(randomImage(2000), 2)
	ack2, km2, _ := d.install()
	if km2.ID != rel2 || km2.Seq != km.Seq-5 {
		t.Fatalf("the device was offered %s at %d, want release 2 at %d", km2.ID, km2.Seq, km.Seq-5)
	}
	d.ackUntilReceipt(ack2, keychain.Key(d.u, km2.Seq))
	eventually(t, "release 2 counted as installed", func() bool {
		st, err := e.op.ReleaseStatus(context.Background(), rel2)
		return err == nil && st.Installed == 1
	})
}
