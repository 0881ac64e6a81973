package updater_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/sealcast/sealcast/internal/testkit/redistest"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater"
)

func randomImage(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

var stores = map[string]storeOpener{"bolt": boltOpener, "redis": redisOpener}

// TestReleaseToFleet: a release to 50 devices over MQTT; every device installs the image
// and ends at n-1; a second release uses key n-1, which differs from key n (claims 3-5).
func TestReleaseToFleet(t *testing.T) {
	for name, open := range stores {
		t.Run(name, func(t *testing.T) {
			e := startEnv(t, open)
			files := e.provision(50)
			img1, img2 := randomImage(10_000), randomImage(9_000)
			devs := make([]*testDevice, len(files))
			for i, f := range files {
				devs[i] = connectDevice(t, e.b.URL, f)
			}
			rid := e.release(img1, 1)
			var wg sync.WaitGroup
			seqs := make([]uint32, len(devs))
			for i, d := range devs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					ack, km, image := d.install()
					if !bytes.Equal(image, img1) {
						t.Errorf("%s: image differs", d.file.Serial)
					}
					seqs[i] = km.Seq
					d.publishAck(ack)
					d.receipt(ack, keychain.Key(d.u, km.Seq))
				}()
			}
			wg.Wait()
			for i, f := range files {
				got := e.device(f.Serial)
				if seqs[i] != f.Seq || got.Seq != f.Seq-1 || got.Version != 1 {
					t.Fatalf("%s: key at %d, counter %d, version %d; want key at %d, counter %d", f.Serial, seqs[i], got.Seq, got.Version, f.Seq, f.Seq-1)
				}
			}
			eventually(t, "release 1 completed", func() bool {
				st, err := e.op.ReleaseStatus(context.Background(), rid)
				return err == nil && st.State == protocol.ReleaseCompleted && st.Installed == 50 && st.Targets == 50
			})

			e.release(img2, 2)
			for _, d := range devs[:5] {
				ack, km, image := d.install()
				if km.Seq != d.file.Seq-1 || !bytes.Equal(image, img2) {
					t.Fatalf("second release at %d, want %d", km.Seq, d.file.Seq-1)
				}
				if keychain.Key(d.u, km.Seq) == keychain.Key(d.u, km.Seq+1) {
					t.Fatal("second release used the same key")
				}
				d.publishAck(ack)
				d.receipt(ack, keychain.Key(d.u, km.Seq))
				if got := e.device(d.file.Serial); got.Seq != d.file.Seq-2 || got.Version != 2 {
					t.Fatalf("after release 2: counter %d version %d", got.Seq, got.Version)
				}
			}
			if s := e.u.Stats(); s.AcksAccepted != 55 || len(s.AcksRejected) != 0 {
				t.Errorf("stats %+v", s)
			}
		})
	}
}

