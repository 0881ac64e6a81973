package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/device/simulate"
	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
)

// chromium returns the path of a headless-capable Chromium, or skips the test (fails it
// under SEALCAST_REQUIRE_TOOLS=1, as CI sets).
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("SEALCAST_REQUIRE_TOOLS") == "1" {
		t.Fatal("chromium not found (apt-get install -y chromium)")
	}
	t.Skip("chromium not found; the dashboard's browser test needs it")
	return ""
}

// screenshot saves the page to name in $SEALCAST_ARTIFACTS (else the test's temporary
// directory), as the test's artifact.
func screenshot(t *testing.T, ctx context.Context, name string) {
	t.Helper()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	dir := os.Getenv("SEALCAST_ARTIFACTS")
	if dir == "" {
		dir = t.TempDir()
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s", path)
}

// TestDashboard drives the dashboard in a real headless Chromium: the page is served with
// its Content-Security-Policy; an admin logs in over MQTT on the same origin, watches a
// release to 40 simulated devices reach 100 %, pauses a second release from the page and
// sees the state change there and in the service; a monitor logs in and sees no action.
func TestDashboard(t *testing.T) {
	if testing.Short() {
		t.Skip("a browser; skipped under -short")
	}
	chrome := chromium(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const adminPW, monitorPW, n = "dashboard-admin-password", "dashboard-monitor-password", 40
	dir := filepath.Join(t.TempDir(), "data")
	log := zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)
	s, err := startStack(ctx, stackConfig{dataDir: dir, listen: "127.0.0.1:0", httpAddr: "127.0.0.1:0",
		chainLength: 1024, adminPassword: adminPW, dashboard: true}, log)
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	monitor, err := broker.NewAccount("watcher", broker.RoleMonitor, monitorPW)
	if err != nil {
		t.Fatal(err)
	}
	if err := broker.AddAccountToFile(filepath.Join(dir, broker.AccountsFile), monitor); err != nil {
		t.Fatal(err)
	}
	base := "http://" + s.httpAddr.String() + "/"

	resp, err := http.Get(base)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "connect-src 'self'") || !strings.Contains(csp, "script-src 'self'") || !bytes.Contains(body, []byte("app.js")) {
		t.Fatalf("GET /: CSP %q, page %d bytes", csp, len(body))
	}

	op, err := operator.Dial(ctx, operator.Options{URL: s.brokerURL, Username: "admin", Password: adminPW})
	if err != nil {
		t.Fatal(err)
	}
	defer op.Close()
	serials := make([]string, n)
	for i := range serials {
		serials[i] = fmt.Sprintf("dash-%03d", i)
	}
	files, err := op.Provision(ctx, serials, 0)
	if err != nil {
		t.Fatal(err)
	}
	simCtx, stopSim := context.WithCancel(ctx)
	fleet, err := simulate.Start(simCtx, simulate.Options{Devices: files, Continuous: true, ChunkTimeout: 5 * time.Second,
		AckResend: time.Second, ReconnectMin: 50 * time.Millisecond, ReconnectMax: time.Second, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { stopSim(); fleet.Wait() }()

	alloc, cancelAlloc := chromedp.NewExecAllocator(ctx, append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chrome), chromedp.NoSandbox, chromedp.Headless, chromedp.WindowSize(1280, 900))...)
	defer cancelAlloc()
	login := func(user, pw string) (context.Context, context.CancelFunc) {
		t.Helper()
		bctx, bcancel := chromedp.NewContext(alloc)
		if err := chromedp.Do(bctx, chromedp.Navigate(base), chromedp.WaitVisible("#login"),
			chromedp.SetValue("#user", user), chromedp.SetValue("#password", pw),
			chromedp.Click("#connect"), chromedp.WaitVisible("#app"),
			chromedp.WaitVisible(`[data-fleet="devices"]`)); err != nil {
			bcancel()
			t.Fatalf("logging in as %s: %v", user, err)
		}
		return bctx, bcancel
	}
	// SEALCAST_DASHBOARD_FLEET=N provisions N more devices (not simulated: the page reads
	// aggregates and pages, so their number is what matters) and logs how long the page
	// takes from navigation to a rendered fleet, and its JavaScript heap.
	extra, _ := strconv.Atoi(os.Getenv("SEALCAST_DASHBOARD_FLEET"))
	if extra > 0 {
		for i := 0; i < extra; i += 1000 {
			var batch []string
			for j := i; j < min(i+1000, extra); j++ {
				batch = append(batch, fmt.Sprintf("fleet-%06d", j))
			}
			if _, err := op.Provision(ctx, batch, 0); err != nil {
				t.Fatal(err)
			}
		}
		start := time.Now()
		bctx, bcancel := login("admin", adminPW)
		if _, err := chromedp.Run(bctx, chromedp.Poll[bool](fmt.Sprintf(`document.querySelector('[data-fleet="devices"]').textContent === '%d' && document.querySelectorAll('#devices tbody tr').length > 0`, n+extra))); err != nil {
			t.Fatal(err)
		}
		took := time.Since(start)
		heap, _ := chromedp.Run(bctx, chromedp.Evaluate[float64](`performance.memory.usedJSHeapSize`))
		rows, _ := chromedp.Run(bctx, chromedp.Evaluate[int](`document.querySelectorAll('tr').length`))
		t.Logf("with %d devices: navigation to a rendered fleet and first device page in %v; JS heap %.1f MiB; %d table rows", n+extra, took.Round(time.Millisecond), heap/(1<<20), rows)
		bcancel()
	}
	admin, closeAdmin := login("admin", adminPW)
	defer closeAdmin()

	img := make([]byte, 3000)
	rel, err := op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{Version: 1, All: true, ChunkSize: 1024, Label: "browser"})
	if err != nil {
		t.Fatal(err)
	}
	row := fmt.Sprintf(`tr[data-release="%s"]`, rel.Release)
	var installed, devices string
	deadline := time.Now().Add(2 * time.Minute)
	for installed != fmt.Sprint(n) {
		if time.Now().After(deadline) {
			t.Fatalf("the page shows %q installed; want %d", installed, n)
		}
		if chromedp.Do(admin, chromedp.WaitVisible(row)) == nil {
			installed, _ = chromedp.Run(admin, chromedp.Text(row+" .installed"))
			devices, _ = chromedp.Run(admin, chromedp.Text(`[data-fleet="devices"]`))
		}
		time.Sleep(200 * time.Millisecond)
	}
	if devices != fmt.Sprint(n+max(extra, 0)) {
		t.Errorf("the page shows %s devices, want %d", devices, n+max(extra, 0))
	}
	// The fleet's versions: the chart counts the 40 devices at version 1 once the
	// release completed (and any extra ones at 0).
	if _, err := chromedp.Run(admin, chromedp.Poll[bool](fmt.Sprintf(`(document.querySelector('[data-version="1"]') || {textContent: ''}).textContent.endsWith('%d')`, n))); err != nil {
		t.Fatalf("the versions chart never showed %d devices at version 1: %v", n, err)
	}
	// The device page follows the rollout too.
	if _, err := chromedp.Run(admin, chromedp.Poll[bool](`(document.querySelector('tr[data-device="dash-000"] td:nth-child(3)') || {textContent: ''}).textContent === '1'`)); err != nil {
		t.Fatalf("the device page never showed dash-000 at version 1: %v", err)
	}
	// The release's page: its time-to-installed curve reaches every target.
	if err := chromedp.Do(admin, chromedp.Click(row), chromedp.WaitVisible("#release svg.curve")); err != nil {
		t.Fatalf("the release's page shows no time-to-installed curve: %v", err)
	}
	if _, err := chromedp.Run(admin, chromedp.Poll[bool](fmt.Sprintf(`document.querySelector('#release-waves').textContent.includes('%d of %d within')`, n, n))); err != nil {
		t.Fatalf("the curve never counted %d of %d: %v", n, n, err)
	}
	// A device's page: its history has the release, installed.
	history := fmt.Sprintf(`#device-history tr[data-history="%s"] .result`, rel.Release)
	if err := chromedp.Do(admin, chromedp.Click(`tr[data-device="dash-001"]`), chromedp.WaitVisible(history)); err != nil {
		t.Fatalf("the device's page shows no history: %v", err)
	}
	if res, _ := chromedp.Run(admin, chromedp.Text(history)); res != "installed" {
		t.Fatalf("the device's page shows %q for the release; want installed", res)
	}
	screenshot(t, admin, "dashboard-admin.png")
	if shot := os.Getenv("SEALCAST_DASHBOARD_SCREENSHOT"); shot != "" {
		if png, err := chromedp.Run(admin, chromedp.FullScreenshot(100)); err == nil {
			_ = os.WriteFile(shot, png, 0o644)
		}
	}

	// A release whose keys wait for a start time stays active: pause it from the page.
	later := time.Now().Add(time.Hour)
	rel2, err := op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{Version: 2, All: true, ChunkSize: 1024, StartAt: &later})
	if err != nil {
		t.Fatal(err)
	}
	row2 := fmt.Sprintf(`tr[data-release="%s"]`, rel2.Release)
	if err := chromedp.Do(admin, chromedp.WaitVisible(row2+` button[data-action="pause"]`),
		chromedp.Click(row2+` button[data-action="pause"]`),
		chromedp.WaitVisible(row2+` button[data-action="resume"]`)); err != nil {
		t.Fatalf("pausing from the page: %v", err)
	}
	st2, err := chromedp.Run(admin, chromedp.Text(row2+" .state"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(st2, "paused") {
		t.Fatalf("the page shows %q after Pause", st2)
	}
	if st, err := op.ReleaseStatus(ctx, rel2.Release); err != nil || st.State != protocol.ReleasePaused {
		t.Fatalf("the service says %+v, %v; want paused", st, err)
	}

	// A monitor watches, with no action anywhere.
	mon, closeMon := login("watcher", monitorPW)
	defer closeMon()
	if err := chromedp.Do(mon, chromedp.WaitVisible(row2)); err != nil {
		t.Fatalf("as a monitor: %v", err)
	}
	if _, err := chromedp.Run(mon, chromedp.Poll[bool](`document.querySelector('#who').textContent.includes('monitor')`)); err != nil {
		t.Fatalf("as a monitor: %v", err)
	}
	who, _ := chromedp.Run(mon, chromedp.Text("#who"))
	admins, err := chromedp.Run(mon, chromedp.Evaluate[int](`document.body.classList.contains('is-admin') ? 1 : 0`))
	if err != nil {
		t.Fatal(err)
	}
	visibleButtons, err := chromedp.Run(mon, chromedp.Evaluate[int](`[...document.querySelectorAll('button[data-action]')].filter(b => b.offsetParent !== null).length`))
	if err != nil {
		t.Fatal(err)
	}
	if admins != 0 || visibleButtons != 0 {
		t.Fatalf("a monitor (%q) sees %d action buttons (admin class %d); want none", who, visibleButtons, admins)
	}
	screenshot(t, mon, "dashboard-monitor.png")
}
