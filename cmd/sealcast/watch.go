package main

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"github.com/sealcast/sealcast/protocol"
)

func watchCommand(e *env) *ffcli.Command {
	fs := newFlags("watch", e)
	var cf clientFlags
	cf.register(fs)
	asJSON := fs.Bool("json", false, "stream one JSON object a line: {\"topic\", \"kind\", \"serial\", \"payload\"}")
	dur := fs.Duration("for", 0, "stop after this long (default: until interrupted)")
	return &ffcli.Command{
		Name:       "watch",
		ShortUsage: "sealcast watch [-json] [-for DURATION]",
		ShortHelp:  "follow releases and devices live, from the status topics",
		LongHelp: `Subscribes to sealcast/status/# (fleet, releases, devices as the service sees them) and
to the devices' own state and presence topics (PROTOCOL.md 13), as any MQTT client may:
a monitor account is enough. Retained messages come first, so the picture is complete
from the start.

On a terminal: the fleet, device counts by state, a bar per release in progress, and the
latest failures, redrawn as they change. Otherwise: a line per change (release counts at
most every few seconds). With -json: every message as one JSON object a line, its kind
one of fleet, release, device_status, device_state, presence; payload is the topic's
JSON (a string for presence, null when a retained topic was cleared).
` + clientHelp,
		FlagSet: fs,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return usagef("watch takes no arguments (got %q)", args)
			}
			if *dur < 0 {
				return fmt.Errorf("-for must not be negative (got %s)", *dur)
			}
			op, err := cf.dial(ctx)
			if err != nil {
				return err
			}
			defer op.Close()
			if *dur > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, *dur)
				defer cancel()
			}
			var v watchView
			switch {
			case *asJSON:
				v = &jsonView{enc: json.NewEncoder(e.stdout)}
			case isTerminal(e.stdout):
				v = newScreen(e.stdout)
			default:
				v = &linesView{w: e.stdout, printed: map[string]time.Time{}, lines: map[string]string{}}
			}
			return watch(ctx, op.Watch, v)
		},
	}
}

// watchFilters are what watch subscribes to.
var watchFilters = []string{
	protocol.StatusFilter,
	protocol.StateFilter,
	protocol.PresenceFilter,
}

// watchEvent is one message on a watched topic, decoded.
type watchEvent struct {
	Topic   string          `json:"topic"`
	Kind    string          `json:"kind"`
	Serial  string          `json:"serial,omitempty"`
	Payload json.RawMessage `json:"payload"`

	fleet   *protocol.FleetStatus
	release *protocol.ReleaseStatus
	status  *protocol.DeviceStatus
	state   *protocol.DeviceState
	online  bool
}

// decodeEvent returns the event of a message, and false for topics watch does not know.
func decodeEvent(topic string, b []byte) (watchEvent, bool) {
	ev := watchEvent{Topic: topic, Payload: json.RawMessage("null")}
	cleared := len(b) == 0
	if !cleared && json.Valid(b) {
		ev.Payload = append(json.RawMessage(nil), b...)
	}
	var target any
	switch {
	case topic == protocol.FleetStatusTopic:
		ev.Kind, ev.fleet = "fleet", new(protocol.FleetStatus)
		target = ev.fleet
	case strings.HasPrefix(topic, protocol.ReleaseStatusPrefix):
		ev.Kind, ev.release = "release", new(protocol.ReleaseStatus)
		target = ev.release
	case strings.HasPrefix(topic, protocol.DeviceStatusPrefix):
		ev.Kind, ev.Serial = "device_status", strings.TrimPrefix(topic, protocol.DeviceStatusPrefix)
		ev.status = new(protocol.DeviceStatus)
		target = ev.status
	default:
		serial, leaf, ok := protocol.DeviceOf(topic)
		if !ok {
			return ev, false
		}
		ev.Serial = serial
		switch leaf {
		case "state":
			ev.Kind, ev.state = "device_state", new(protocol.DeviceState)
			target = ev.state
		case "presence":
			ev.Kind, ev.online = "presence", string(b) == protocol.Online
			if !cleared {
				ev.Payload, _ = json.Marshal(string(b))
			}
			return ev, true
		default:
			return ev, false
		}
	}
	if cleared || json.Unmarshal(b, target) != nil {
		// A cleared topic (a deprovisioned device), or a payload not of the spec: shown
		// as it is, counted as nothing.
		ev.fleet, ev.release, ev.status, ev.state = nil, nil, nil, nil
	}
	return ev, true
}