// TestForgedAndReplayedAcks: a forged ack, another device's ack, an ack replayed from the
// previous release and a duplicate change nothing; the one legitimate ack moves the
// counter once.
func TestForgedAndReplayedAcks(t *testing.T) {
	for name, open := range stores {
		t.Run(name, func(t *testing.T) {
			e := startEnv(t, open)
			files := e.provision(2)
			a, b := connectDevice(t, e.b.URL, files[0]), connectDevice(t, e.b.URL, files[1])
			e.release(randomImage(5000), 1)
			ackA, kmA, _ := a.install()
			ackB, _, _ := b.install()
			n := files[0].Seq

			// Forged: the right fields, a MAC under a key the device never had.
			var badKey keychain.ChainKey
			rand.Read(badKey[:])
			forged, _ := keychain.Ack{Kind: keychain.AckInstalled, Epoch: 0, Seq: n, ID: kmA.ID, Version: 1, DeviceSeq: n - 1}.Seal(badKey, a.file.Serial)
			a.publishAck(forged)
			// Another device's valid ack, sent by device A on its own topic.
			a.publishAck(ackB)
			// An ack at an invented position with a valid MAC for that position.
			ahead, _ := keychain.Ack{Kind: keychain.AckInstalled, Epoch: 0, Seq: n - 5, ID: kmA.ID, Version: 1, DeviceSeq: n - 6}.Seal(keychain.Key(a.u, n-5), a.file.Serial)
			a.publishAck(ahead)
			// Garbage.
			a.publishAck([]byte("not an ack"))
			eventually(t, "4 rejections", func() bool {
				s := e.u.Stats()
				return s.AcksRejected["forged"] == 2 && s.AcksRejected["stale"] == 1 && s.AcksRejected["malformed"] == 1
			})
			if got := e.device(a.file.Serial); got.Seq != n {
				t.Fatalf("counter moved to %d by rejected acks", got.Seq)
			}

			// The legitimate ack, twice: one advance, one duplicate, same receipt.
			a.publishAck(ackA)
			a.receipt(ackA, keychain.Key(a.u, n))
			a.publishAck(ackA)
			eventually(t, "duplicate counted", func() bool { return e.u.Stats().AcksDuplicate == 1 })
			if got := e.device(a.file.Serial); got.Seq != n-1 {
				t.Fatalf("counter %d after one ack and a duplicate, want %d", got.Seq, n-1)
			}

			// Release 2: the ack of release 1, replayed, does not move the counter again.
			e.release(randomImage(5000), 2, a.file.Serial)
			ack2, km2, _ := a.install()
			a.publishAck(ackA)
			eventually(t, "replay answered as a duplicate", func() bool { return e.u.Stats().AcksDuplicate == 2 })
			if got := e.device(a.file.Serial); got.Seq != n-1 {
				t.Fatalf("replayed ack moved the counter to %d", got.Seq)
			}
			a.publishAck(ack2)
			a.receipt(ack2, keychain.Key(a.u, km2.Seq))
			if got := e.device(a.file.Serial); got.Seq != n-2 || got.Version != 2 {
				t.Fatalf("counter %d version %d, want %d and 2", got.Seq, got.Version, n-2)
			}
			// Device B was never acked: untouched.
			if got := e.device(b.file.Serial); got.Seq != n {
				t.Fatalf("device B counter %d", got.Seq)
			}
		})
	}
}

// TestFailureReport: a report is recorded with its code and receipt, and the counter
// does not move.
func TestFailureReport(t *testing.T) {
	e := startEnv(t, boltOpener)
	f := e.provision(1)[0]
	d := connectDevice(t, e.b.URL, f)
	rid := e.release(randomImage(3000), 1)
	raw := d.next(d.keys, "key")
	km, _ := keychain.ParseKeyMessage(raw)
	k := keychain.Key(d.u, km.Seq)
	rep, _ := keychain.Ack{Kind: keychain.AckFailed, Epoch: km.Epoch, Seq: km.Seq, ID: km.ID, Version: 1, DeviceSeq: km.Seq, Code: uint16(protocol.CodeInstallFailed)}.Seal(k, f.Serial)
	d.publishAck(rep)
	if r := d.receipt(rep, k); r.Status != keychain.ReceiptRecorded {
		t.Fatalf("receipt status %d", r.Status)
	}
	if got := e.device(f.Serial); got.Seq != f.Seq {
		t.Fatalf("report moved the counter to %d", got.Seq)
	}
	eventually(t, "failure counted", func() bool {
		st, err := e.op.ReleaseStatus(context.Background(), rid)
		return err == nil && st.Failed == 1 && st.Installed == 0
	})

	// The device's history (device.get, 13.4): newest first, with what it did.
	history := func() []string {
		t.Helper()
		var st protocol.DeviceStatus
		if err := e.op.Do(context.Background(), protocol.CmdDeviceGet, protocol.SerialArgs{Serial: f.Serial}, &st); err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, h := range st.History {
			out = append(out, fmt.Sprintf("v%d %s %s", h.Version, h.Result, h.Code))
		}
		return out
	}
	if got, want := history(), []string{"v1 failed install_failed"}; !slices.Equal(got, want) {
		t.Fatalf("history %q, want %q", got, want)
	}
	e.release(randomImage(3000), 2)
	eventually(t, "release 2 pending", func() bool {
		return slices.Equal(history(), []string{"v2 pending ", "v1 failed install_failed"})
	})
	ack, km2, _ := d.install()
	d.publishAck(ack)
	d.receipt(ack, keychain.Key(d.u, km2.Seq))
	eventually(t, "release 2 installed", func() bool {
		return slices.Equal(history(), []string{"v2 installed ", "v1 failed install_failed"})
	})
}

