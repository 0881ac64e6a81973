package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
)

func statusCommand(e *env) *ffcli.Command {
	fs := newFlags("status", e)
	var cf clientFlags
	cf.register(fs)
	asJSON := fs.Bool("json", false, "print JSON: {\"fleet\": ..., \"releases\": [...]}, or one release's status")
	return &ffcli.Command{
		Name:       "status",
		ShortUsage: "sealcast status [-json] [RELEASE]",
		ShortHelp:  "show the fleet and its releases, or one release",
		LongHelp: `Without an argument, shows the fleet summary (retained on sealcast/status/fleet) and
every release (admin request release.list). With RELEASE, a release id or a prefix of
one, shows that release (release.get). The JSON forms are the status objects of
PROTOCOL.md 13.1 and 13.2.
` + clientHelp,
		FlagSet: fs,
		Exec: func(ctx context.Context, args []string) error {
			args, err := positional(fs, args)
			if err != nil {
				return err
			}
			if len(args) > 1 {
				return usagef("status takes at most one release id (got %d arguments)", len(args))
			}
			op, err := cf.dial(ctx)
			if err != nil {
				return err
			}
			defer op.Close()
			if len(args) == 1 {
				return showRelease(ctx, e, op, args[0], *asJSON)
			}
			return showStatus(ctx, e, op, cf.timeout, *asJSON)
		},
	}
}

func showRelease(ctx context.Context, e *env, op *operator.Client, arg string, asJSON bool) error {
	id, err := resolveRelease(ctx, op, arg)
	if err != nil {
		return err
	}
	st, err := op.ReleaseStatus(ctx, id)
	if err != nil {
		return adminError(err)
	}
	if asJSON {
		return printJSON(e.stdout, st)
	}
	w := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "release\t%s\n", st.Release)
	fmt.Fprintf(w, "version\t%d\n", st.Version)
	if st.Label != "" {
		fmt.Fprintf(w, "label\t%s\n", st.Label)
	}
	fmt.Fprintf(w, "state\t%s\n", st.State)
	fmt.Fprintf(w, "targets\t%d\n", st.Targets)
	fmt.Fprintf(w, "wrapped\t%d\n", st.Wrapped)
	fmt.Fprintf(w, "installed\t%d\n", st.Installed)
	fmt.Fprintf(w, "failed\t%d\n", st.Failed)
	fmt.Fprintf(w, "pending\t%d\n", st.Pending)
	fmt.Fprintf(w, "image\t%d bytes, %d chunks of %d\n", st.ImageSize, st.ChunkCount, st.ChunkSize)
	fmt.Fprintf(w, "created\t%s\n", st.Created.Local().Format(time.DateTime))
	if st.PauseReason != "" {
		fmt.Fprintf(w, "paused by\t%s\n", st.PauseReason)
	}
	switch {
	case st.MaxConcurrent > 0 && st.DefaultBound:
		fmt.Fprintf(w, "bound\t%d online targets with an unsettled key at once (the server's default); %d offered so far\n", st.MaxConcurrent, st.Offered)
	case st.MaxConcurrent > 0:
		fmt.Fprintf(w, "bound\t%d targets with an unsettled key at once; %d offered so far\n", st.MaxConcurrent, st.Offered)
	}
	if st.TimedOut > 0 {
		fmt.Fprintf(w, "timed out\t%d\n", st.TimedOut)
	}
	if st.Prefetch {
		fmt.Fprintf(w, "prefetched\t%d of %d targets hold every chunk\n", st.Prefetched, st.Targets)
	}
	if len(st.InstallTimes) > 0 {
		fmt.Fprintf(w, "installed within\t%s\n", installTimesText(*st))
	}
	if len(st.Waves) == 0 {
		return w.Flush()
	}
	fmt.Fprintf(w, "wave\t%s\n", waveText(*st))
	if err := w.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(e.stdout)
	w = tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "WAVE\tDEVICES\tOPENED\tCLOSED\tINSTALLED\tFAILED\tTIMED OUT")
	for _, ws := range st.Waves {
		fmt.Fprintf(w, "%d\t%d\t%s\t%s\t%d\t%d\t%d\n", ws.Wave, ws.Size, timeText(ws.Opened), timeText(ws.Closed), ws.Installed, ws.Failed, ws.TimedOut)
	}
	return w.Flush()
}