// watchView shows events. Calls come from one goroutine at a time.
type watchView interface {
	event(ev watchEvent)
	// tick is called a few times a second, and once more at the end.
	tick(final bool)
}

// watch feeds every message on watchFilters to v until ctx is done.
func watch(ctx context.Context, subscribe func(context.Context, []string, func(string, []byte)) error, v watchView) error {
	var mu sync.Mutex
	stopped := false
	done := make(chan error, 1)
	go func() {
		done <- subscribe(ctx, watchFilters, func(topic string, b []byte) {
			ev, ok := decodeEvent(topic, b)
			if !ok {
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if !stopped {
				v.event(ev)
			}
		})
	}()
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case err := <-done:
			mu.Lock()
			defer mu.Unlock()
			stopped = true
			v.tick(true)
			return err
		case <-t.C:
			mu.Lock()
			v.tick(false)
			mu.Unlock()
		}
	}
}

// jsonView streams events as JSON lines.
type jsonView struct{ enc *json.Encoder }

func (v *jsonView) event(ev watchEvent) { v.enc.Encode(ev) }
func (v *jsonView) tick(bool)           {}

// linesView prints a line per change, for logs and pipes.
type linesView struct {
	w       io.Writer
	lines   map[string]string    // last line per topic
	printed map[string]time.Time // when it was printed
	pending map[string]string    // changed lines held back by the rate limit
}

// releaseLineEvery limits how often a release's changing counts are printed.
const releaseLineEvery = 2 * time.Second

func (v *linesView) event(ev watchEvent) {
	var line string
	switch {
	case ev.fleet != nil:
		line = fleetLine(*ev.fleet)
	case ev.release != nil:
		line = statusLine(*ev.release)
		// State changes show at once; counts at most every releaseLineEvery.
		prevState := strings.SplitN(v.lines[ev.Topic], ",", 2)[0]
		if strings.SplitN(line, ",", 2)[0] == prevState && time.Since(v.printed[ev.Topic]) < releaseLineEvery {
			if line != v.lines[ev.Topic] {
				if v.pending == nil {
					v.pending = map[string]string{}
				}
				v.pending[ev.Topic] = line
			}
			return
		}
	case ev.state != nil && ev.state.State == protocol.AgentFailed && ev.state.Error != nil:
		line = fmt.Sprintf("device %s failed: %s: %s", ev.Serial, ev.state.Error.Code, ev.state.Error.Message)
	default:
		return
	}
	v.print(ev.Topic, line)
}

func (v *linesView) print(topic, line string) {
	delete(v.pending, topic)
	if line == v.lines[topic] {
		return
	}
	fmt.Fprintf(v.w, "%s %s\n", time.Now().Format(time.TimeOnly), line)
	v.lines[topic], v.printed[topic] = line, time.Now()
}

func (v *linesView) tick(final bool) {
	for _, topic := range slices.Sorted(maps.Keys(v.pending)) {
		if final || time.Since(v.printed[topic]) >= releaseLineEvery {
			v.print(topic, v.pending[topic])
		}
	}
}

func fleetLine(f protocol.FleetStatus) string {
	s := fmt.Sprintf("fleet: %d devices, %d online", f.Devices, f.Online)
	for _, st := range protocol.ReleaseStates {
		if n := f.Releases[st]; n > 0 {
			s += fmt.Sprintf(", %d %s", n, st)
		}
	}
	return s
}

