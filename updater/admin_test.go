package updater_test

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater"
)

// TestAdminService drives a release through the Go admin service, beside the MQTT
// transport over the same service: what one does, the other sees, and both answer with
// the same protocol error codes.
func TestAdminService(t *testing.T) {
	e := startEnv(t, boltOpener)
	ctx := context.Background()
	admin := e.u.Admin()

	res, err := admin.Provision(ctx, protocol.ProvisionArgs{Count: 2, Prefix: "go-"})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Devices) != 2 || res.Devices[0].Serial != "go-000001" {
		t.Fatalf("provisioned %+v", res.Devices)
	}
	if fs, err := admin.Fleet(ctx); err != nil || fs.Devices != 2 {
		t.Fatalf("fleet.get right after provisioning: %+v, %v; want 2 devices", fs, err)
	}
	// The MQTT transport sees the devices the Go call made, and the reverse.
	if _, err := e.op.Provision(ctx, []string{"go-000002"}, 0); protocol.CodeOf(err) != protocol.ErrConflict {
		t.Fatalf("provisioning a device again over MQTT: %v, want conflict", err)
	}
	if st, err := admin.Device(ctx, "go-000001"); err != nil || st.State != protocol.DeviceIdle || st.Seq != 16 {
		t.Fatalf("device.get: %+v, %v", st, err)
	}

	img := randomImage(5000)
	upload, err := e.op.Upload(ctx, bytes.NewReader(img), int64(len(img)))
	if err != nil {
		t.Fatal(err)
	}
	created, err := admin.CreateRelease(ctx, protocol.ReleaseCreateArgs{Upload: upload, Version: 1, All: true, ChunkSize: 1024})
	if err != nil {
		t.Fatal(err)
	}
	d := connectDevice(t, e.b.URL, res.Devices[0])
	ack, km, got := d.install()
	if km.ID != created.Release || !bytes.Equal(got, img) {
		t.Fatalf("the device installed release %s, want %s (image equal: %v)", km.ID, created.Release, bytes.Equal(got, img))
	}
	d.ackUntilReceipt(ack, keychain.Key(d.u, km.Seq))
	eventually(t, "one install counted", func() bool {
		st, err := admin.Release(ctx, created.Release)
		return err == nil && st.Installed == 1 && st.Targets == 2
	})

	if st, err := admin.PauseRelease(ctx, created.Release); err != nil || st.State != protocol.ReleasePaused {
		t.Fatalf("pause: %+v, %v", st, err)
	}
	st, err := e.op.ReleaseStatus(ctx, created.Release)
	if err != nil || st.State != protocol.ReleasePaused {
		t.Fatalf("release.get over MQTT after a pause through Go: %+v, %v", st, err)
	}
	if st, err := admin.PauseRelease(ctx, created.Release); err != nil || st.State != protocol.ReleasePaused {
		t.Fatalf("pausing a paused release: %+v, %v; want it paused, no error", st, err)
	}
	if _, err := admin.ResumeRelease(ctx, created.Release); err != nil {
		t.Fatal(err)
	}
	if st, err := admin.CancelRelease(ctx, created.Release); err != nil || st.State != protocol.ReleaseCancelled {
		t.Fatalf("cancel: %+v, %v", st, err)
	}
	if _, err := admin.ResumeRelease(ctx, created.Release); protocol.CodeOf(err) != protocol.ErrConflict {
		t.Fatalf("resuming a cancelled release: %v, want conflict", err)
	}
	if _, err := admin.Release(ctx, keychain.ReleaseID{1}); protocol.CodeOf(err) != protocol.ErrNotFound {
		t.Fatalf("an unknown release: %v, want not_found", err)
	}
	if _, err := admin.CreateRelease(ctx, protocol.ReleaseCreateArgs{Upload: upload, Version: 2, All: true}); protocol.CodeOf(err) != protocol.ErrNotFound {
		t.Fatalf("a release from an upload already used: %v, want not_found", err)
	}
	list, err := admin.Releases(ctx)
	if err != nil || len(list.Releases) != 1 || list.Releases[0].State != protocol.ReleaseCancelled {
		t.Fatalf("release.list: %+v, %v", list, err)
	}
	if err := admin.Deprovision(ctx, "go-000002"); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Device(ctx, "go-000002"); protocol.CodeOf(err) != protocol.ErrNotFound {
		t.Fatalf("a deprovisioned device: %v, want not_found", err)
	}
}

