package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/mattn/go-isatty"
	"github.com/peterbourgon/ff/v3/ffcli"
	"github.com/rs/zerolog"
	"github.com/schollz/progressbar/v3"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/device/simulate"
	"github.com/sealcast/sealcast/internal/atomicfile"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
)

type simConfig struct {
	broker, user, password string
	devices                int
	devicesSet             bool
	prefix, state, files   string
	chainLength            uint
	until                  uint64
	timeout                time.Duration
	opts                   simulate.Options // faults and agent settings
}

func simulateCommand(e *env) *ffcli.Command {
	fs := newFlags("simulate", e)
	var c simConfig
	fs.StringVar(&c.broker, "broker", "tcp://127.0.0.1:1883", "MQTT broker URL: for provisioning and for every device (replaces the device files' URL)")
	fs.StringVar(&c.user, "user", "admin", "admin account, to provision devices")
	fs.StringVar(&c.password, "password", "", "admin password, to provision devices (the first sealcast serve prints it)")
	fs.IntVar(&c.devices, "devices", 100, "number of devices: <prefix>00001, <prefix>00002, ... (with -files: at most this many, default all)")
	fs.StringVar(&c.prefix, "prefix", "sim-", "serial prefix of the devices")
	fs.StringVar(&c.state, "state", "", "keep device files and vaults in this directory: missing devices are provisioned once, a restarted simulator continues their sequence numbers")
	fs.StringVar(&c.files, "files", "", "run the device files (*.json) in this directory without provisioning; vaults in memory")
	fs.UintVar(&c.chainLength, "chain-length", 0, "key chain length of provisioned devices (default: the server's)")
	fs.Uint64Var(&c.until, "until-version", 0, "exit 0 once every device confirmed this version or newer, 1 if a device failed for good or -timeout passed (default: run until interrupted, installing every release)")
	fs.DurationVar(&c.timeout, "timeout", 0, "stop after this long (default: no limit)")
	fs.Float64Var(&c.opts.DropFraction, "drop", 0, "fraction of devices that drop their connection in the middle of each download")
	fs.Float64Var(&c.opts.KillFraction, "kill", 0, "fraction of devices that lose power during each update: mid-install, after the install, or after the vault write")
	fs.DurationVar(&c.opts.AckDelay, "ack-delay", 0, "delay every device's first ack publication")
	fs.Var((*shareFlag)(&c.opts.UnhealthyFraction), "unhealthy", "share of devices (5% or 0.05) on which every new image fails its health check on trial: they go back and report unhealthy")
	fs.Uint64Var(&c.opts.PrefetchLimit, "prefetch-limit", 0, "every device prefetches releases announced for prefetch, keeping up to this many bytes in memory (0: no prefetch)")
	fs.Float64Var(&c.opts.CrashInTrialFraction, "crash-in-trial", 0, "fraction of devices that lose power once per release while the new image runs on trial, before its health check")
	fs.IntVar(&c.opts.Window, "window", 4, "chunk subscriptions open at once per device, 1 to 64")
	fs.DurationVar(&c.opts.ChunkTimeout, "chunk-timeout", 30*time.Second, "fetch the manifest or a chunk again after waiting this long")
	fs.Uint64Var(&c.opts.Seed, "seed", 1, "seed of the fault draw (the same seed, serials and releases give the same faults)")
	fs.DurationVar(&c.opts.StartSpread, "start-spread", time.Second, "spread the devices' first connections over this long")
	return &ffcli.Command{
		Name:       "simulate",
		ShortUsage: "sealcast simulate -broker URL -password PW -devices N [-state DIR] [-until-version V] [flags]",
		ShortHelp:  "run a fleet of simulated devices over real MQTT connections",
		LongHelp: strings.TrimSpace(`
Runs N device agents in one process, each with its own MQTT connection, vault and key
chain. They install (hash and verify) every release the server wraps for them and ack it,
exactly like real devices.

Devices come from one of three places:
  -state DIR   device files and vaults in DIR (<serial>.json, <serial>.vault). Devices
               missing there are provisioned through the admin topic (-user, -password)
               and written; a later run reuses them and continues their counters.
  -files DIR   existing device files (*.json), nothing provisioned, vaults in memory.
  neither      N devices provisioned for this run, vaults in memory: their serials must
               be new on the server (use another -prefix, or -state, for a second run).

With -until-version V it exits 0 once every device has confirmed version V or newer, and 1
when a device failed for good (a report code the agent does not retry) or -timeout passed.
Without it, it runs until SIGINT or SIGTERM. Either way it ends with a summary.

Faults are drawn per device and release from -seed: -drop, -kill and -crash-in-trial
fractions, -ack-delay; -unhealthy devices are drawn once, and fail every health check.`),
		FlagSet: fs,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return usagef("simulate takes no arguments (got %q); flags go before them", args)
			}
			fs.Visit(func(f *flag.Flag) { c.devicesSet = c.devicesSet || f.Name == "devices" })
			return runSimulate(ctx, e, c)
		},
	}
}