// installTimesText summarises a release's time-to-installed curve (13.2): by when since
// its start half, nine tenths and all of its targets had installed, as far as they have.
func installTimesText(st protocol.ReleaseStatus) string {
	var parts []string
	for _, pct := range []int{50, 90, 100} {
		need := (st.Targets*pct + 99) / 100
		i := slices.IndexFunc(st.InstallTimes, func(p protocol.InstallTime) bool { return p.Installed >= need })
		if i < 0 || need == 0 {
			parts = append(parts, fmt.Sprintf("%d%%: not yet", pct))
			continue
		}
		parts = append(parts, fmt.Sprintf("%d%% in %s", pct, time.Duration(st.InstallTimes[i].Within)*time.Second))
	}
	return strings.Join(parts, ", ") + " (of the targets, from the release's start)"
}

// timeText is t in local time, or "-" for none.
func timeText(t *time.Time) string {
	if t == nil {
		return "-"
	}
	return t.Local().Format(time.DateTime)
}

// statusJSON is what status -json prints.
type statusJSON struct {
	Fleet    *protocol.FleetStatus    `json:"fleet"`
	Releases []protocol.ReleaseStatus `json:"releases"`
}

func showStatus(ctx context.Context, e *env, op *operator.Client, timeout time.Duration, asJSON bool) error {
	var list protocol.ReleaseListResult
	if err := op.Do(ctx, protocol.CmdReleaseList, nil, &list); err != nil {
		return adminError(err)
	}
	slices.SortFunc(list.Releases, func(a, b protocol.ReleaseStatus) int { return cmp.Compare(a.Version, b.Version) })
	out := statusJSON{Releases: list.Releases}
	var fleetErr error
	out.Fleet, fleetErr = getFleet(ctx, op, timeout)
	if asJSON {
		return printJSON(e.stdout, out)
	}
	if fleetErr != nil {
		fmt.Fprintf(e.stdout, "fleet: %v\n", fleetErr)
	} else {
		f := out.Fleet
		fmt.Fprintf(e.stdout, "fleet: %d devices, %d online", f.Devices, f.Online)
		for _, s := range protocol.ReleaseStates {
			if n := f.Releases[s]; n > 0 {
				fmt.Fprintf(e.stdout, ", %d %s", n, s)
			}
		}
		fmt.Fprintln(e.stdout)
	}
	if len(out.Releases) == 0 {
		fmt.Fprintln(e.stdout, "no releases")
		return nil
	}
	fmt.Fprintln(e.stdout)
	w := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "RELEASE\tVERSION\tLABEL\tSTATE\tTARGETS\tINSTALLED\tFAILED\tPENDING\tCREATED\tWAVE")
	for _, r := range out.Releases {
		fmt.Fprintf(w, "%s\t%d\t%s\t%s\t%d\t%d\t%d\t%d\t%s\t%s\n", r.Release, r.Version, r.Label, r.State,
			r.Targets, r.Installed, r.Failed, r.Pending, r.Created.Local().Format(time.DateTime), waveText(r))
	}
	return w.Flush()
}

// getFleet asks the service for the fleet status now (fleet.get), so that what a command
// just changed shows; from a service that does not know fleet.get, it reads the retained
// fleet status, which follows within a moment.
func getFleet(ctx context.Context, op *operator.Client, timeout time.Duration) (*protocol.FleetStatus, error) {
	var f protocol.FleetStatus
	err := op.Do(ctx, protocol.CmdFleetGet, nil, &f)
	if protocol.CodeOf(err) == protocol.ErrUnknownCommand {
		return readFleet(ctx, op, timeout)
	}
	if err != nil {
		return nil, adminError(err)
	}
	return &f, nil
}