// TestAdminErrors: bad requests get a clear error with a stable code and change nothing.
func TestAdminErrors(t *testing.T) {
	e := startEnv(t, boltOpener)
	ctx := context.Background()
	e.provision(2)
	img := randomImage(2000)
	e.release(img, 5)
	code := func(err error) protocol.ErrorCode {
		var pe *protocol.Error
		if !errors.As(err, &pe) {
			t.Fatalf("want an admin error, got %v", err)
		}
		return pe.Code
	}
	cases := []struct {
		name string
		cmd  string
		args any
		want protocol.ErrorCode
	}{
		{"unknown command", "release.explode", nil, protocol.ErrUnknownCommand},
		{"unknown argument", protocol.CmdProvision, map[string]any{"serials": []string{"x"}, "colour": "red"}, protocol.ErrBadRequest},
		{"bad serial", protocol.CmdProvision, protocol.ProvisionArgs{Serials: []string{"a/b"}}, protocol.ErrBadRequest},
		{"duplicate provision", protocol.CmdProvision, protocol.ProvisionArgs{Serials: []string{"dev-0000"}}, protocol.ErrConflict},
		{"too many", protocol.CmdProvision, protocol.ProvisionArgs{Count: 1001, Prefix: "x"}, protocol.ErrTooLarge},
		{"bad chain length", protocol.CmdProvision, protocol.ProvisionArgs{Serials: []string{"new-1"}, ChainLength: 1000}, protocol.ErrBadRequest},
		{"oversize upload", protocol.CmdUploadBegin, protocol.UploadBeginArgs{Size: 1 << 40, SHA256: string(make([]byte, 0))}, protocol.ErrTooLarge},
		{"bad sha", protocol.CmdUploadBegin, protocol.UploadBeginArgs{Size: 10, SHA256: "xyz"}, protocol.ErrBadRequest},
		{"unknown upload", protocol.CmdReleaseCreate, protocol.ReleaseCreateArgs{Upload: "up-nope", Version: 9, All: true}, protocol.ErrNotFound},
		{"no version", protocol.CmdReleaseCreate, protocol.ReleaseCreateArgs{Upload: "up-nope", All: true}, protocol.ErrBadRequest},
		{"unknown release", protocol.CmdReleasePause, protocol.ReleaseArgs{}, protocol.ErrNotFound},
		{"unknown device", protocol.CmdDeviceGet, protocol.SerialArgs{Serial: "ghost"}, protocol.ErrNotFound},
	}
	for _, c := range cases {
		if got := code(e.op.Do(ctx, c.cmd, c.args, nil)); got != c.want {
			t.Errorf("%s: code %s, want %s", c.name, got, c.want)
		}
	}
	// Releases whose version is not newer, or to unknown devices, are refused before
	// anything is published.
	if _, err := e.op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{Version: 5, All: true}); code(err) != protocol.ErrVersionNotNewer {
		t.Errorf("same version: %v", err)
	}
	if _, err := e.op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{Version: 6, Devices: []string{"dev-0000", "ghost"}}); code(err) != protocol.ErrNotFound {
		t.Errorf("unknown target: %v", err)
	}
	// An upload whose content differs from the declared hash fails at finish.
	var begin protocol.UploadBeginResult
	if err := e.op.Do(ctx, protocol.CmdUploadBegin, protocol.UploadBeginArgs{Size: 3, SHA256: "0000000000000000000000000000000000000000000000000000000000000000"}, &begin); err != nil {
		t.Fatal(err)
	}
	if got := code(e.op.Do(ctx, protocol.CmdUploadFinish, protocol.UploadArgs{Upload: begin.Upload}, nil)); got != protocol.ErrBadUpload {
		t.Errorf("finish with missing parts: %s", got)
	}
	var list protocol.ReleaseListResult
	if err := e.op.Do(ctx, protocol.CmdReleaseList, nil, &list); err != nil || len(list.Releases) != 1 {
		t.Fatalf("releases after the errors: %d (%v)", len(list.Releases), err)
	}
	// A monitor cannot command: the broker drops its request, so no reply ever comes.
	mon, err := operator.Dial(ctx, operator.Options{URL: e.b.URL, Username: e.b.Monitor.Username, Password: e.b.Monitor.Password, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	if err := mon.Do(ctx, protocol.CmdProvision, protocol.ProvisionArgs{Serials: []string{"sneaky"}}, nil); err == nil {
		t.Fatal("monitor provisioned a device")
	}
	if ds, _ := e.store.Devices(ctx, []string{"sneaky"}); ds[0] != nil {
		t.Fatal("monitor's request changed the store")
	}
	// Malformed JSON on the admin topic gets no reply (there is no id) and breaks nothing.
	c := mqtt.NewClient(mqtt.NewClientOptions().AddBroker(e.b.URL).SetUsername(e.b.Admin.Username).SetPassword(e.b.Admin.Password).SetClientID("raw-admin"))
	c.Connect().Wait()
	c.Publish(protocol.AdminRequests, 1, false, []byte("{not json")).Wait()
	c.Disconnect(0)
	var st protocol.DeviceStatus
	if err := e.op.Do(ctx, protocol.CmdDeviceGet, protocol.SerialArgs{Serial: "dev-0001"}, &st); err != nil || st.Serial != "dev-0001" {
		t.Fatalf("updater unwell after malformed request: %v", err)
	}
	b, _ := json.Marshal(st)
	t.Logf("device.get: %s", b)
}

// TestRedisRestartMidRelease: Redis (AOF, fsync always) is killed and restarted while a
// release is half acked; nothing is lost and every counter moves exactly once.
func TestRedisRestartMidRelease(t *testing.T) {
	srv := redistest.Start(t, "--appendonly", "yes", "--appendfsync", "always")
	e := startEnv(t, func(t testing.TB) updater.Store { return redisAt(t, srv.URL()) })
	files := e.provision(20)
	devs := make([]*testDevice, len(files))
	for i, f := range files {
		devs[i] = connectDevice(t, e.b.URL, f)
	}
	e.release(randomImage(6000), 1)
	acks := make([][]byte, len(devs))
	for i, d := range devs {
		acks[i], _, _ = d.install()
	}
	for i, d := range devs[:10] {
		d.ackUntilReceipt(acks[i], keychain.Key(d.u, d.file.Seq))
	}
	srv.Restart(t)
	var wg sync.WaitGroup
	for i, d := range devs[10:] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d.ackUntilReceipt(acks[10+i], keychain.Key(d.u, d.file.Seq))
		}()
	}
	wg.Wait()
	for _, f := range files {
		if got := e.device(f.Serial); got.Seq != f.Seq-1 || got.Version != 1 {
			t.Fatalf("%s: counter %d version %d after the Redis restart; want %d and 1", f.Serial, got.Seq, got.Version, f.Seq-1)
		}
	}
	if s := e.u.Stats(); s.AcksAccepted != 20 {
		t.Errorf("accepted %d acks, want 20 (stats %+v)", s.AcksAccepted, s)
	}
}