// shareFlag is a share of devices, given as a percentage ("5%") or a fraction ("0.05").
type shareFlag float64

func (f *shareFlag) String() string { return strconv.FormatFloat(float64(*f)*100, 'g', -1, 64) + "%" }

func (f *shareFlag) Set(s string) error {
	v, err := strconv.ParseFloat(strings.TrimSuffix(s, "%"), 64)
	if strings.HasSuffix(s, "%") {
		v /= 100
	}
	if err != nil || v < 0 || v > 1 {
		return fmt.Errorf("%q is not a share of devices such as 5%% or 0.05", s)
	}
	*f = shareFlag(v)
	return nil
}

func (c *simConfig) check() error {
	switch {
	case c.devices < 1 && !(c.files != "" && !c.devicesSet):
		return usagef("-devices %d: need at least one device", c.devices)
	case c.state != "" && c.files != "":
		return usagef("give -state or -files, not both: -state provisions what is missing and keeps vaults, -files only runs existing device files")
	case c.opts.DropFraction < 0 || c.opts.DropFraction > 1:
		return usagef("-drop %v is not a fraction between 0 and 1", c.opts.DropFraction)
	case c.opts.KillFraction < 0 || c.opts.KillFraction > 1:
		return usagef("-kill %v is not a fraction between 0 and 1", c.opts.KillFraction)
	case c.opts.CrashInTrialFraction < 0 || c.opts.CrashInTrialFraction > 1:
		return usagef("-crash-in-trial %v is not a fraction between 0 and 1", c.opts.CrashInTrialFraction)
	case c.opts.Window < 1 || c.opts.Window > 64:
		return usagef("-window %d is outside 1..64", c.opts.Window)
	case c.broker == "":
		return usagef("-broker is empty: give the broker's URL, e.g. tcp://127.0.0.1:1883")
	}
	if err := checkSerialPrefix(c.prefix); err != nil {
		return err
	}
	return nil
}

// checkSerialPrefix checks that prefix+digits is a valid serial [SC-2.1].
func checkSerialPrefix(prefix string) error {
	if err := keychain.CheckSerial(prefix + "00001"); err != nil {
		return usagef("-prefix %q does not make valid serials: %w", prefix, err)
	}
	return nil
}

func runSimulate(ctx context.Context, e *env, c simConfig) error {
	if err := c.check(); err != nil {
		return err
	}
	log := e.logger()
	if c.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.timeout)
		defer cancel()
	}
	runCtx := ctx // done on SIGINT, SIGTERM or -timeout

	o := c.opts
	o.BrokerURL = c.broker
	o.TargetVersion = c.until
	o.Continuous = c.until == 0
	// Agents log only errors unless asked for debug: a fleet at info level drowns the
	// progress in "connected" lines.
	o.Logger = log.Level(max(zerolog.ErrorLevel, log.GetLevel()))
	if log.GetLevel() <= zerolog.DebugLevel {
		o.Logger = log
	}
	where := "memory"
	var err error
	switch {
	case c.state != "":
		o.Vaults, err = simStateDevices(ctx, c, log)
		where = c.state
	case c.files != "":
		o.Devices, err = simFileDevices(c)
	default:
		o.Devices, err = simProvision(ctx, c, log, nil, nil)
	}
	if err != nil {
		return err
	}
	n := len(o.Devices) + len(o.Vaults)
	goal := "simulating: every device installs every release, until interrupted"
	if !o.Continuous {
		goal = fmt.Sprintf("simulating until every device confirmed version %d or newer", c.until)
	}
	log.Info().Int("devices", n).Str("broker", c.broker).Str("vaults", where).Msg(goal)

	fl, err := simulate.Start(ctx, o)
	if err != nil {
		return err
	}
	stopProgress := simShowProgress(e, fl, log, c.broker)
	sum, werr := fl.Wait()
	stopProgress()
	simPrintSummary(e.stdout, c, sum, where)
	if werr != nil {
		return werr
	}
	if o.Continuous {
		return nil
	}
	switch {
	case sum.Confirmed == sum.Devices:
		return nil
	case sum.FailedForGood > 0:
		return fmt.Errorf("%d of %d devices failed for good (%s); %d confirmed version %d or newer", sum.FailedForGood, sum.Devices, simCodes(sum.Codes), sum.Confirmed, c.until)
	case errors.Is(runCtx.Err(), context.DeadlineExceeded):
		return fmt.Errorf("-timeout %v passed: %d of %d devices confirmed version %d or newer", c.timeout, sum.Confirmed, sum.Devices, c.until)
	default:
		return fmt.Errorf("interrupted: %d of %d devices confirmed version %d or newer", sum.Confirmed, sum.Devices, c.until)
	}
}