// TestAdminCommandsOneAtATime: the same devices provisioned at once through the Go
// service and the MQTT transport are provisioned exactly once; every other request is
// refused with conflict.
func TestAdminCommandsOneAtATime(t *testing.T) {
	e := startEnv(t, boltOpener)
	ctx := context.Background()
	serials := make([]string, 50)
	for i := range serials {
		serials[i] = fmt.Sprintf("race-%03d", i)
	}
	const tries = 6
	errs := make([]error, tries)
	var wg sync.WaitGroup
	for i := range tries {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i%2 == 0 {
				_, errs[i] = e.u.Admin().Provision(ctx, protocol.ProvisionArgs{Serials: serials})
			} else {
				_, errs[i] = e.op.Provision(ctx, serials, 0)
			}
		}()
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		switch protocol.CodeOf(err) {
		case protocol.ErrConflict:
		default:
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			ok++
		}
	}
	if ok != 1 {
		t.Fatalf("%d of %d concurrent provision requests succeeded, want exactly 1: %v", ok, tries, errs)
	}
}

// TestAdminNilWhenAcksOnly: an acks-only updater has no admin service.
func TestAdminNilWhenAcksOnly(t *testing.T) {
	e := startEnv(t, boltOpener)
	e.stop()
	e.startUpdater(func(o *updater.Options) { o.AcksOnly = true })
	if e.u.Admin() != nil {
		t.Fatal("an acks-only updater has an admin service")
	}
}

// TestReservedNames: no device takes a name reserved for broker accounts, nor the name of
// an account the broker has ([SC-2.2]); a malformed serial among a release's devices is a
// bad request, not an unknown device.
func TestReservedNames(t *testing.T) {
	e := startEnv(t, boltOpener, func(o *updater.Options) { o.Accounts = accountSet{"ops-alice": true} })
	ctx := context.Background()
	for _, s := range []string{"admin", "monitor", "updater", "sealcast", "sealcast-updater-2"} {
		if _, err := e.op.Provision(ctx, []string{"ok-1", s}, 0); protocol.CodeOf(err) != protocol.ErrBadRequest {
			t.Errorf("provisioning %q: %v, want bad_request", s, err)
		}
	}
	if _, err := e.op.Provision(ctx, []string{"ops-alice"}, 0); protocol.CodeOf(err) != protocol.ErrConflict {
		t.Errorf("provisioning the name of a broker account: %v, want conflict", err)
	}
	if _, err := e.u.Admin().Device(ctx, "ok-1"); protocol.CodeOf(err) != protocol.ErrNotFound {
		t.Errorf("a refused request provisioned ok-1: %v", err)
	}
	e.provision(1)
	img := randomImage(100)
	_, err := e.op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{Version: 1, Devices: []string{"dev-0000", "bad serial"}})
	if protocol.CodeOf(err) != protocol.ErrBadRequest {
		t.Errorf("a release to a malformed serial: %v, want bad_request", err)
	}
}

type accountSet map[string]bool

func (s accountSet) IsAccount(name string) bool { return s[name] }

// TestDeviceList: device.list pages through the fleet in serial order, says how many
// there are and where the next page starts, with each device's presence; a bad limit is
// bad_request.
func TestDeviceList(t *testing.T) {
	e := startEnv(t, boltOpener)
	ctx := context.Background()
	files := e.provision(5)
	var got []string
	pages := 0
	for after := ""; ; pages++ {
		var page protocol.DeviceListResult
		if err := e.op.Do(ctx, protocol.CmdDeviceList, protocol.DeviceListArgs{After: after, Limit: 2}, &page); err != nil {
			t.Fatal(err)
		}
		if page.Total != 5 || len(page.Devices) > 2 {
			t.Fatalf("page %+v: want at most 2 devices of 5", page)
		}
		for _, d := range page.Devices {
			if d.Online == nil || *d.Online {
				t.Fatalf("device %s: online %v; want known, and false (no presence published)", d.Serial, d.Online)
			}
			got = append(got, d.Serial)
		}
		if page.Next == "" {
			break
		}
		after = page.Next
	}
	var want []string
	for _, f := range files {
		want = append(want, f.Serial)
	}
	slices.Sort(want)
	if !slices.Equal(got, want) || pages != 2 {
		t.Fatalf("listed %v in %d pages after the first; want %v in 2", got, pages, want)
	}
	if err := e.op.Do(ctx, protocol.CmdDeviceList, protocol.DeviceListArgs{Limit: 5000}, nil); protocol.CodeOf(err) != protocol.ErrBadRequest {
		t.Fatalf("limit 5000: %v, want bad_request", err)
	}
}

