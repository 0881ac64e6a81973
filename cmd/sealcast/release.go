package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"
	"github.com/schollz/progressbar/v3"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
)

func releaseCommand(e *env) *ffcli.Command {
	fs := newFlags("release", e)
	var cf clientFlags
	cf.register(fs)
	var r releaseFlags
	fs.StringVar(&r.image, "image", "", "the image file to release (required)")
	fs.Uint64Var(&r.version, "version", 0, "version of the image: 1 or more, higher than every release before (required)")
	fs.StringVar(&r.devices, "devices", "", "target these devices: serials separated by commas")
	fs.BoolVar(&r.all, "all", false, "target every provisioned device")
	fs.StringVar(&r.sel, "select", "", "target the devices with all these tags: key=value pairs separated by commas (PROTOCOL.md 12.4)")
	fs.BoolVar(&r.follow, "follow", false, "with -select or -all: devices provisioned or tagged later that match join the release while it is in progress")
	fs.UintVar(&r.chunkSize, "chunk-size", 0, fmt.Sprintf("chunk size in bytes, %d to %d (default: the service's, %d)", keychain.MinChunkSize, keychain.MaxChunkSize, keychain.DefaultChunkSize))
	fs.StringVar(&r.label, "label", "", "a name for people, e.g. 2.1.0 (at most 64 characters)")
	fs.BoolVar(&r.allowJump, "allow-jump", false, fmt.Sprintf("allow a version more than %d above the highest release's (a guard against a mistyped version)", uint64(protocol.MaxVersionJump)))
	fs.StringVar(&r.waves, "waves", "", "release the keys wave by wave: cumulative percentages or counts separated by commas, e.g. 1%,10%,50% (a last wave takes the rest; PROTOCOL.md 12.5)")
	fs.StringVar(&r.canary, "canary", "", "serials, separated by commas, that form a first wave of their own")
	fs.StringVar(&r.maxFailures, "max-failures", "", "pause the release by itself when more targets than this fail permanently: a percentage of the devices in open waves, e.g. 5%, or a count")
	fs.DurationVar(&r.soak, "soak", 0, "with -waves: how long the open waves must have settled before the next opens")
	fs.BoolVar(&r.approve, "approve", false, "with -waves: each next wave also waits for sealcast approve RELEASE")
	fs.StringVar(&r.startAt, "start-at", "", "publish no key before this time (RFC 3339, e.g. 2026-12-24T02:00:00Z)")
	fs.StringVar(&r.window, "window", "", "publish keys only inside this weekly window: DAYS HH:MM-HH:MM [ZONE], e.g. 'Mon-Fri 01:00-05:00 Europe/Berlin' (PROTOCOL.md 12.6)")
	fs.DurationVar(&r.deviceTimeout, "device-timeout", 0, "count a target that got its key and has not installed within this as timed out, toward the waves and -max-failures (its late install is still accepted)")
	fs.IntVar(&r.maxConcurrent, "max-concurrent", 0, "at no time more than this many targets hold a key they have not installed or failed for good: keys go out as others settle (0: the server's default, which counts only targets online; -1: no bound)")
	fs.BoolVar(&r.prefetch, "prefetch", false, "announce the release to every target at once, so that devices that can download it before their key does (with -start-at or -window the key activates it later; PROTOCOL.md 12.7)")
	fs.DurationVar(&r.prefetchJitter, "prefetch-jitter", protocol.DefaultPrefetchJitter, "with -prefetch: devices spread their downloads over this long")
	fs.BoolVar(&r.abortOnFailure, "abort-on-failure", false, "with -max-failures: cancel the release instead of pausing it")
	fs.DurationVar(&r.timeout, "wait-timeout", 0, "with -wait: stop waiting after this long, print the devices still pending and exit with status 3 (the release goes on)")
	fs.BoolVar(&r.wait, "wait", false, "show progress until every target installed or failed; exit non-zero if any failed or the release was cancelled")
	return &ffcli.Command{
		Name:       "release",
		ShortUsage: "sealcast release -image FILE -version V (-devices a,b,c | -all | -select k=v,...) [-follow] [-wait]",
		ShortHelp:  "release an image to devices",
		LongHelp: `Uploads an image to the service, which encrypts it once, signs its manifest, publishes
it, and wraps its key for every target device under that device's next one-time key.
Prints the release id on standard output (and nothing else there), so that
  id=$(sealcast release -image fw.bin -version 2 -all)
works in scripts.

Everything is checked before the image is sent: the file, the version (it must be higher
than every release not cancelled), and that every device named with -devices is
provisioned. A refused release creates nothing; the error names the service's code
(PROTOCOL.md 15.2), e.g. not_found or version_not_newer.

With -wait the command follows the release's status topic: a progress bar on a terminal,
a line every few seconds otherwise. Interrupting the wait does not stop the release.
-wait-timeout D stops waiting after D: the command prints the devices still pending, one a
line, on standard output after the release id (at most 1,000; the error line gives the
count) and exits with status 3. The release goes on.
` + clientHelp,
		FlagSet: fs,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return usagef("release takes no arguments (got %q); did you mean -devices?", args)
			}
			return runRelease(ctx, e, &cf, &r)
		},
	}
}