// TestDeviceAheadResync: a device whose sequence number is below the server's (its ack
// was lost together with the store's last writes, or its vault was restored) reports
// stale_key; the server moves down to meet it and the release goes through (PROTOCOL.md
// 10.2 step 4, 10.4).
func TestDeviceAheadResync(t *testing.T) {
	e := startEnv(t, boltOpener)
	f := e.provision(1)[0]
	d := connectDevice(t, e.b.URL, f)
	d.d = f.Seq - 3 // the device has used three indices the server does not know of
	e.release(randomImage(3000), 1)
	raw := d.next(d.keys, "key")
	km, _ := keychain.ParseKeyMessage(raw)
	if km.Seq != f.Seq {
		t.Fatalf("first key at %d, want %d", km.Seq, f.Seq)
	}
	k := keychain.Key(d.u, km.Seq)
	rep, _ := keychain.Ack{Kind: keychain.AckFailed, Epoch: 0, Seq: km.Seq, ID: km.ID, DeviceSeq: d.d, Code: uint16(protocol.CodeStaleKey)}.Seal(k, f.Serial)
	d.publishAck(rep)
	ack, km2, _ := d.install() // the re-wrapped key, at the device's own index
	if km2.Seq != f.Seq-3 {
		t.Fatalf("re-wrapped at %d, want %d", km2.Seq, f.Seq-3)
	}
	d.ackUntilReceipt(ack, keychain.Key(d.u, km2.Seq))
	if got := e.device(f.Serial); got.Seq != f.Seq-4 || got.Version != 1 {
		t.Fatalf("counter %d version %d, want %d and 1", got.Seq, got.Version, f.Seq-4)
	}
	if s := e.u.Stats(); s.Resyncs != 1 || s.AcksAccepted != 1 {
		t.Errorf("stats %+v", s)
	}
}

