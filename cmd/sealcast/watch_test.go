package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

func TestDecodeEvent(t *testing.T) {
	id := keychain.ReleaseID{1, 2, 3}
	rel, _ := json.Marshal(protocol.ReleaseStatus{Release: id, State: protocol.ReleaseActive, Targets: 4, Installed: 1})
	cases := []struct {
		topic, payload string
		kind, serial   string
		known          bool
		payloadJSON    string
	}{
		{protocol.FleetStatusTopic, `{"devices":3,"online":1}`, "fleet", "", true, `{"devices":3,"online":1}`},
		{protocol.ReleaseStatusTopic(id), string(rel), "release", "", true, string(rel)},
		{protocol.DeviceStatusTopic("d-1"), `{"serial":"d-1","state":"wrapped"}`, "device_status", "d-1", true, `{"serial":"d-1","state":"wrapped"}`},
		{protocol.DeviceStatusTopic("d-1"), ``, "device_status", "d-1", true, `null`}, // cleared: deprovisioned
		{protocol.StateTopic("d-2"), `{"serial":"d-2","state":"failed","error":{"code":"chunk_corrupt","message":"x"}}`, "device_state", "d-2", true, ""},
		{protocol.PresenceTopic("d-3"), `online`, "presence", "d-3", true, `"online"`},
		{protocol.FleetStatusTopic, `not json`, "fleet", "", true, `null`},
		{protocol.KeyTopic("d-4"), "\x01\x02", "", "", false, ""},
		{"sealcast/status/other/thing", `{}`, "", "", false, ""},
	}
	for _, c := range cases {
		ev, ok := decodeEvent(c.topic, []byte(c.payload))
		if ok != c.known {
			t.Errorf("%s: known %v, want %v", c.topic, ok, c.known)
			continue
		}
		if !ok {
			continue
		}
		if ev.Kind != c.kind || ev.Serial != c.serial {
			t.Errorf("%s: kind %q serial %q, want %q %q", c.topic, ev.Kind, ev.Serial, c.kind, c.serial)
		}
		if c.payloadJSON != "" && string(ev.Payload) != c.payloadJSON {
			t.Errorf("%s: payload %s, want %s", c.topic, ev.Payload, c.payloadJSON)
		}
		line, err := json.Marshal(ev)
		if err != nil || !json.Valid(line) || bytes.Contains(line, []byte("\n")) {
			t.Errorf("%s: JSON line %q (%v)", c.topic, line, err)
		}
	}
	ev, _ := decodeEvent(protocol.StateTopic("d-2"), []byte(`{"serial":"d-2","state":"failed","error":{"code":"chunk_corrupt","message":"x"}}`))
	if ev.state == nil || ev.state.Error == nil || ev.state.Error.Code != protocol.CodeChunkCorrupt {
		t.Errorf("device state not decoded: %+v", ev.state)
	}
	if ev, _ := decodeEvent(protocol.FleetStatusTopic, []byte("not json")); ev.fleet != nil {
		t.Error("a payload that is not JSON was decoded into a fleet status")
	}
}

func TestFinished(t *testing.T) {
	cases := []struct {
		st   protocol.ReleaseStatus
		want bool
	}{
		{protocol.ReleaseStatus{State: protocol.ReleaseActive, Targets: 3, Installed: 2}, false},
		{protocol.ReleaseStatus{State: protocol.ReleaseActive, Targets: 3, Installed: 2, Failed: 1}, true},
		{protocol.ReleaseStatus{State: protocol.ReleasePaused, Targets: 3, Installed: 1}, false},
		{protocol.ReleaseStatus{State: protocol.ReleaseCompleted, Targets: 3, Installed: 3}, true},
		{protocol.ReleaseStatus{State: protocol.ReleaseCancelled, Targets: 3}, true},
		{protocol.ReleaseStatus{State: protocol.ReleasePublishing, Targets: 3, Installed: 3}, false},
		{protocol.ReleaseStatus{State: protocol.ReleaseActive}, false},
	}
	for _, c := range cases {
		if got := finished(c.st); got != c.want {
			t.Errorf("finished(%+v) = %v, want %v", c.st, got, c.want)
		}
	}
}

func TestBar(t *testing.T) {
	cases := []struct {
		installed, failed, total int
		want                     string
	}{
		{0, 0, 10, "[          ]"},
		{5, 0, 10, "[=====     ]"},
		{10, 0, 10, "[==========]"},
		{4, 1, 10, "[====x     ]"},
		{999, 1, 1000, "[=========x]"}, // one failure in a thousand still shows
		{0, 0, 0, "[          ]"},
		{12, 0, 10, "[==========]"},
	}
	for _, c := range cases {
		if got := bar(c.installed, c.failed, c.total, 10); got != c.want {
			t.Errorf("bar(%d, %d, %d) = %q, want %q", c.installed, c.failed, c.total, got, c.want)
		}
	}
}

// TestLinesView: state changes print at once, changing counts are held back and printed
// by a later tick, and a final tick prints what is held.
func TestLinesView(t *testing.T) {
	var out bytes.Buffer
	v := &linesView{w: &out, printed: map[string]time.Time{}, lines: map[string]string{}}
	id := keychain.ReleaseID{9}
	rel := func(state protocol.ReleaseState, installed int) watchEvent {
		b, _ := json.Marshal(protocol.ReleaseStatus{Release: id, State: state, Targets: 10, Installed: installed})
		ev, _ := decodeEvent(protocol.ReleaseStatusTopic(id), b)
		return ev
	}
	v.event(rel(protocol.ReleaseActive, 0))
	v.event(rel(protocol.ReleaseActive, 1)) // counts: held back
	v.event(rel(protocol.ReleaseActive, 2))
	v.tick(false)
	if n := strings.Count(out.String(), "\n"); n != 1 {
		t.Fatalf("after a state and two count changes: %d lines, want 1:\n%s", n, out.String())
	}
	v.event(rel(protocol.ReleasePaused, 2)) // a state change: at once
	if !strings.Contains(out.String(), "paused, 2 of 10") {
		t.Fatalf("pause not printed at once:\n%s", out.String())
	}
	v.event(rel(protocol.ReleasePaused, 3))
	v.tick(true)
	if !strings.HasSuffix(out.String(), "paused, 3 of 10 installed, 0 failed, 0 pending\n") {
		t.Fatalf("final tick did not print the last counts:\n%s", out.String())
	}
}
