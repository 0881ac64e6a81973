package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/scripts/bench/internal/procstat"
)

// scenario is one end-to-end run.
type scenario struct {
	key, title string
	devices    int
	perDevice  bool   // the baseline: one release, so one encryption, per device
	mosquitto  string // the mosquitto binary; "" for the embedded broker
	// maxConcurrent is the release's max_concurrent (0: the server's default,
	// protocol.NoBound: none).
	maxConcurrent int
	// activate, if set, creates the release with a start time that far away, and times
	// the release from that start; with prefetch the release is announced for prefetch
	// and the devices prefetch (PROTOCOL.md 12.7).
	activate time.Duration
	prefetch bool
}

// procFigures are one process's figures: CPU seconds from the release's start until the
// last device confirmed, and its peak resident set over its whole life.
type procFigures struct {
	CPU     float64 `json:"cpu_seconds"`
	PeakRSS int64   `json:"peak_rss_kib"`
	// IdleRSS is the resident set just before the release, every device connected:
	// what the connections cost without a download.
	IdleRSS int64 `json:"idle_rss_kib"`
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
	r := &scenarioRun{c: c, sc: sc, dir: dir, users: map[string]string{}}
	defer func() {
		if r.simIn != nil {
			r.simIn.Close() // the simulator exits when its standard input closes
		}
		if r.op != nil {
			r.op.Close()
		}
		for i := len(r.children) - 1; i >= 0; i-- {
			r.children[i].stop(30 * time.Second)
		}
		if err != nil {
			os.RemoveAll(filepath.Join(dir, "data")) // gigabytes after the baseline
			err = fmt.Errorf("%w (logs kept in %s)", err, dir)
		} else {
			os.RemoveAll(dir)
		}
	}()
	r.res = &result{Key: sc.key, Title: sc.title, Devices: sc.devices, ImageSize: len(img), BytesIn: -1}
	if err := r.startServers(ctx); err != nil {
		return nil, err
	}
	if err := r.startDevices(ctx); err != nil {
		return nil, err
	}
	// The operator's uploads come first and are not measured: the operator uploads each
	// image the scheme needs (one, or one per device for the baseline, since an upload
	// serves one release) before the clock starts.
	uploads, err := uploadImages(ctx, r.op, img, sc.perDevice, len(r.serials))
	if err != nil {
		return nil, err
	}
	pr, err := dialProbe(ctx, r.brokerURL, "admin", r.adminPW)
	if err != nil {
		return nil, err
	}
	defer pr.close()
	if err := r.measureRelease(ctx, pr, uploads); err != nil {
		return nil, err
	}
	if err := r.collect(ctx, pr); err != nil {
		return nil, err
	}
	if r.res.Confirmed < sc.devices {
		return r.res, fmt.Errorf("only %d of %d devices confirmed (%s)", r.res.Confirmed, sc.devices, r.res.SimSummary)
	}
	return r.res, nil
}

// scenarioRun is the state of one scenario as its steps go.
type scenarioRun struct {
	c        config
	sc       scenario
	dir      string
	res      *result
	children []*child // stopped in reverse order

	brokerURL string
	pprofPort int
	users     map[string]string // Mosquitto's accounts
	adminPW   string
	mq, srv   *child // mq is nil with the embedded broker
	op        *operator.Client

	serials   []string
	sim       *child
	simIn     io.WriteCloser // closing it lets the simulator exit
	simOut    string
	simDone   chan struct{}
	t0        time.Time // the first release.create
	releases  []keychain.ReleaseID
	bytesIn0  int64
	before    map[string]procstat.Usage
	profiling *profiler
}