// TestOutdatedKeyReoffered: a device at index n-1 that finds a key message for index n on
// its key topic (a fan-out published it after the message for n-1, racing with the
// device's ack) reports stale_key at n; the server publishes the key message for n-1
// again [SC-10.2] 4. A forged report of that kind changes nothing.
func TestOutdatedKeyReoffered(t *testing.T) {
	e := startEnv(t, boltOpener)
	f := e.provision(1)[0]
	d := connectDevice(t, e.b.URL, f)
	e.release(randomImage(3000), 1)
	ack, km, _ := d.install()
	d.ackUntilReceipt(ack, keychain.Key(d.u, km.Seq))
	rid2 := e.release(randomImage(3000), 2)
	km2, err := keychain.ParseKeyMessage(d.next(d.keys, "release 2 key"))
	if err != nil || km2.ID != rid2 || km2.Seq != f.Seq-1 {
		t.Fatalf("release 2 key %+v (%v), want at %d", km2, err, f.Seq-1)
	}
	// The outdated message: release 1's key at n lands on the topic last.
	old := d.lastKeyAt(f.Seq)
	e.publishAsUpdater(protocol.KeyTopic(f.Serial), old)
	if got := d.next(d.keys, "outdated key"); !bytes.Equal(got, old) {
		t.Fatal("the outdated key message did not arrive")
	}
	// A forged report first: nothing is published.
	forged, _ := keychain.Ack{Kind: keychain.AckFailed, Seq: f.Seq, ID: km.ID, DeviceSeq: f.Seq - 1, Code: uint16(protocol.CodeStaleKey)}.Seal(keychain.Key(d.u, f.Seq-5), f.Serial)
	d.publishAck(forged)
	rep, _ := keychain.Ack{Kind: keychain.AckFailed, Seq: f.Seq, ID: km.ID, DeviceSeq: f.Seq - 1, Code: uint16(protocol.CodeStaleKey)}.Seal(keychain.Key(d.u, f.Seq), f.Serial)
	d.publishAck(rep)
	again, err := keychain.ParseKeyMessage(d.next(d.keys, "key message published again"))
	if err != nil || again.ID != rid2 || again.Seq != f.Seq-1 {
		t.Fatalf("published again: %+v (%v), want release 2 at %d", again, err, f.Seq-1)
	}
	// The forged report may be judged after the genuine one: another worker's batch.
	eventually(t, "the forged report rejected and the key published again once", func() bool {
		s := e.u.Stats()
		return s.Reoffers == 1 && s.AcksRejected["forged"] == 1
	})
	if s := e.u.Stats(); s.Reoffers != 1 || s.AcksRejected["forged"] != 1 {
		t.Errorf("reoffers %d, forged %d; want 1 and 1", s.Reoffers, s.AcksRejected["forged"])
	}
	if got := e.device(f.Serial); got.Seq != f.Seq-1 {
		t.Fatalf("counter %d, want %d", got.Seq, f.Seq-1)
	}
}