// readFleet reads the retained fleet status.
func readFleet(ctx context.Context, op *operator.Client, timeout time.Duration) (*protocol.FleetStatus, error) {
	var fleet *protocol.FleetStatus
	err := readRetained(ctx, op, []string{protocol.FleetStatusTopic}, timeout, func(_ string, b []byte) time.Duration {
		var f protocol.FleetStatus
		if json.Unmarshal(b, &f) != nil {
			return timeout
		}
		fleet = &f
		return 0
	})
	if err != nil {
		return nil, err
	}
	if fleet == nil {
		return nil, fmt.Errorf("no status on %s within %s (has `sealcast serve` run against this broker?)", protocol.FleetStatusTopic, timeout)
	}
	return fleet, nil
}

// readRetained subscribes to filters and calls fn with each message, which returns how
// long to wait for the next one (0: enough). It waits first for the first message, and
// returns when fn says enough, when a wait runs out, or when ctx is done. fn runs on one
// goroutine at a time, and never after readRetained returned.
func readRetained(ctx context.Context, op *operator.Client, filters []string, first time.Duration, fn func(topic string, b []byte) time.Duration) error {
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	var (
		mu   sync.Mutex
		done bool
		next = make(chan time.Duration, 1)
	)
	watched := make(chan error, 1)
	go func() {
		watched <- op.Watch(wctx, filters, func(topic string, b []byte) {
			mu.Lock()
			defer mu.Unlock()
			if done {
				return
			}
			d := fn(topic, b)
			if d <= 0 {
				done = true
				stop()
				return
			}
			select {
			case <-next:
			default:
			}
			next <- d
		})
	}()
	finish := func() error {
		mu.Lock()
		done = true
		mu.Unlock()
		stop()
		return <-watched
	}
	t := time.NewTimer(first)
	defer t.Stop()
	for {
		select {
		case <-wctx.Done():
			return finish()
		case d := <-next:
			t.Reset(d)
		case <-t.C:
			return finish()
		}
	}
}

func devicesCommand(e *env) *ffcli.Command {
	fs := newFlags("devices", e)
	var cf clientFlags
	cf.register(fs)
	asJSON := fs.Bool("json", false, "print a JSON array of device statuses (PROTOCOL.md 13.4, with \"online\")")
	var tags tagFlag
	fs.Var(&tags, "tag", "only devices with this tag key=value (repeat for more: all must match)")
	retained := fs.Bool("retained", false, "read the retained status topics instead of asking the service (for a monitor account)")
	return &ffcli.Command{
		Name:       "devices",
		ShortUsage: "sealcast devices [-json] [SERIAL...]",
		ShortHelp:  "show devices as the service sees them",
		LongHelp: `With serials, asks the service for each device (admin request device.get); an unknown
serial exits with status 4 (not found). Without, lists every device, page by page
(device.list), as the store holds them. With -retained it reads the retained topics
sealcast/status/devices/+ and sealcast/devices/+/presence instead, which a monitor
account may read too (they can lag a moment behind the store).
` + clientHelp,
		FlagSet: fs,
		Exec: func(ctx context.Context, args []string) error {
			args, err := positional(fs, args)
			if err != nil {
				return err
			}
			op, err := cf.dial(ctx)
			if err != nil {
				return err
			}
			defer op.Close()
			var devs []deviceJSON
			if len(args) > 0 {
				for _, s := range args {
					var d deviceJSON
					if err := op.Do(ctx, protocol.CmdDeviceGet, protocol.SerialArgs{Serial: s}, &d.DeviceStatus); err != nil {
						return adminError(err)
					}
					devs = append(devs, d)
				}
			} else if *retained {
				if devs, err = readDevices(ctx, op, cf.timeout); err != nil {
					return err
				}
			} else if devs, err = listDevices(ctx, op); err != nil {
				return err
			}
			devs = slices.DeleteFunc(devs, func(d deviceJSON) bool { return !protocol.Matches(d.Tags, tags.m) })
			if *asJSON {
				if devs == nil {
					devs = []deviceJSON{}
				}
				return printJSON(e.stdout, devs)
			}
			return printDevices(e.stdout, devs)
		},
	}
}

