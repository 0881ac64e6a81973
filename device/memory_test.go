package device_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/keychain"
)

// TestBigImageMemory installs a 64 MiB image (64 KiB chunks, window 4) with the agent in
// a child process, so the broker's retained copy of the release does not count, and
// checks that the agent's peak heap stays far below the image size. It reports the
// child's peak HeapInuse (sampled every 5 ms) and VmHWM. Skipped with -short.
func TestBigImageMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("64 MiB install skipped in -short mode")
	}
	const size = 64 << 20
	e := newEnv(t)
	dir := t.TempDir()
	v, _ := e.provision("dev-big", dir)
	r, err := e.srv.PublishStream(pattern{}, size, 1, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.srv.Wrap(r, "dev-big"); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestBigImageChild$", "-test.v")
	cmd.Env = append(os.Environ(), "SEALCAST_CHILD_VAULT="+v.Path(), "SEALCAST_CHILD_SLOTS="+filepath.Join(dir, "slots"), "SEALCAST_CHILD_BROKER="+e.url)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	var heap, hwm uint64
	var secs float64
	for _, line := range strings.Split(string(out), "\n") {
		if i := strings.Index(line, "MEMORY "); i >= 0 {
			fmt.Sscanf(line[i:], "MEMORY heap_inuse_peak=%d vm_hwm_kib=%d seconds=%f", &heap, &hwm, &secs)
		}
	}
	if heap == 0 {
		t.Fatalf("child printed no figures:\n%s", out)
	}
	t.Logf("64 MiB image: agent peak HeapInuse %.1f MiB, VmHWM %.1f MiB, install %.1f s", float64(heap)/(1<<20), float64(hwm)/1024, secs)
	if heap > 32<<20 {
		t.Fatalf("peak heap %d MiB for a 64 MiB image: the agent is not streaming", heap>>20)
	}
	st, _ := v.Load()
	if st.Seq != 15 || st.Version != 1 {
		t.Fatalf("vault D=%d v=%d", st.Seq, st.Version)
	}
	if got, _ := e.srv.WaitAck("dev-big", time.Second, func(a keychain.Ack) bool { return a.Kind == keychain.AckInstalled }); got.Ack.ID != r.ID {
		t.Fatal("no ack")
	}
}

// TestBigImageChild is the child of TestBigImageMemory.
func TestBigImageChild(t *testing.T) {
	vp := os.Getenv("SEALCAST_CHILD_VAULT")
	if vp == "" {
		t.Skip("child of TestBigImageMemory only")
	}
	inst, err := device.NewSlotInstaller(os.Getenv("SEALCAST_CHILD_SLOTS"))
	if err != nil {
		t.Fatal(err)
	}
	v := device.NewFileVault(vp)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	a, err := device.New(device.Options{
		Vault: v, Installer: inst, BrokerURL: os.Getenv("SEALCAST_CHILD_BROKER"),
		ReconnectMin: 20 * time.Millisecond, ReconnectMax: 200 * time.Millisecond,
		OnEvent: func(e device.Event) {
			if e.Kind == device.EventConfirmed {
				cancel()
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	var peak uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		var ms runtime.MemStats
		tk := time.NewTicker(5 * time.Millisecond)
		defer tk.Stop()
		for {
			runtime.ReadMemStats(&ms)
			peak = max(peak, ms.HeapInuse)
			select {
			case <-stop:
				return
			case <-tk.C:
			}
		}
	}()
	start := time.Now()
	err = a.Run(ctx)
	close(stop)
	<-sampled
	if err != nil || a.Stats().Confirmed != 1 {
		t.Fatalf("Run = %v, stats %+v", err, a.Stats())
	}
	fmt.Printf("MEMORY heap_inuse_peak=%d vm_hwm_kib=%d seconds=%.2f\n", peak, vmHWM(), time.Since(start).Seconds())
}

func vmHWM() uint64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		var kib uint64
		if _, err := fmt.Sscanf(s.Text(), "VmHWM: %d kB", &kib); err == nil {
			return kib
		}
	}
	return 0
}

// pattern is an image of any size that is not kept anywhere: byte i is a hash of i.
type pattern struct{}

func (pattern) ReadAt(p []byte, off int64) (int, error) {
	for i := range p {
		x := uint64(off+int64(i)) * 0x9e3779b97f4a7c15
		p[i] = byte(x >> 56)
	}
	return len(p), nil
}
