// Package devicetest records what a device agent does, for tests of the agent and of
// the system around it: pass Recorder.On as device.Options.OnEvent, then count, wait for
// and order the events.
package devicetest

import (
	"sync"
	"testing"
	"time"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/protocol"
)

// Recorder keeps every event of one or more agents. Its methods are safe for concurrent
// use.
type Recorder struct {
	mu     sync.Mutex
	events []device.Event
	// Hook, if set before the agent starts, sees each event after it is recorded, on the
	// agent's goroutine (the agent waits for it).
	Hook func(device.Event)
}

// On records e; it is a device.Options.OnEvent.
func (r *Recorder) On(e device.Event) {
	r.mu.Lock()
	r.events = append(r.events, e)
	h := r.Hook
	r.mu.Unlock()
	if h != nil {
		h(e)
	}
}

// Count returns how many events of kind k were recorded.
func (r *Recorder) Count(k device.EventKind) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, e := range r.events {
		if e.Kind == k {
			n++
		}
	}
	return n
}

// Fetches counts chunk subscriptions per chunk index.
func (r *Recorder) Fetches() map[uint32]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := map[uint32]int{}
	for _, e := range r.events {
		if e.Kind == device.EventChunkFetch {
			m[e.Index]++
		}
	}
	return m
}

// Before reports whether an event of kind k for chunk index came before the first event
// of kind then.
func (r *Recorder) Before(k device.EventKind, index uint32, then device.EventKind) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.events {
		switch {
		case e.Kind == then:
			return false
		case e.Kind == k && e.Index == index:
			return true
		}
	}
	return false
}

// Codes lists the codes of the reports sent, in order.
func (r *Recorder) Codes() []protocol.Code {
	r.mu.Lock()
	defer r.mu.Unlock()
	var cs []protocol.Code
	for _, e := range r.events {
		if e.Kind == device.EventReportSent {
			cs = append(cs, e.Code)
		}
	}
	return cs
}

// Wait waits until n events of kind k were recorded, failing t after 20 s.
func (r *Recorder) Wait(t testing.TB, k device.EventKind, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for r.Count(k) < n {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %d %v events (have %d)", n, k, r.Count(k))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Events returns a copy of the events of kind k, in order.
func (r *Recorder) Events(k device.EventKind) []device.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []device.Event
	for _, e := range r.events {
		if e.Kind == k {
			out = append(out, e)
		}
	}
	return out
}