// startServers starts the broker (Mosquitto, or the one embedded in serve) and the
// server, and connects the operator.
func (r *scenarioRun) startServers(ctx context.Context) error {
	brokerPort, err := procstat.FreePort()
	if err != nil {
		return err
	}
	if r.pprofPort, err = procstat.FreePort(); err != nil {
		return err
	}
	r.brokerURL = fmt.Sprintf("tcp://127.0.0.1:%d", brokerPort)
	brokerAddr := fmt.Sprintf("127.0.0.1:%d", brokerPort)
	args := []string{"serve", "-data", filepath.Join(r.dir, "data"), "-http", "", "-log-level", "warn",
		"-pprof", fmt.Sprintf("127.0.0.1:%d", r.pprofPort)}
	if r.sc.mosquitto != "" {
		r.users[updaterUser], r.users["admin"] = randomPassword(), randomPassword()
		r.adminPW = r.users["admin"]
		if err := writePasswords(r.dir, r.users, nil); err != nil {
			return err
		}
		conf, err := mosquittoConf(r.dir, brokerPort)
		if err != nil {
			return err
		}
		if r.mq, err = startChild("mosquitto", exec.Command(r.sc.mosquitto, "-c", conf), filepath.Join(r.dir, "mosquitto.log"), nil); err != nil {
			return err
		}
		r.children = append(r.children, r.mq)
		if err := waitPort(ctx, brokerAddr, r.mq); err != nil {
			return err
		}
		args = append(args, "-external-broker", r.brokerURL, "-broker-user", updaterUser, "-broker-password", r.users[updaterUser])
	} else {
		args = append(args, "-listen", brokerAddr)
	}
	if r.sc.perDevice {
		// The baseline uploads one image per device before creating any release.
		args = append(args, "-max-uploads", strconv.Itoa(r.sc.devices+1))
	}
	serveLog := filepath.Join(r.dir, "serve.log")
	if r.srv, err = startChild("sealcast serve", exec.Command(r.c.sealcast, args...), serveLog, nil); err != nil {
		return err
	}
	r.children = append(r.children, r.srv)
	if r.mq == nil {
		if err := waitPort(ctx, brokerAddr, r.srv); err != nil {
			return err
		}
		if r.adminPW, err = readAdminPassword(ctx, serveLog, r.srv); err != nil {
			return err
		}
	}
	if r.op, err = operator.Dial(ctx, operator.Options{URL: r.brokerURL, Username: "admin", Password: r.adminPW, Timeout: 5 * time.Minute}); err != nil {
		return err
	}
	return waitUpdater(ctx, r.op, r.srv)
}

// readAdminPassword reads the admin password that serve prints once, on standard error.
func readAdminPassword(ctx context.Context, serveLog string, srv *child) (string, error) {
	for {
		b, _ := os.ReadFile(serveLog)
		if m := adminPasswordRE.FindSubmatch(b); m != nil {
			return string(m[1]), nil
		} else if srv.exited() {
			return "", fmt.Errorf("sealcast serve exited: %v", srv.err)
		} else if err := sleep(ctx, 50*time.Millisecond); err != nil {
			return "", err
		}
	}
}