// TestDeprovisionLetsReleaseComplete: a target deprovisioned while a release is in
// progress leaves its targets, with its result, so that the release completes with the
// devices that remain.
func TestDeprovisionLetsReleaseComplete(t *testing.T) {
	e := startEnv(t, boltOpener)
	ctx := context.Background()
	files := e.provision(3)
	rel := e.release(randomImage(800), 1)
	for _, f := range files[:2] {
		d := connectDevice(t, e.b.URL, f)
		ack, km, _ := d.install()
		d.ackUntilReceipt(ack, keychain.Key(d.u, km.Seq))
	}
	eventually(t, "two of three installed", func() bool {
		st, err := e.u.Admin().Release(ctx, rel)
		return err == nil && st.Installed == 2 && st.State == protocol.ReleaseActive
	})
	p, err := e.u.Admin().Pending(ctx, protocol.ReleasePendingArgs{Release: rel})
	if err != nil || p.Total != 1 || len(p.Pending) != 1 || p.Pending[0] != files[2].Serial {
		t.Fatalf("release.pending: %+v, %v; want %s alone", p, err, files[2].Serial)
	}
	if _, err := e.u.Admin().Pending(ctx, protocol.ReleasePendingArgs{Release: rel, Limit: 1001}); protocol.CodeOf(err) != protocol.ErrBadRequest {
		t.Fatalf("release.pending with limit 1001: %v, want bad_request", err)
	}
	if err := e.u.Admin().Deprovision(ctx, files[2].Serial); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the release completed without the deprovisioned device", func() bool {
		st, err := e.u.Admin().Release(ctx, rel)
		return err == nil && st.State == protocol.ReleaseCompleted && st.Targets == 2 && st.Installed == 2
	})
	if ts, err := e.store.Targets(ctx, rel); err != nil || len(ts) != 2 {
		t.Fatalf("targets in the store: %q, %v", ts, err)
	}
}