func simSerial(prefix string, i int) string { return fmt.Sprintf("%s%05d", prefix, i+1) }

// simStateDevices opens or creates the vaults of devices 1..N in c.state, provisioning
// the devices that have neither a vault nor a device file there.
func simStateDevices(ctx context.Context, c simConfig, log zerolog.Logger) ([]device.Vault, error) {
	if err := os.MkdirAll(c.state, 0o700); err != nil {
		return nil, fmt.Errorf("creating -state directory: %w", err)
	}
	vaults := make([]device.Vault, c.devices)
	var missing []string
	reused := 0
	for i := range vaults {
		v, err := simOpenVault(c.state, simSerial(c.prefix, i))
		switch {
		case err == nil:
			vaults[i] = v
			reused++
		case errors.Is(err, os.ErrNotExist):
			missing = append(missing, simSerial(c.prefix, i))
		default:
			return nil, err
		}
	}
	if len(missing) > 0 {
		write := func(f protocol.DeviceFile) error {
			return simWriteDeviceFile(filepath.Join(c.state, f.Serial+".json"), f)
		}
		if _, err := simProvision(ctx, c, log, missing, write); err != nil {
			return nil, err
		}
		for i, v := range vaults {
			if v != nil {
				continue
			}
			fv, err := simOpenVault(c.state, simSerial(c.prefix, i))
			if err != nil {
				return nil, err
			}
			vaults[i] = fv
		}
		log.Info().Int("provisioned", len(missing)).Int("reused", reused).Str("state", c.state).Msg("devices ready")
	} else {
		log.Info().Int("reused", reused).Str("state", c.state).Msg("devices ready; vaults continue where they were")
	}
	return vaults, nil
}

// simOpenVault opens (creating it from the device file if needed) the vault of serial
// in dir, and checks that it is that device's.
func simOpenVault(dir, serial string) (*device.FileVault, error) {
	v, err := openDeviceVault(filepath.Join(dir, serial+".json"), "", zerolog.Nop())
	if err != nil {
		return nil, err
	}
	st, err := v.Load()
	if err != nil {
		return nil, err
	}
	if st.Serial != serial {
		return nil, fmt.Errorf("vault %s holds device %q, not %q: the -state directory was edited by hand", v.Path(), st.Serial, serial)
	}
	return v, nil
}

// simFileDevices reads the device files in c.files, sorted by name.
func simFileDevices(c simConfig) ([]protocol.DeviceFile, error) {
	names, err := filepath.Glob(filepath.Join(c.files, "*.json"))
	if err != nil {
		return nil, err
	}
	slices.Sort(names)
	if c.devicesSet {
		if len(names) < c.devices {
			return nil, fmt.Errorf("-files %s holds %d device files (*.json), -devices asks for %d", c.files, len(names), c.devices)
		}
		names = names[:c.devices]
	}
	if len(names) == 0 {
		return nil, usagef("-files %s holds no device files (*.json)", c.files)
	}
	files := make([]protocol.DeviceFile, len(names))
	for i, name := range names {
		if files[i], err = readDeviceFileJSON(name); err != nil {
			return nil, err
		}
	}
	return files, nil
}