// startDevices provisions the devices through the admin topic and starts the simulator
// child that runs them; it returns once every device is connected.
func (r *scenarioRun) startDevices(ctx context.Context) error {
	r.serials = make([]string, r.sc.devices)
	for i := range r.serials {
		r.serials[i] = fmt.Sprintf("bench-%06d", i+1)
	}
	files, err := r.op.Provision(ctx, r.serials, 0)
	if err != nil {
		return fmt.Errorf("provisioning: %w", err)
	}
	if r.mq != nil {
		if err := writePasswords(r.dir, r.users, files); err != nil {
			return err
		}
		if err := reloadMosquitto(r.mq); err != nil {
			return err
		}
	}
	cfgPath := filepath.Join(r.dir, "sim-config.json")
	r.simOut = filepath.Join(r.dir, "sim-result.json")
	sc := simConfig{Devices: files, Out: r.simOut}
	if r.sc.prefetch {
		sc.PrefetchLimit = uint64(r.c.imageSize) * 2
	}
	b, _ := json.Marshal(sc)
	if err := os.WriteFile(cfgPath, b, 0o600); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	ready := make(chan struct{})
	r.simDone = make(chan struct{})
	var once [2]sync.Once
	simCmd := exec.Command(self, "-role", "sim", "-sim-config", cfgPath)
	if r.simIn, err = simCmd.StdinPipe(); err != nil {
		return err
	}
	connStart := time.Now()
	r.sim, err = startChild("simulator", simCmd, filepath.Join(r.dir, "sim.log"), func(line string) {
		switch line {
		case "ready":
			once[0].Do(func() { close(ready) })
		case "done":
			once[1].Do(func() { close(r.simDone) })
		}
	})
	if err != nil {
		return err
	}
	r.children = append(r.children, r.sim)
	if err := waitSignal(ctx, ready, r.sim, 10*time.Minute); err != nil {
		return fmt.Errorf("waiting for every device to connect: %w", err)
	}
	r.res.Connect = time.Since(connStart).Seconds()
	r.c.log("scenario %s: %d devices connected in %.1f s", r.sc.key, r.sc.devices, r.res.Connect)
	return nil
}

// procs are the processes whose CPU and memory the scenario measures.
func (r *scenarioRun) procs() map[string]*child {
	procs := map[string]*child{"server": r.srv, "sim": r.sim}
	if r.mq != nil {
		procs["mosquitto"] = r.mq
	}
	return procs
}

// measureRelease creates the release(s), measured from a fresh $SYS tick, and waits for
// every device to install.
func (r *scenarioRun) measureRelease(ctx context.Context, pr *probe, uploads []string) (err error) {
	r.bytesIn0 = -1
	if r.c.sysTicks {
		r.bytesIn0 = pr.freshBytesIn(ctx, time.Now())
	}
	r.before = map[string]procstat.Usage{}
	for k, p := range r.procs() {
		if r.before[k], err = procstat.Read(p.pid()); err != nil {
			return err
		}
	}
	if r.c.pprof {
		r.profiling = startProfiler(fmt.Sprintf("127.0.0.1:%d", r.pprofPort), filepath.Join(r.c.out, "pprof"), r.sc.key, r.c.pprofSeconds)
	}
	r.t0 = time.Now()
	if r.sc.activate > 0 {
		return r.measureActivation(ctx, uploads)
	}
	if r.releases, err = release(ctx, r.op, uploads, r.serials, r.sc.perDevice, uint32(r.c.chunkSize), r.sc.maxConcurrent); err != nil {
		return err
	}
	r.res.Releases = len(r.releases)
	r.res.Published = time.Since(r.t0).Seconds()
	r.c.log("scenario %s: %d release(s) created in %.1f s", r.sc.key, len(r.releases), r.res.Published)
	return r.finishRelease(ctx)
}