// listDevices asks the service for every device, a page at a time (device.list).
func listDevices(ctx context.Context, op *operator.Client) ([]deviceJSON, error) {
	var out []deviceJSON
	for after := ""; ; {
		var page protocol.DeviceListResult
		if err := op.Do(ctx, protocol.CmdDeviceList, protocol.DeviceListArgs{After: after}, &page); err != nil {
			return nil, adminError(err)
		}
		for _, d := range page.Devices {
			online := d.Online
			d.Online = nil
			out = append(out, deviceJSON{DeviceStatus: d, Online: online})
		}
		if page.Next == "" {
			return out, nil
		}
		after = page.Next
	}
}

// deviceJSON is a device's status with its presence, when known.
type deviceJSON struct {
	protocol.DeviceStatus
	Online *bool `json:"online,omitempty"`
}

// How long readDevices waits for the next retained message: once it has as many device
// statuses as the fleet status counts (for presences), and before that.
const (
	devicesQuiet      = 300 * time.Millisecond
	devicesIncomplete = 3 * time.Second
)

// readDevices collects the retained device statuses and presences. It knows from the
// fleet status how many devices there are, and stops once it has them all.
func readDevices(ctx context.Context, op *operator.Client, timeout time.Duration) ([]deviceJSON, error) {
	fleet, err := getFleet(ctx, op, timeout)
	if err != nil {
		return nil, err
	}
	byS := map[string]*deviceJSON{}
	get := func(s string) *deviceJSON {
		if byS[s] == nil {
			byS[s] = &deviceJSON{DeviceStatus: protocol.DeviceStatus{Serial: s}}
		}
		return byS[s]
	}
	if fleet.Devices == 0 {
		return nil, nil
	}
	statuses := 0
	filters := []string{protocol.DeviceStatusFilter, protocol.PresenceFilter}
	err = readRetained(ctx, op, filters, timeout, func(topic string, b []byte) time.Duration {
		if serial, leaf, ok := protocol.DeviceOf(topic); ok && leaf == "presence" {
			on := string(b) == protocol.Online
			get(serial).Online = &on
		} else if len(b) > 0 {
			var st protocol.DeviceStatus
			if json.Unmarshal(b, &st) == nil && st.Serial != "" {
				d := get(st.Serial)
				if d.State == "" {
					statuses++
				}
				d.DeviceStatus = st
			}
		}
		if statuses >= fleet.Devices {
			return devicesQuiet // the presences may still be coming
		}
		return devicesIncomplete
	})
	if err != nil {
		return nil, err
	}
	var out []deviceJSON
	for _, d := range byS {
		if d.State != "" { // presence of a deprovisioned device is not a device
			out = append(out, *d)
		}
	}
	slices.SortFunc(out, func(a, b deviceJSON) int { return cmp.Compare(a.Serial, b.Serial) })
	if len(out) < fleet.Devices {
		return out, errors.New("the status topics hold fewer devices than the fleet status counts; try again, or ask for serials")
	}
	return out, nil
}

func printDevices(w io.Writer, devs []deviceJSON) error {
	if len(devs) == 0 {
		fmt.Fprintln(w, "no devices")
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SERIAL\tSTATE\tVERSION\tEPOCH\tSEQ\tRELEASE\tLAST RESULT\tONLINE\tLAST SEEN\tTAGS")
	for _, d := range devs {
		rel, online, seen := "-", "-", "-"
		if d.Release != nil {
			rel = short(*d.Release)
		}
		if d.Online != nil {
			online = map[bool]string{true: "yes", false: "no"}[*d.Online]
		}
		if d.LastSeen != nil {
			seen = d.LastSeen.Local().Format(time.DateTime)
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%s\t%s\t%s\t%s\t%s\n", d.Serial, d.State, d.Version, d.Epoch, d.Seq, rel,
			cmp.Or(d.LastResult, "-"), online, seen, cmp.Or(protocol.FormatTags(d.Tags), "-"))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, d := range devs {
		if len(d.History) == 0 {
			continue
		}
		fmt.Fprintf(w, "\n%s in the newest releases:\n", d.Serial)
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "RELEASE\tVERSION\tLABEL\tSTATE\tRESULT\tCREATED")
		for _, h := range d.History {
			res := h.Result
			if h.Code != "" {
				res += " (" + h.Code + ")"
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\n", short(h.Release), h.Version, cmp.Or(h.Label, "-"), h.State, res, h.Created.Local().Format(time.DateTime))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	return nil
}