type releaseFlags struct {
	image, devices, label string
	version               uint64
	all, wait, allowJump  bool
	sel                   string
	follow                bool
	timeout               time.Duration
	waves, maxFailures    string
	canary                string
	abortOnFailure        bool
	maxConcurrent         int
	soak                  time.Duration
	approve               bool
	startAt, window       string
	deviceTimeout         time.Duration
	chunkSize             uint
	prefetch              bool
	prefetchJitter        time.Duration
}

// check validates the flags without the network and returns the request and the open
// image.
func (r *releaseFlags) check() (protocol.ReleaseCreateArgs, *os.File, int64, error) {
	a := protocol.ReleaseCreateArgs{Version: r.version, All: r.all, ChunkSize: uint32(r.chunkSize), Label: r.label, AllowJump: r.allowJump, Follow: r.follow}
	a.MaxFailures, a.AbortOnFailure, a.MaxConcurrent, a.Approve = r.maxFailures, r.abortOnFailure, r.maxConcurrent, r.approve
	if r.soak > 0 {
		a.Soak = r.soak.String()
	}
	a.Window = r.window
	if a.Prefetch = r.prefetch; r.prefetch {
		a.PrefetchJitter = r.prefetchJitter.String()
	}
	if r.deviceTimeout > 0 {
		a.DeviceTimeout = r.deviceTimeout.String()
	}
	if r.startAt != "" {
		t, err := time.Parse(time.RFC3339, r.startAt)
		if err != nil {
			return a, nil, 0, fmt.Errorf("-start-at %q: give a time such as 2026-12-24T02:00:00Z", r.startAt)
		}
		a.StartAt = &t
	}
	if r.window != "" {
		if _, err := protocol.ParseWindow(r.window); err != nil {
			return a, nil, 0, fmt.Errorf("-window: %w", err)
		}
	}
	if r.waves != "" {
		a.Waves = strings.Split(r.waves, ",")
	}
	if r.canary != "" {
		a.Canary = strings.Split(r.canary, ",")
	}
	if r.sel != "" {
		sel, err := protocol.ParseTags(r.sel)
		if err != nil {
			return a, nil, 0, fmt.Errorf("-select: %w", err)
		}
		a.Select = sel
	}
	if r.image == "" {
		return a, nil, 0, usagef("give the image with -image FILE")
	}
	if r.version < 1 {
		return a, nil, 0, usagef("give -version: 1 or more, higher than every release before")
	}
	for _, s := range strings.Split(r.devices, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		if err := keychain.CheckSerial(s); err != nil {
			return a, nil, 0, fmt.Errorf("-devices: %w", err)
		}
		a.Devices = append(a.Devices, s)
	}
	modes := 0
	for _, on := range []bool{r.all, len(a.Devices) > 0, len(a.Select) > 0} {
		if on {
			modes++
		}
	}
	switch {
	case modes > 1:
		return a, nil, 0, usagef("give one of -devices, -all or -select")
	case modes == 0:
		return a, nil, 0, usagef("give the targets: -devices a,b,c, -all, or -select key=value,...")
	case r.follow && len(a.Devices) > 0:
		return a, nil, 0, errors.New("-follow is for -all or -select")
	case r.chunkSize != 0 && (r.chunkSize < keychain.MinChunkSize || r.chunkSize > keychain.MaxChunkSize):
		return a, nil, 0, fmt.Errorf("-chunk-size %d must be from %d to %d", r.chunkSize, keychain.MinChunkSize, keychain.MaxChunkSize)
	case len(r.label) > 64:
		return a, nil, 0, fmt.Errorf("-label is %d characters; at most 64", len(r.label))
	}
	f, err := os.Open(r.image)
	if err != nil {
		return a, nil, 0, fmt.Errorf("reading the image: %w", err)
	}
	fi, err := f.Stat()
	if err == nil && !fi.Mode().IsRegular() {
		err = fmt.Errorf("%s is not a regular file", r.image)
	}
	if err == nil {
		// Read one byte to find an unreadable file (a directory, no permission) now.
		_, err = f.ReadAt(make([]byte, 1), 0)
		if errors.Is(err, io.EOF) {
			err = nil
		}
	}
	if err != nil {
		f.Close()
		return a, nil, 0, fmt.Errorf("reading the image: %w", err)
	}
	return a, f, fi.Size(), nil
}