// screen redraws a summary on a terminal.
type screen struct {
	w        io.Writer
	fleet    *protocol.FleetStatus
	releases map[string]protocol.ReleaseStatus
	seen     map[string]bool // releases that were in progress while watching
	states   map[string]string
	online   map[string]bool
	failures []string
	drawn    int // lines drawn last time
	dirty    bool
}

func newScreen(w io.Writer) *screen {
	return &screen{w: w, releases: map[string]protocol.ReleaseStatus{}, seen: map[string]bool{}, states: map[string]string{}, online: map[string]bool{}, dirty: true}
}

const maxFailures = 5

func (s *screen) event(ev watchEvent) {
	s.dirty = true
	switch ev.Kind {
	case "fleet":
		s.fleet = ev.fleet
	case "release":
		if ev.release == nil {
			delete(s.releases, ev.Topic)
			return
		}
		s.releases[ev.Topic] = *ev.release
		if !finished(*ev.release) {
			s.seen[ev.Topic] = true
		}
	case "device_state":
		if ev.state == nil {
			delete(s.states, ev.Serial)
			return
		}
		s.states[ev.Serial] = ev.state.State
		if ev.state.State == protocol.AgentFailed && ev.state.Error != nil {
			s.failures = append(s.failures, fmt.Sprintf("%s %s: %s", time.Now().Format(time.TimeOnly), ev.Serial, ev.state.Error.Code))
			if len(s.failures) > maxFailures {
				s.failures = s.failures[1:]
			}
		}
	case "presence":
		s.online[ev.Serial] = ev.online
	}
}

func (s *screen) tick(final bool) {
	if !s.dirty {
		return
	}
	s.dirty = false
	var lines []string
	if s.fleet != nil {
		lines = append(lines, fleetLine(*s.fleet))
	} else {
		lines = append(lines, "fleet: waiting for sealcast/status/fleet")
	}
	byState := map[string]int{}
	for _, st := range s.states {
		byState[st]++
	}
	online := 0
	for _, on := range s.online {
		if on {
			online++
		}
	}
	dl := fmt.Sprintf("devices report: %d online", online)
	for _, st := range []string{protocol.AgentIdle, protocol.AgentDownloading, protocol.AgentInstalling, protocol.AgentInstalled, protocol.AgentFailed} {
		if n := byState[st]; n > 0 {
			dl += fmt.Sprintf(", %d %s", n, st)
		}
	}
	lines = append(lines, dl)
	var rels []protocol.ReleaseStatus
	for topic, r := range s.releases {
		if s.seen[topic] || !finished(r) {
			rels = append(rels, r)
		}
	}
	slices.SortFunc(rels, func(a, b protocol.ReleaseStatus) int { return cmp.Compare(a.Version, b.Version) })
	for _, r := range rels {
		lines = append(lines, fmt.Sprintf("%s v%-4d %-10s %s %d/%d installed, %d failed", short(r.Release), r.Version, r.State, bar(r.Installed, r.Failed, r.Targets, 30), r.Installed, r.Targets, r.Failed))
	}
	if len(rels) == 0 {
		lines = append(lines, "no release in progress")
	}
	for _, f := range s.failures {
		lines = append(lines, "failed: "+f)
	}
	var b strings.Builder
	if s.drawn > 0 {
		fmt.Fprintf(&b, "\x1b[%dA", s.drawn) // back to the first line drawn
	}
	for _, l := range lines {
		b.WriteString("\x1b[2K" + l + "\n")
	}
	for i := len(lines); i < s.drawn; i++ {
		b.WriteString("\x1b[2K\n") // blank what the last drawing had below
	}
	io.WriteString(s.w, b.String())
	s.drawn = max(len(lines), s.drawn)
}

// bar draws installed (=) and failed (x) out of total in width cells.
func bar(installed, failed, total, width int) string {
	if total <= 0 {
		return "[" + strings.Repeat(" ", width) + "]"
	}
	i := min(width, installed*width/total)
	f := min(width-i, (failed*width+total-1)/total)
	return "[" + strings.Repeat("=", i) + strings.Repeat("x", f) + strings.Repeat(" ", width-i-f) + "]"
}