// simProvision provisions serials (default: devices 1..N) through the admin topic. Each
// batch's device files go to write, if set, as soon as they arrive, so a failure later
// loses none.
func simProvision(ctx context.Context, c simConfig, log zerolog.Logger, serials []string, write func(protocol.DeviceFile) error) ([]protocol.DeviceFile, error) {
	if serials == nil {
		for i := range c.devices {
			serials = append(serials, simSerial(c.prefix, i))
		}
	}
	if c.password == "" {
		return nil, usagef("%d devices need provisioning, which needs the admin password: give -password or SEALCAST_PASSWORD (the first sealcast serve prints it)", len(serials))
	}
	op, err := simAdmin(ctx, c, log)
	if err != nil {
		return nil, err
	}
	defer op.Close()
	start := time.Now()
	var files []protocol.DeviceFile
	const batch = 1000
	for i := 0; i < len(serials); i += batch {
		got, err := op.Provision(ctx, serials[i:min(i+batch, len(serials))], uint32(c.chainLength))
		for _, f := range got {
			if write == nil {
				break
			}
			if werr := write(f); werr != nil {
				return nil, fmt.Errorf("writing the device file of %s: %w", f.Serial, werr)
			}
		}
		files = append(files, got...)
		if errors.Is(err, &protocol.Error{Code: protocol.ErrConflict}) {
			last := serials[min(i+batch, len(serials))-1]
			forget := fmt.Sprintf("sealcast deprovision %s ... %s (every serial of the earlier run, which also takes them out of releases in progress)", serials[i], last)
			hint := "their device files are lost with the earlier run's memory vaults: use another -prefix, -state DIR to keep devices across runs, or forget them: " + forget
			if c.state != "" {
				hint = "their device files are not in " + c.state + ": use another -prefix or -state directory, or forget them: " + forget
			}
			return nil, exitCodeError{fmt.Errorf("provisioning %s...: the server already has some of these serials (%v); %s", serials[i], err, hint), exitConflict}
		}
		if err != nil {
			return nil, fmt.Errorf("provisioning: %w", err)
		}
	}
	log.Info().Int("devices", len(files)).Dur("took", time.Since(start)).Msg("provisioned")
	return files, nil
}