func runRelease(ctx context.Context, e *env, cf *clientFlags, r *releaseFlags) error {
	args, img, size, err := r.check()
	if err != nil {
		return err
	}
	defer img.Close()
	op, err := cf.dial(ctx)
	if err != nil {
		return err
	}
	defer op.Close()
	if err := precheckRelease(ctx, op, args); err != nil {
		return err
	}
	res, err := op.Release(ctx, img, size, args)
	if err != nil {
		return adminError(err)
	}
	fmt.Fprintln(e.stdout, res.Release)
	fmt.Fprintf(e.stderr, "release %s: version %d, %d bytes, to %d devices\n", res.Release, args.Version, size, res.Targets)
	if !r.wait {
		return nil
	}
	wctx := ctx
	if r.timeout > 0 {
		var cancel context.CancelFunc
		wctx, cancel = context.WithTimeoutCause(ctx, r.timeout, fmt.Errorf("-wait-timeout %s passed", r.timeout))
		defer cancel()
	}
	st, err := followRelease(wctx, e, op, res.Release)
	if err != nil && r.timeout > 0 && ctx.Err() == nil && wctx.Err() != nil {
		return pendingAfterTimeout(ctx, e, op, res.Release, r.timeout)
	}
	if err != nil {
		return err
	}
	switch {
	case st.State == protocol.ReleaseCancelled:
		return fmt.Errorf("release %s was cancelled: %d of %d devices installed it", st.Release, st.Installed, st.Targets)
	case st.Failed > 0:
		return fmt.Errorf("release %s: %d of %d devices failed (sealcast devices shows why)", st.Release, st.Failed, st.Targets)
	}
	return nil
}

// pendingAfterTimeout names the devices still pending when -wait-timeout passed, on standard
// output one a line, and returns the error with exit status exitTimeout.
func pendingAfterTimeout(ctx context.Context, e *env, op *operator.Client, id keychain.ReleaseID, d time.Duration) error {
	var p protocol.ReleasePendingResult
	if err := op.Do(ctx, protocol.CmdReleasePending, protocol.ReleasePendingArgs{Release: id, Limit: 1000}, &p); err != nil {
		return exitCodeError{fmt.Errorf("release %s: not done after %s, and the pending devices are unknown: %w", id, d, adminError(err)), exitTimeout}
	}
	for _, s := range p.Pending {
		fmt.Fprintln(e.stdout, s)
	}
	more := ""
	if p.Total > len(p.Pending) {
		more = fmt.Sprintf(" (the first %d listed)", len(p.Pending))
	}
	return exitCodeError{fmt.Errorf("release %s: %d devices still pending after %s%s; the release goes on", id, p.Total, d, more), exitTimeout}
}

// precheckRelease asks the service what release.create would refuse, before the image is
// uploaded: an upload the release then refuses would sit on the service for a day.
func precheckRelease(ctx context.Context, op *operator.Client, a protocol.ReleaseCreateArgs) error {
	var list protocol.ReleaseListResult
	if err := op.Do(ctx, protocol.CmdReleaseList, nil, &list); err != nil {
		return adminError(err)
	}
	existing := make([]protocol.ReleaseVersion, len(list.Releases))
	for i, r := range list.Releases {
		existing[i] = protocol.ReleaseVersion{Release: r.Release, Version: r.Version, State: r.State}
	}
	if err := protocol.CheckVersion(a.Version, a.AllowJump, existing); err != nil {
		return adminError(err)
	}
	var unknown []string
	for _, s := range a.Devices {
		err := op.Do(ctx, protocol.CmdDeviceGet, protocol.SerialArgs{Serial: s}, nil)
		if errors.Is(err, &protocol.Error{Code: protocol.ErrNotFound}) {
			unknown = append(unknown, s)
		} else if err != nil {
			return adminError(err)
		}
	}
	if len(unknown) > 0 {
		if len(unknown) > 10 {
			unknown = append(unknown[:10], fmt.Sprintf("and %d more", len(unknown)-10))
		}
		return adminError(protocol.Errorf(protocol.ErrNotFound, "unknown devices: %s (provision them first, or leave them out)", strings.Join(unknown, ", ")))
	}
	return nil
}