// measureActivation creates the release with a start time r.sc.activate away (and with
// prefetch, if the scenario prefetches), waits for the start time, and measures from
// there: the time from the keys' release to every install, and the CPU in that interval.
func (r *scenarioRun) measureActivation(ctx context.Context, uploads []string) (err error) {
	startAt := time.Now().Add(r.sc.activate)
	args := protocol.ReleaseCreateArgs{Upload: uploads[0], Version: 1, All: true, ChunkSize: uint32(r.c.chunkSize), Label: "bench",
		MaxConcurrent: protocol.NoBound, StartAt: &startAt, Prefetch: r.sc.prefetch}
	if r.sc.prefetch {
		args.PrefetchJitter = (r.sc.activate / 3).Round(time.Second).String()
	}
	var res protocol.ReleaseCreateResult
	if err := r.op.Do(ctx, protocol.CmdReleaseCreate, args, &res); err != nil {
		return err
	}
	r.releases, r.res.Releases = []keychain.ReleaseID{res.Release}, 1
	r.c.log("scenario %s: release created; keys go out at %s", r.sc.key, startAt.Format(time.TimeOnly))
	for r.sc.prefetch {
		var st protocol.ReleaseStatus
		if err := r.op.Do(ctx, protocol.CmdReleaseGet, protocol.ReleaseArgs{Release: res.Release}, &st); err != nil {
			return err
		}
		if st.Prefetched == r.sc.devices || time.Now().After(startAt) {
			r.c.log("scenario %s: %d of %d devices prefetched the release %.1f s after its creation", r.sc.key, st.Prefetched, r.sc.devices, time.Since(r.t0).Seconds())
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	time.Sleep(time.Until(startAt))
	for k, p := range r.procs() {
		if r.before[k], err = procstat.Read(p.pid()); err != nil {
			return err
		}
	}
	r.t0 = startAt
	return r.finishRelease(ctx)
}

// finishRelease waits for every device to install and reads the processes' figures.
func (r *scenarioRun) finishRelease(ctx context.Context) error {
	if err := waitSignal(ctx, r.simDone, r.sim, 0); err != nil {
		return fmt.Errorf("waiting for every device to install: %w", err)
	}
	for k, p := range r.procs() {
		after, err := procstat.Read(p.pid())
		if err != nil {
			return err
		}
		f := procFigures{CPU: after.CPU - r.before[k].CPU, PeakRSS: after.PeakRSS, IdleRSS: r.before[k].RSS}
		switch k {
		case "server":
			r.res.Server = f
		case "sim":
			r.res.Sim = f
		case "mosquitto":
			r.res.Mosquitto = &f
		}
	}
	if r.profiling != nil {
		r.res.Profiles = r.profiling.stop()
	}
	return nil
}

// collect reads what the devices saw, what the server counted and what the broker holds.
func (r *scenarioRun) collect(ctx context.Context, pr *probe) error {
	res := r.res
	var sr simResult
	if b, err := os.ReadFile(r.simOut); err != nil {
		return err
	} else if err := json.Unmarshal(b, &sr); err != nil {
		return err
	}
	res.Confirmed, res.Failed, res.SimSummary = len(sr.Confirmed), sr.Failed, sr.Summary
	for _, t := range sr.Confirmed {
		res.Times = append(res.Times, time.Unix(0, t).Sub(r.t0).Seconds())
	}
	slices.Sort(res.Times)
	n := r.sc.devices
	res.T50, res.T90, res.T100 = quantile(res.Times, n, 0.5), quantile(res.Times, n, 0.9), quantile(res.Times, n, 1)
	if r.bytesIn0 >= 0 {
		if bytes1 := pr.freshBytesIn(ctx, time.Now()); bytes1 >= 0 {
			res.BytesIn = bytes1 - r.bytesIn0
		}
	}
	var list protocol.ReleaseListResult
	if err := r.op.Do(ctx, protocol.CmdReleaseList, nil, &list); err != nil {
		return fmt.Errorf("listing releases: %w", err)
	}
	for _, rel := range list.Releases {
		res.ServerInstalled += rel.Installed
	}
	var err error
	if res.Retained, err = pr.retained(ctx, r.releases, r.serials); err != nil {
		return err
	}
	res.BrokerDisk = duBytes(filepath.Join(r.dir, "data", "broker"))
	if r.profiling != nil {
		if p, err := r.profiling.heap(ctx); err == nil {
			res.Profiles = append(res.Profiles, p)
		} else {
			r.c.log("heap profile: %v", err)
		}
	}
	return nil
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
func release(ctx context.Context, op *operator.Client, uploads, serials []string, perDevice bool, chunk uint32, maxConcurrent int) ([]keychain.ReleaseID, error) {
	if !perDevice {
		var res protocol.ReleaseCreateResult
		err := op.Do(ctx, protocol.CmdReleaseCreate, protocol.ReleaseCreateArgs{Upload: uploads[0], Version: 1, All: true, ChunkSize: chunk, Label: "bench", MaxConcurrent: maxConcurrent}, &res)
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