// simAdmin connects as the admin and waits until the updater answers, for up to a
// minute: in a compose file the simulator may start before the server is ready. A refused
// password fails at once.
func simAdmin(ctx context.Context, c simConfig, log zerolog.Logger) (*operator.Client, error) {
	deadline := time.Now().Add(time.Minute)
	for waiting := false; ; waiting = true {
		op, err := operator.Dial(ctx, operator.Options{URL: c.broker, Username: c.user, Password: c.password})
		if err != nil {
			err = exitCodeError{err, exitConnect}
		}
		if err == nil {
			pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			err = op.Do(pctx, protocol.CmdReleaseList, nil, nil) // harmless, unlike a provision sent twice
			cancel()
			if err == nil {
				return op, nil
			}
			op.Close()
			if ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
				err = operator.ErrNoReply
			}
		}
		retry := errors.Is(err, packets.ErrorNetworkError) || errors.Is(err, operator.ErrNoReply)
		if !retry || ctx.Err() != nil || time.Now().After(deadline) {
			return nil, err
		}
		if !waiting {
			log.Info().Str("broker", c.broker).Err(err).Msg("waiting for the server")
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// simWriteDeviceFile writes a device file (mode 0600: it holds the unit data) through a
// temporary file and a rename, so it is never half written.
func simWriteDeviceFile(path string, f protocol.DeviceFile) error {
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(path, append(b, '\n'), 0o600)
}

// simShowProgress shows the fleet's progress on standard error until the returned
// function is called: a bar on a terminal, otherwise a line every 5 s when something
// changed.
func simShowProgress(e *env, fl *simulate.Fleet, log zerolog.Logger, broker string) (stop func()) {
	f, ok := e.stderr.(*os.File)
	tty := ok && isatty.IsTerminal(f.Fd())
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		every := 5 * time.Second
		var bar *progressbar.ProgressBar
		if tty {
			every = 200 * time.Millisecond
		}
		t := time.NewTicker(every)
		defer t.Stop()
		var last string
		warned := false
		// show prints the progress; final is the last time, after the fleet stopped (its
		// devices are offline because it stopped, which is no reason to warn).
		show := func(final bool) {
			p := fl.Progress()
			if !final && p.Online == 0 && p.Elapsed > 20*time.Second && !warned {
				// The agents log connection failures only at debug level.
				log.Warn().Str("broker", broker).Msg("no device is connected: check -broker, that the server runs, and that these device files belong to it (-log-level debug shows why)")
				warned = true
			}
			desc := "waiting for a release"
			if p.Version > 0 {
				desc = fmt.Sprintf("v%d confirmed", p.Version)
			}
			if tty {
				if bar == nil {
					bar = progressbar.NewOptions(p.Devices, progressbar.OptionSetWriter(e.stderr),
						progressbar.OptionSetWidth(30), progressbar.OptionShowCount(), progressbar.OptionSetElapsedTime(true))
				}
				bar.Describe(fmt.Sprintf("%s (%d online, %d failed, %d reconnects)", desc, p.Online, p.Failed, p.Reconnects))
				bar.Set(p.Confirmed)
				return
			}
			line := fmt.Sprintf("%s: %d/%d, %d online, %d failed, %d installs, %d chunk fetches, %d reconnects, %d drops, %d kills",
				desc, p.Confirmed, p.Devices, p.Online, p.Failed, p.Installs, p.ChunkFetches, p.Reconnects, p.Drops, p.Kills)
			if line != last {
				fmt.Fprintf(e.stderr, "simulate %s: %s\n", p.Elapsed.Round(time.Second), line)
				last = line
			}
		}
		for {
			select {
			case <-quit:
				show(true)
				if bar != nil {
					bar.Finish()
					fmt.Fprintln(e.stderr)
				}
				return
			case <-t.C:
				show(false)
			}
		}
	}()
	return func() {
		close(quit)
		<-done
	}
}

func simPrintSummary(w io.Writer, c simConfig, s simulate.Summary, where string) {
	pct := func(v simulate.VersionSummary, frac float64, d time.Duration) string {
		if !v.Reached(frac, s.Devices) {
			return "-"
		}
		return d.Round(time.Millisecond).String()
	}
	times := func(v simulate.VersionSummary) string {
		return pct(v, .5, v.T50) + " / " + pct(v, .9, v.T90) + " / " + pct(v, 1, v.T100)
	}
	b := bufio.NewWriter(w)
	defer b.Flush()
	fmt.Fprintf(b, "\nSummary after %s\n", s.Elapsed.Round(time.Millisecond))
	fmt.Fprintf(b, "  devices:               %d (vaults in %s)\n", s.Devices, where)
	if s.Version == 0 {
		fmt.Fprintf(b, "  confirmed:             no release was installed\n")
	} else {
		fmt.Fprintf(b, "  confirmed v%d or newer: %d of %d (%d were already)\n", s.Version, s.Confirmed, s.Devices, s.AlreadyDone)
		fmt.Fprintf(b, "  time to 50/90/100 %%:   %s (from the first key message of v%d)\n", times(s.VersionSummary), s.Version)
	}
	if len(s.Versions) > 1 {
		for _, v := range s.Versions {
			fmt.Fprintf(b, "    v%-6d              %d confirmed, 50/90/100 %%: %s\n", v.Version, v.Confirmed, times(v))
		}
	}
	fmt.Fprintf(b, "  installed:             %d images (an update redone after a power loss counts again)\n", s.Stats.Installs)
	fmt.Fprintf(b, "  failed:                %d", s.Failed)
	if s.Failed > 0 {
		fmt.Fprintf(b, " (%s; %d for good)", simCodes(s.Codes), s.FailedForGood)
	}
	fmt.Fprintf(b, "\n  chunk fetches:         %d\n", s.Stats.ChunkFetches)
	fmt.Fprintf(b, "  reconnects:            %d (connections lost: %d)\n", s.Stats.Connects-min(s.Stats.Connects, uint64(s.Devices)), s.Stats.Disconnects)
	fmt.Fprintf(b, "  acks / reports sent:   %d / %d\n", s.Stats.AcksSent, s.Stats.ReportsSent)
	fmt.Fprintf(b, "  trials:                %d switches to a new image, %d unhealthy (went back)\n", s.Stats.Trials, s.Stats.Unhealthy)
	if c.opts.DropFraction > 0 || c.opts.KillFraction > 0 || c.opts.CrashInTrialFraction > 0 {
		fmt.Fprintf(b, "  faults injected:       %d dropped connections, %d power losses (seed %d)\n", s.Drops, s.Kills, c.opts.Seed)
	}
	fmt.Fprintf(b, "  peak memory:           heap %.1f MiB, RSS %s\n", float64(s.PeakHeap)/(1<<20), peakRSS())
}

func simCodes(m map[string]int) string {
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, fmt.Sprintf("%s: %d", k, m[k]))
	}
	return strings.Join(parts, ", ")
}

// peakRSS returns the process's peak resident set size (Linux VmHWM), or "n/a".
func peakRSS() string {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return "n/a"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			if err == nil {
				return fmt.Sprintf("%.1f MiB", float64(kb)/1024)
			}
		}
	}
	return "n/a"
}
