package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sync"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
)

// scenario is one end-to-end run.
type scenario struct {
	key, title string
	devices    int
	perDevice  bool   // the baseline: one release, so one encryption, per device
	mosquitto  string // the mosquitto binary; "" for the embedded broker
}

// procFigures are one process's figures: CPU seconds from the release's start until the
// last device confirmed, and its peak resident set over its whole life.
type procFigures struct {
	CPU     float64 `json:"cpu_seconds"`
	PeakRSS int64   `json:"peak_rss_kib"`
}

// result is what one scenario measured. Times are seconds from the first release.create (the image is uploaded before).
type result struct {
	Key       string  `json:"key"`
	Title     string  `json:"title"`
	Devices   int     `json:"devices"`
	ImageSize int     `json:"image_size"`
	Releases  int     `json:"releases"`
	Connect   float64 `json:"connect_seconds"` // until every device was connected

	Confirmed       int       `json:"confirmed"`        // devices that saw their receipt
	Failed          int       `json:"failed"`           // devices whose update failed
	ServerInstalled int       `json:"server_installed"` // installs the server counted
	Published       float64   `json:"published"`        // until the last release.create replied
	T50             float64   `json:"t50"`
	T90             float64   `json:"t90"`
	T100            float64   `json:"t100"` // 0 if not every device confirmed
	Times           []float64 `json:"times"`

	Server    procFigures  `json:"server"`
	Sim       procFigures  `json:"simulator"`
	Mosquitto *procFigures `json:"mosquitto,omitempty"`

	BytesIn    int64           `json:"bytes_in"`    // received by the broker during the release; -1 unknown
	BrokerDisk int64           `json:"broker_disk"` // bytes in the embedded broker's store at the end
	Retained   retainedFigures `json:"retained"`
	SimSummary string          `json:"sim_summary"`
	Profiles   []string        `json:"profiles,omitempty"`
}

var adminPasswordRE = regexp.MustCompile(`SEALCAST_PASSWORD='([^']+)'`)