// TestTagsSelectAndFollow: a release to a tag selection targets exactly the devices that
// have those tags; with follow, a device provisioned later with them, or tagged later,
// joins it and gets its key ([SC-12.4]).
func TestTagsSelectAndFollow(t *testing.T) {
	e := startEnv(t, boltOpener)
	ctx := context.Background()
	admin := e.u.Admin()
	eu, err := admin.Provision(ctx, protocol.ProvisionArgs{Count: 2, Prefix: "eu-", Tags: map[string]string{"region": "eu", "hw": "rev2"}})
	if err != nil {
		t.Fatal(err)
	}
	us, err := admin.Provision(ctx, protocol.ProvisionArgs{Serials: []string{"us-1"}, Tags: map[string]string{"region": "us"}})
	if err != nil {
		t.Fatal(err)
	}
	if st, err := admin.Device(ctx, "eu-000001"); err != nil || st.Tags["hw"] != "rev2" {
		t.Fatalf("device.get shows tags %v, %v", st.Tags, err)
	}
	img := randomImage(700)
	create := func(a protocol.ReleaseCreateArgs) (*protocol.ReleaseCreateResult, error) {
		a.ChunkSize = 1024
		return e.op.Release(ctx, bytes.NewReader(img), int64(len(img)), a)
	}
	for _, bad := range []protocol.ReleaseCreateArgs{
		{Version: 1, All: true, Select: map[string]string{"region": "eu"}},
		{Version: 1, Devices: []string{"eu-000001"}, Follow: true},
		{Version: 1, Select: map[string]string{"Region": "eu"}},
	} {
		if _, err := create(bad); protocol.CodeOf(err) != protocol.ErrBadRequest {
			t.Errorf("release.create %+v: %v, want bad_request", bad, err)
		}
	}
	if _, err := create(protocol.ReleaseCreateArgs{Version: 1, Select: map[string]string{"region": "mars"}}); protocol.CodeOf(err) != protocol.ErrNotFound {
		t.Errorf("a selection no device matches: %v, want not_found", err)
	}
	res, err := create(protocol.ReleaseCreateArgs{Version: 1, Select: map[string]string{"region": "eu"}, Follow: true})
	if err != nil || res.Targets != 2 {
		t.Fatalf("release to region=eu: %+v, %v; want 2 targets", res, err)
	}
	d := connectDevice(t, e.b.URL, eu.Devices[0])
	if _, km, _ := d.install(); km.ID != res.Release {
		t.Fatalf("an eu device was offered %s", km.ID)
	}

	// Provisioned later with the tags: it joins.
	late, err := admin.Provision(ctx, protocol.ProvisionArgs{Serials: []string{"eu-late"}, Tags: map[string]string{"region": "eu"}})
	if err != nil {
		t.Fatal(err)
	}
	dl := connectDevice(t, e.b.URL, late.Devices[0])
	if _, km, _ := dl.install(); km.ID != res.Release {
		t.Fatalf("a device provisioned later was offered %s", km.ID)
	}
	// Tagged later: it joins too. Untagged again: it stays.
	if _, err := admin.Tag(ctx, protocol.TagArgs{Serial: "us-1", Set: map[string]string{"Bad": "x"}}); protocol.CodeOf(err) != protocol.ErrBadRequest {
		t.Fatalf("a bad tag key: %v, want bad_request", err)
	}
	var st protocol.DeviceStatus
	if err := e.op.Do(ctx, protocol.CmdDeviceTag, protocol.TagArgs{Serial: "us-1", Set: map[string]string{"region": "eu"}}, &st); err != nil || st.Tags["region"] != "eu" {
		t.Fatalf("device.tag: %+v, %v", st, err)
	}
	du := connectDevice(t, e.b.URL, us.Devices[0])
	if _, km, _ := du.install(); km.ID != res.Release {
		t.Fatalf("a device tagged later was offered %s", km.ID)
	}
	if _, err := admin.Tag(ctx, protocol.TagArgs{Serial: "us-1", Unset: []string{"region"}}); err != nil {
		t.Fatal(err)
	}
	rs, err := admin.Release(ctx, res.Release)
	if err != nil || rs.Targets != 4 {
		t.Fatalf("release status %+v, %v; want 4 targets", rs, err)
	}
}

// TestUploadLimits: the service keeps at most 16 unfinished uploads at once, and no more
// than four times the largest image in all; past that, upload.begin is refused with a
// conflict that says what to do, and nothing is created.
func TestUploadLimits(t *testing.T) {
	e := startEnv(t, boltOpener, func(o *updater.Options) { o.MaxUploadSize = 1000 })
	ctx := context.Background()
	sum := strings.Repeat("ab", 32)
	admin := e.u.Admin()
	if _, err := admin.BeginUpload(ctx, protocol.UploadBeginArgs{Size: 1000, SHA256: sum}); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, err := admin.BeginUpload(ctx, protocol.UploadBeginArgs{Size: 1000, SHA256: sum}); err != nil {
			t.Fatal(err)
		}
	}
	_, err := admin.BeginUpload(ctx, protocol.UploadBeginArgs{Size: 1, SHA256: sum})
	if protocol.CodeOf(err) != protocol.ErrConflict || !strings.Contains(err.Error(), "create releases from them") {
		t.Fatalf("a fifth upload past 4 x 1000 bytes: %v, want conflict", err)
	}
	e2 := startEnv(t, boltOpener)
	for i := range 16 {
		if _, err := e2.u.Admin().BeginUpload(ctx, protocol.UploadBeginArgs{Size: 1, SHA256: sum}); err != nil {
			t.Fatalf("upload %d: %v", i+1, err)
		}
	}
	if _, err := e2.u.Admin().BeginUpload(ctx, protocol.UploadBeginArgs{Size: 1, SHA256: sum}); protocol.CodeOf(err) != protocol.ErrConflict {
		t.Fatalf("a 17th unfinished upload: %v, want conflict", err)
	}
}
