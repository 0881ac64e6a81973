package device_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/internal/testkit/devicetest"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// trialDevice is a device with A/B slots whose switch, health and confirm commands log
// what they were asked to do; its image is unhealthy while the file sick exists.
type trialDevice struct {
	v    *device.FileVault
	inst *device.SlotInstaller
	log  string // one line per command: "switch a", "health b", "confirm a"
	sick string
}

func (e *env) trialDevice(serial string) *trialDevice {
	e.t.Helper()
	dir := e.t.TempDir()
	v, inst := e.provision(serial, dir)
	d := &trialDevice{v: v, inst: inst, log: filepath.Join(dir, "commands.log"), sick: filepath.Join(dir, "sick")}
	inst.SwitchCmd = []string{"/bin/sh", "-c", "echo switch {slot} >> " + d.log}
	inst.HealthCmd = []string{"/bin/sh", "-c", "echo health $SEALCAST_SLOT >> " + d.log + " && test ! -e " + d.sick}
	inst.ConfirmCmd = []string{"/bin/sh", "-c", "echo confirm {slot} >> " + d.log}
	return d
}

// commands returns the commands run so far.
func (d *trialDevice) commands(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(d.log)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Fields(strings.ReplaceAll(strings.TrimSpace(string(b)), " ", "_"))
}

func (d *trialDevice) checkActive(t *testing.T, id keychain.ReleaseID, img []byte) {
	t.Helper()
	act, ok, err := d.inst.Active()
	if err != nil || !ok || act.Release != id || act.Trial {
		t.Fatalf("active slot %+v (ok %v, %v); want release %s, not on trial", act, ok, err, id)
	}
	checkSlot(t, d.inst, img)
}

// TestTrialHealthy: an A/B device switches to the new image, checks its health, and
// only then persists D = n-1, makes the image permanent and acks [SC-10.5].
func TestTrialHealthy(t *testing.T) {
	e := newEnv(t)
	d := e.trialDevice("trial-ok")
	rec := &devicetest.Recorder{}
	r0 := run(t, e.opts(d.v, d.inst, rec))
	img := image(4*testChunk, 21)
	r := e.release(img, 1)
	e.srv.Wrap(r, "trial-ok")
	st := waitVault(t, d.v, func(s device.State) bool { return s.LastAckConfirmed })
	if st.Seq != 15 || st.Version != 1 || st.Trial != nil {
		t.Fatalf("vault D=%d v=%d trial %+v; want 15, 1, none", st.Seq, st.Version, st.Trial)
	}
	if got, want := strings.Join(d.commands(t), " "), "switch_a health_a confirm_a"; got != want {
		t.Fatalf("commands %q, want %q", got, want)
	}
	d.checkActive(t, r.ID, img)
	if s := r0.a.Stats(); s.Trials != 1 || s.Installs != 1 || s.Unhealthy != 0 {
		t.Fatalf("stats %+v: want 1 trial, 1 install", s)
	}
}