// runScenario starts the processes of one scenario, runs the release and stops them.
func runScenario(ctx context.Context, c config, sc scenario, img []byte) (res *result, err error) {
	dir, err := os.MkdirTemp("", "sealcast-bench-"+sc.key+"-")
	if err != nil {
		return nil, err
	}
	var children []*child
	defer func() {
		for i := len(children) - 1; i >= 0; i-- {
			children[i].stop(30 * time.Second)
		}
		if err != nil {
			os.RemoveAll(filepath.Join(dir, "data")) // gigabytes after the baseline
			err = fmt.Errorf("%w (logs kept in %s)", err, dir)
		} else {
			os.RemoveAll(dir)
		}
	}()
	res = &result{Key: sc.key, Title: sc.title, Devices: sc.devices, ImageSize: len(img), BytesIn: -1}

	// 1. The broker (Mosquitto, or the one embedded in serve) and the server.
	brokerPort, err := freePort()
	if err != nil {
		return nil, err
	}
	pprofPort, err := freePort()
	if err != nil {
		return nil, err
	}
	brokerURL := fmt.Sprintf("tcp://127.0.0.1:%d", brokerPort)
	brokerAddr := fmt.Sprintf("127.0.0.1:%d", brokerPort)
	args := []string{"serve", "-data", filepath.Join(dir, "data"), "-http", "", "-log-level", "warn",
		"-pprof", fmt.Sprintf("127.0.0.1:%d", pprofPort)}
	adminPW := ""
	var mq *child
	users := map[string]string{}
	if sc.mosquitto != "" {
		users[updaterUser], users["admin"] = randomPassword(), randomPassword()
		adminPW = users["admin"]
		if err := writePasswords(dir, users, nil); err != nil {
			return nil, err
		}
		conf, err := mosquittoConf(dir, brokerPort)
		if err != nil {
			return nil, err
		}
		if mq, err = startChild("mosquitto", exec.Command(sc.mosquitto, "-c", conf), filepath.Join(dir, "mosquitto.log"), nil); err != nil {
			return nil, err
		}
		children = append(children, mq)
		if err := waitPort(ctx, brokerAddr, mq); err != nil {
			return nil, err
		}
		args = append(args, "-broker", brokerURL, "-broker-user", updaterUser, "-broker-password", users[updaterUser])
	} else {
		args = append(args, "-listen", brokerAddr)
	}
	serveLog := filepath.Join(dir, "serve.log")
	srv, err := startChild("sealcast serve", exec.Command(c.sealcast, args...), serveLog, nil)
	if err != nil {
		return nil, err
	}
	children = append(children, srv)
	if mq == nil {
		if err := waitPort(ctx, brokerAddr, srv); err != nil {
			return nil, err
		}
		// serve prints the admin password it created once, on standard error.
		for adminPW == "" {
			b, _ := os.ReadFile(serveLog)
			if m := adminPasswordRE.FindSubmatch(b); m != nil {
				adminPW = string(m[1])
			} else if srv.exited() {
				return nil, fmt.Errorf("sealcast serve exited: %v", srv.err)
			} else if err := sleep(ctx, 50*time.Millisecond); err != nil {
				return nil, err
			}
		}
	}
	op, err := operator.Dial(ctx, operator.Options{URL: brokerURL, Username: "admin", Password: adminPW, Timeout: 5 * time.Minute})
	if err != nil {
		return nil, err
	}
	defer op.Close()
	if err := waitUpdater(ctx, op, srv); err != nil {
		return nil, err
	}

	// 2. Devices: provisioned through the admin topic, run by the simulator child.
	serials := make([]string, sc.devices)
	for i := range serials {
		serials[i] = fmt.Sprintf("bench-%06d", i+1)
	}
	files, err := op.Provision(ctx, serials, 0)
	if err != nil {
		return nil, fmt.Errorf("provisioning: %w", err)
	}
	if mq != nil {
		if err := writePasswords(dir, users, files); err != nil {
			return nil, err
		}
		if err := reloadMosquitto(mq); err != nil {
			return nil, err
		}
	}
	cfgPath := filepath.Join(dir, "sim-config.json")
	simOut := filepath.Join(dir, "sim-result.json")
	b, _ := json.Marshal(simConfig{Devices: files, Out: simOut})
	if err := os.WriteFile(cfgPath, b, 0o600); err != nil {
		return nil, err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	ready, done := make(chan struct{}), make(chan struct{})
	var once [2]sync.Once
	simCmd := exec.Command(self, "-role", "sim", "-sim-config", cfgPath)
	simIn, err := simCmd.StdinPipe() // closing it lets the child exit
	if err != nil {
		return nil, err
	}
	defer simIn.Close()
	connStart := time.Now()
	sim, err := startChild("simulator", simCmd, filepath.Join(dir, "sim.log"), func(line string) {
		switch line {
		case "ready":
			once[0].Do(func() { close(ready) })
		case "done":
			once[1].Do(func() { close(done) })
		}
	})
	if err != nil {
		return nil, err
	}
	children = append(children, sim)
	if err := waitSignal(ctx, ready, sim, 10*time.Minute); err != nil {
		return nil, fmt.Errorf("waiting for every device to connect: %w", err)
	}
	res.Connect = time.Since(connStart).Seconds()
	c.log("scenario %s: %d devices connected in %.1f s", sc.key, sc.devices, res.Connect)

	// The operator's uploads come first and are not measured: the operator uploads each
	// image the scheme needs (one, or one per device for the baseline, since an upload
	// serves one release) before the clock starts.
	uploads, err := uploadImages(ctx, op, img, sc.perDevice, len(serials))
	if err != nil {
		return nil, err
	}

	// 3. The release, measured from a fresh $SYS tick.
	pr, err := dialProbe(ctx, brokerURL, "admin", adminPW)
	if err != nil {
		return nil, err
	}
	defer pr.close()
	bytes0 := int64(-1)
	if c.sysTicks {
		bytes0 = pr.freshBytesIn(ctx, time.Now())
	}
	procs := map[string]*child{"server": srv, "sim": sim}
	if mq != nil {
		procs["mosquitto"] = mq
	}
	before := map[string]usage{}
	for k, p := range procs {
		if before[k], err = readUsage(p.pid()); err != nil {
			return nil, err
		}
	}
	var prof *profiler
	if c.pprof {
		prof = startProfiler(fmt.Sprintf("127.0.0.1:%d", pprofPort), filepath.Join(c.out, "pprof"), sc.key, c.pprofSeconds)
	}
	t0 := time.Now()
	ids, err := release(ctx, op, uploads, serials, sc.perDevice, uint32(c.chunkSize))
	if err != nil {
		return nil, err
	}
	res.Releases = len(ids)
	res.Published = time.Since(t0).Seconds()
	c.log("scenario %s: %d release(s) created in %.1f s", sc.key, len(ids), res.Published)
	if err := waitSignal(ctx, done, sim, 0); err != nil {
		return nil, fmt.Errorf("waiting for every device to install: %w", err)
	}
	after := map[string]usage{}
	for k, p := range procs {
		if after[k], err = readUsage(p.pid()); err != nil {
			return nil, err
		}
	}
	fig := func(k string) procFigures {
		return procFigures{CPU: after[k].CPU - before[k].CPU, PeakRSS: after[k].PeakRSS}
	}
	res.Server, res.Sim = fig("server"), fig("sim")
	if mq != nil {
		f := fig("mosquitto")
		res.Mosquitto = &f
	}
	if prof != nil {
		res.Profiles = prof.stop()
	}

	// 4. What the devices saw, what the server counted, what the broker holds.
	var sr simResult
	if b, err := os.ReadFile(simOut); err != nil {
		return nil, err
	} else if err := json.Unmarshal(b, &sr); err != nil {
		return nil, err
	}
	res.Confirmed, res.Failed, res.SimSummary = len(sr.Confirmed), sr.Failed, sr.Summary
	for _, t := range sr.Confirmed {
		res.Times = append(res.Times, time.Unix(0, t).Sub(t0).Seconds())
	}
	slices.Sort(res.Times)
	res.T50, res.T90, res.T100 = quantile(res.Times, sc.devices, 0.5), quantile(res.Times, sc.devices, 0.9), quantile(res.Times, sc.devices, 1)
	if bytes0 >= 0 {
		if bytes1 := pr.freshBytesIn(ctx, time.Now()); bytes1 >= 0 {
			res.BytesIn = bytes1 - bytes0
		}
	}
	var list protocol.ReleaseListResult
	if err := op.Do(ctx, protocol.CmdReleaseList, nil, &list); err != nil {
		return nil, fmt.Errorf("listing releases: %w", err)
	}
	for _, r := range list.Releases {
		res.ServerInstalled += r.Installed
	}
	if res.Retained, err = pr.retained(ctx, ids, serials); err != nil {
		return nil, err
	}
	res.BrokerDisk = duBytes(filepath.Join(dir, "data", "broker"))
	if prof != nil {
		if p, err := prof.heap(ctx); err == nil {
			res.Profiles = append(res.Profiles, p)
		} else {
			c.log("heap profile: %v", err)
		}
	}
	if res.Confirmed < sc.devices {
		return res, fmt.Errorf("only %d of %d devices confirmed (%s)", res.Confirmed, sc.devices, sr.Summary)
	}
	return res, nil
}

// uploadImages uploads the image once for the Sealcast release, or once per device for
// the baseline (an upload serves one release, and the baseline needs one per device).
func uploadImages(ctx context.Context, op *operator.Client, img []byte, perDevice bool, devices int) ([]string, error) {
	n := 1
	if perDevice {
		n = devices
	}
	ups := make([]string, n)
	for i := range ups {
		up, err := op.Upload(ctx, bytes.NewReader(img), int64(len(img)))
		if err != nil {
			return nil, fmt.Errorf("uploading: %w", err)
		}
		ups[i] = up
	}
	return ups, nil
}

// release creates one release for every device (the Sealcast way), or one release per
// device (the baseline: each creates its own content key and encrypts and retains the
// whole image again). The baseline's requests go one after another: the server handles
// admin requests in order anyway, and versions must rise.
func release(ctx context.Context, op *operator.Client, uploads, serials []string, perDevice bool, chunk uint32) ([]keychain.ReleaseID, error) {
	if !perDevice {
		var res protocol.ReleaseCreateResult
		err := op.Do(ctx, protocol.CmdReleaseCreate, protocol.ReleaseCreateArgs{Upload: uploads[0], Version: 1, All: true, ChunkSize: chunk, Label: "bench"}, &res)
		return []keychain.ReleaseID{res.Release}, err
	}
	ids := make([]keychain.ReleaseID, len(serials))
	for i := range serials {
		var res protocol.ReleaseCreateResult
		// Versions only go up across releases: device i gets version i+1, and every device
		// counts as done at version 1 or later.
		a := protocol.ReleaseCreateArgs{Upload: uploads[i], Version: uint64(i + 1), Devices: serials[i : i+1], ChunkSize: chunk, Label: "per-device"}
		if err := op.Do(ctx, protocol.CmdReleaseCreate, a, &res); err != nil {
			return nil, fmt.Errorf("release for %s: %w", serials[i], err)
		}
		ids[i] = res.Release
	}
	return ids, nil
}

// waitUpdater waits until the updater answers admin requests.
func waitUpdater(ctx context.Context, op *operator.Client, srv *child) error {
	for {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err := op.Do(rctx, protocol.CmdReleaseList, nil, nil)
		cancel()
		if err == nil {
			return nil
		}
		if srv.exited() {
			return fmt.Errorf("sealcast serve exited: %v", srv.err)
		}
		if ctx.Err() != nil {
			return fmt.Errorf("the updater did not answer: %w", err)
		}
	}
}

// waitSignal waits for ch, failing if the child exits first or limit (0: none) passes.
func waitSignal(ctx context.Context, ch chan struct{}, c *child, limit time.Duration) error {
	var timeout <-chan time.Time
	if limit > 0 {
		t := time.NewTimer(limit)
		defer t.Stop()
		timeout = t.C
	}
	select {
	case <-ch:
		return nil
	case <-c.done:
		select {
		case <-ch:
			return nil
		default:
		}
		return fmt.Errorf("%s exited: %v", c.name, c.err)
	case <-timeout:
		return fmt.Errorf("no signal from %s after %v", c.name, limit)
	case <-ctx.Done():
		return ctx.Err()
	}
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// quantile returns the time by which frac of n devices had confirmed, 0 if they did not.
func quantile(sorted []float64, n int, frac float64) float64 {
	need := int(frac*float64(n) + 0.999999)
	if need < 1 || need > len(sorted) {
		return 0
	}
	return sorted[need-1]
}

// duBytes adds up the sizes of the files under dir.
func duBytes(dir string) int64 {
	var n int64
	filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

// makeImage returns a deterministic pseudo-random image (incompressible, like firmware).
func makeImage(size int) []byte {
	img := make([]byte, size)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range img {
		img[i] = byte(r.Uint32())
	}
	return img
}