// finished reports whether a release has nothing more to wait for.
func finished(st protocol.ReleaseStatus) bool {
	switch st.State {
	case protocol.ReleaseCompleted, protocol.ReleaseCancelled:
		return true
	case protocol.ReleasePublishing:
		return false
	}
	return st.Targets > 0 && st.Installed+st.Failed >= st.Targets
}

// followRelease reads a release's retained status topic until the release is finished,
// showing progress on stderr, and returns its last status.
func followRelease(ctx context.Context, e *env, op *operator.Client, id keychain.ReleaseID) (protocol.ReleaseStatus, error) {
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	var (
		mu   sync.Mutex
		last protocol.ReleaseStatus
		done bool
	)
	p := newProgress(e.stderr, id)
	err := op.Watch(wctx, []string{protocol.ReleaseStatusTopic(id)}, func(_ string, b []byte) {
		var st protocol.ReleaseStatus
		if json.Unmarshal(b, &st) != nil || st.Release != id {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if done {
			return
		}
		last = st
		p.update(st)
		if finished(st) {
			done = true
			p.finish(st)
			stop()
		}
	})
	mu.Lock()
	defer mu.Unlock()
	switch {
	case err != nil:
		return last, err
	case !done:
		done = true // no more updates after this
		p.abandon()
		return last, fmt.Errorf("stopped waiting (%v); release %s goes on: sealcast status %s", context.Cause(ctx), id, id)
	}
	return last, nil
}

// progress shows a release's progress: a bar on a terminal, plain lines otherwise.
type progress struct {
	w     io.Writer
	id    keychain.ReleaseID
	bar   *progressbar.ProgressBar // nil when w is not a terminal
	max   int
	last  string
	lastT time.Time
}

// plainEvery is how often a changed status is printed when stderr is not a terminal, and
// plainHeartbeat how often an unchanged one is, so that a long wait shows it is alive.
const (
	plainEvery     = 2 * time.Second
	plainHeartbeat = 30 * time.Second
)

func newProgress(w io.Writer, id keychain.ReleaseID) *progress {
	return &progress{w: w, id: id}
}

func (p *progress) update(st protocol.ReleaseStatus) {
	if isTerminal(p.w) {
		if p.bar == nil || p.max != max(st.Targets, 1) {
			p.max = max(st.Targets, 1)
			p.bar = progressbar.NewOptions(p.max, progressbar.OptionSetWriter(p.w), progressbar.OptionSetWidth(30),
				progressbar.OptionShowCount(), progressbar.OptionSetPredictTime(true), progressbar.OptionThrottle(100*time.Millisecond))
		}
		p.bar.Describe(fmt.Sprintf("%s %-9s failed %d", short(p.id), st.State, st.Failed))
		p.bar.Set(st.Installed)
		return
	}
	line := statusLine(st)
	if since := time.Since(p.lastT); line != p.last && since >= plainEvery || since >= plainHeartbeat {
		fmt.Fprintln(p.w, line)
		p.last, p.lastT = line, time.Now()
	}
}

func (p *progress) finish(st protocol.ReleaseStatus) {
	if p.bar != nil {
		// Exit, not Finish: Finish fills the bar, also for a cancelled release.
		p.bar.Exit()
		fmt.Fprintln(p.w)
	}
	if line := statusLine(st); line != p.last || p.bar != nil {
		fmt.Fprintln(p.w, line)
	}
}

func (p *progress) abandon() {
	if p.bar != nil {
		p.bar.Exit()
		fmt.Fprintln(p.w)
	}
}

func statusLine(st protocol.ReleaseStatus) string {
	s := fmt.Sprintf("release %s: %s, %d of %d installed, %d failed, %d pending", st.Release, st.State, st.Installed, st.Targets, st.Failed, st.Pending)
	if st.PauseReason != "" {
		s += " (by " + st.PauseReason + ")"
	}
	if len(st.Waves) > 0 {
		s += ", wave " + waveText(st)
	}
	if st.TimedOut > 0 {
		s += fmt.Sprintf(", %d timed out", st.TimedOut)
	}
	return s
}

// waveText is "2/4" with the next wave's wait, for a release with waves, else "-".
func waveText(st protocol.ReleaseStatus) string {
	if len(st.Waves) == 0 {
		return "-"
	}
	s := fmt.Sprintf("%d/%d", st.Wave, len(st.Waves))
	switch st.NextWave {
	case "soak":
		s += " (soaking until " + st.NextWaveAt.Local().Format(time.DateTime) + ")"
	case "approval":
		s += " (awaiting approval)"
	}
	return s
}

// short is the first 8 digits of a release id, enough for people and for the commands
// that take a prefix.
func short(id keychain.ReleaseID) string { return id.String()[:8] }