// TestTrialUnhealthy: an image that fails its health check is switched away from, the
// counter does not move, and the device reports unhealthy (code 11, permanent) with its
// old version; after a restart the same key message gets the same report and no second
// attempt; the next release installs at the same index [SC-10.5].
func TestTrialUnhealthy(t *testing.T) {
	e := newEnv(t)
	const serial = "trial-sick"
	d := e.trialDevice(serial)
	rec := &devicetest.Recorder{}
	r0 := run(t, e.opts(d.v, d.inst, rec))
	img1 := image(3*testChunk, 22)
	r1 := e.release(img1, 1)
	e.srv.Wrap(r1, serial)
	waitVault(t, d.v, func(s device.State) bool { return s.LastAckConfirmed && s.Seq == 15 })

	if err := os.WriteFile(d.sick, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	r2 := e.release(image(5*testChunk, 23), 2)
	e.srv.Wrap(r2, serial)
	got, err := e.srv.WaitAck(serial, 20*time.Second, func(a keychain.Ack) bool { return a.Kind == keychain.AckFailed })
	if err != nil {
		t.Fatal(err)
	}
	if a := got.Ack; protocol.Code(a.Code) != protocol.CodeUnhealthy || a.ID != r2.ID || a.Seq != 15 || a.DeviceSeq != 15 || a.Version != 1 {
		t.Fatalf("report %+v; want unhealthy for release 2 at 15, device_seq 15, version 1", a)
	}
	st := waitVault(t, d.v, func(s device.State) bool { return s.Trial != nil && s.Trial.Report != nil })
	if st.Seq != 15 || st.Version != 1 {
		t.Fatalf("after the failed trial: D=%d v=%d; want 15, 1 (the counter does not move)", st.Seq, st.Version)
	}
	if dev := e.srv.Dev(serial); dev.C != 15 || dev.Confirmations != 1 {
		t.Fatalf("server C=%d after %d confirmations; want 15 after 1", dev.C, dev.Confirmations)
	}
	if got, want := strings.Join(d.commands(t), " "), "switch_a health_a confirm_a switch_b health_b switch_a"; got != want {
		t.Fatalf("commands %q, want %q (back to slot a)", got, want)
	}
	d.checkActive(t, r1.ID, img1)
	if s := r0.a.Stats(); s.Unhealthy != 1 {
		t.Fatalf("stats %+v: want 1 unhealthy", s)
	}

	// A restart: the retained key message comes again; the report is re-sent as it was,
	// and nothing is downloaded, switched or checked.
	r0.stop(t)
	reports := len(e.srv.Dev(serial).Acks)
	rec2 := &devicetest.Recorder{}
	r1b := run(t, e.opts(device.NewFileVault(d.v.Path()), d.inst, rec2))
	deadline := time.Now().Add(20 * time.Second)
	for len(e.srv.Dev(serial).Acks) == reports {
		if time.Now().After(deadline) {
			t.Fatal("no report after the restart")
		}
		time.Sleep(10 * time.Millisecond)
	}
	acks := e.srv.Dev(serial).Acks
	if last := acks[len(acks)-1]; string(last.Raw) != string(st.Trial.Report) {
		t.Fatalf("after the restart the device sent %+v, not its kept unhealthy report", last.Ack)
	}
	time.Sleep(200 * time.Millisecond)
	if s := r1b.a.Stats(); s.ChunkFetches != 0 || s.Trials != 0 {
		t.Fatalf("after the restart: %+v; want no download and no trial", s)
	}

	// The next release, at the same index, installs.
	if err := os.Remove(d.sick); err != nil {
		t.Fatal(err)
	}
	img3 := image(2*testChunk, 24)
	r3 := e.release(img3, 3)
	e.srv.Wrap(r3, serial)
	st = waitVault(t, d.v, func(s device.State) bool { return s.LastAckConfirmed && s.Seq == 14 })
	if st.Version != 3 || st.Trial != nil {
		t.Fatalf("after release 3: v=%d trial %+v; want 3, none", st.Version, st.Trial)
	}
	d.checkActive(t, r3.ID, img3)
}

// TestTrialPowerLoss cuts the power at every step of a trial: before the switch, after
// it before the health check, after the check before the vault write, and after the
// write before the ack. Every time the device ends on the new image, made permanent, the
// vault at D = n-1, and the server's counter moved exactly once [SC-10.5].
func TestTrialPowerLoss(t *testing.T) {
	e := newEnv(t)
	for _, p := range []device.CrashPoint{device.CrashStaged, device.CrashTrial, device.CrashHealthy, device.CrashPersisted} {
		t.Run(p.String(), func(t *testing.T) {
			serial := "trial-pl-" + p.String()
			d := e.trialDevice(serial)
			o := e.opts(d.v, d.inst, &devicetest.Recorder{})
			o.Faults.Crash = func(at device.CrashPoint, _ keychain.ReleaseID, _ uint32) bool { return at == p }
			r0 := run(t, o)
			img := image(3*testChunk, 30+uint64(p))
			r := e.release(img, 1)
			e.srv.Wrap(r, serial)
			if err := r0.wait(t); !errors.Is(err, device.ErrCrashed) {
				t.Fatalf("Run = %v, want ErrCrashed at %s", err, p)
			}
			// The reboot: the same vault and slots, no more faults.
			run(t, e.opts(device.NewFileVault(d.v.Path()), d.inst, &devicetest.Recorder{}))
			st := waitVault(t, d.v, func(s device.State) bool { return s.LastAckConfirmed })
			if st.Seq != 15 || st.Version != 1 || st.Trial != nil {
				t.Fatalf("vault D=%d v=%d trial %+v; want 15, 1, none", st.Seq, st.Version, st.Trial)
			}
			d.checkActive(t, r.ID, img)
			if dev := e.srv.Dev(serial); dev.C != 15 || dev.Confirmations != 1 {
				t.Fatalf("server C=%d after %d confirmations; want 15 after 1", dev.C, dev.Confirmations)
			}
			if cmds := d.commands(t); cmds[len(cmds)-1] != "confirm_a" {
				t.Fatalf("commands %v: the image was not made permanent last", cmds)
			}
		})
	}
}

// TestTrialBootsRunOut: an image that takes the device down at every start on trial
// (the power lost before its health check, each time) is given up after TrialBoots
// starts: the device goes back and reports unhealthy [SC-10.5].
func TestTrialBootsRunOut(t *testing.T) {
	e := newEnv(t)
	const serial = "trial-loop"
	d := e.trialDevice(serial)
	crash := func(o *device.Options) {
		o.TrialBoots = 2
		o.Faults.Crash = func(at device.CrashPoint, _ keychain.ReleaseID, _ uint32) bool { return at == device.CrashTrial }
	}
	o := e.opts(d.v, d.inst, &devicetest.Recorder{})
	crash(&o)
	r0 := run(t, o)
	r := e.release(image(2*testChunk, 40), 1)
	e.srv.Wrap(r, serial)
	crashes := 0
	for errors.Is(r0.wait(t), device.ErrCrashed) {
		if crashes++; crashes > 5 {
			t.Fatal("the device kept starting the image on trial")
		}
		o := e.opts(device.NewFileVault(d.v.Path()), d.inst, &devicetest.Recorder{})
		crash(&o)
		r0 = run(t, o)
		if _, err := e.srv.WaitAck(serial, 3*time.Second, func(a keychain.Ack) bool { return a.Kind == keychain.AckFailed }); err == nil {
			break
		}
	}
	got, err := e.srv.WaitAck(serial, 20*time.Second, func(a keychain.Ack) bool { return a.Kind == keychain.AckFailed })
	if err != nil || protocol.Code(got.Ack.Code) != protocol.CodeUnhealthy {
		t.Fatalf("report %+v, %v; want unhealthy", got.Ack, err)
	}
	if crashes != 2 {
		t.Fatalf("%d starts cut short; want 2 (TrialBoots), then the give-up", crashes)
	}
	if act, ok, _ := d.inst.Active(); ok {
		t.Fatalf("active slot %+v; the device had no image before, so none should be active", act)
	}
	if st, _ := d.v.Load(); st.Seq != 16 || st.Trial == nil || st.Trial.Report == nil {
		t.Fatalf("vault D=%d trial %+v; want 16 and the failed trial kept", st.Seq, st.Trial)
	}
}
