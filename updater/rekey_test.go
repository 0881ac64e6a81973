package updater_test

import (
	"testing"

	"github.com/sealcast/sealcast/keychain"
)

// TestRekeyForwardSecrecy: a leaked, already used K_1 opens the recorded re-key message,
// but what it carries does not give the next chain's keys: the next release's key message
// does not open under a chain grown from it. Only a holder of the current unit data gets
// the next unit data ([SC-3.2a]).
func TestRekeyForwardSecrecy(t *testing.T) {
	e := startEnv(t, boltOpener)
	f := e.provision(1)[0]
	d := connectDevice(t, e.b.URL, f)
	for v := uint64(1); d.d > 1; v++ { // releases at 16, 15, ..., 2
		e.release(randomImage(500), v, f.Serial)
		ack, km, _ := d.install()
		d.ackUntilReceipt(ack, keychain.Key(d.u, km.Seq))
	}
	raw := d.next(d.keys, "re-key message")
	km, err := keychain.ParseKeyMessage(raw)
	if err != nil || km.Kind != keychain.KindRekey || km.Seq != 1 {
		t.Fatalf("key message at index 1: %+v, %v", km, err)
	}
	leaked := keychain.Key(d.u, 1) // used, then leaked
	secret, err := km.Open(leaked, f.Serial)
	if err != nil {
		t.Fatal(err)
	}
	next := keychain.NextUnitData(d.u, secret) // what the device computes
	ack, err := keychain.Ack{Kind: keychain.AckRekeyed, Epoch: km.Epoch, Seq: 1, ID: km.ID, DeviceSeq: km.NewLength}.Seal(leaked, f.Serial)
	if err != nil {
		t.Fatal(err)
	}
	d.ackUntilReceipt(ack, leaked)
	d.u, d.d = next, km.NewLength

	e.release(randomImage(500), 100, f.Serial)
	raw = d.next(d.keys, "key message of the new epoch")
	rel, err := keychain.ParseKeyMessage(raw)
	if err != nil || rel.Epoch != 1 || rel.Seq != km.NewLength {
		t.Fatalf("key message %+v, %v; want epoch 1 at %d", rel, err, km.NewLength)
	}
	if _, err := rel.Open(keychain.Key(keychain.UnitData(secret), rel.Seq), f.Serial); err == nil {
		t.Fatal("the secret a leaked K_1 opens gives the keys of the next chain")
	}
	if _, err := rel.Open(keychain.Key(next, rel.Seq), f.Serial); err != nil {
		t.Fatalf("the device's next unit data does not open the new epoch's key message: %v", err)
	}
}
