package broker

import (
	"fmt"
	"testing"
	"time"
)

// TestLoginGuard: a source with more than loginFailures failed logins within
// loginWindow is refused for loginBlock, then admitted again; another source is not
// affected; failures spread wider than the window never block.
func TestLoginGuard(t *testing.T) {
	now := time.Date(2026, 12, 6, 8, 0, 0, 0, time.UTC)
	g := newLoginGuard()
	g.now = func() time.Time { return now }
	for i := range loginFailures {
		if g.failed("10.0.0.1:5000") {
			t.Fatalf("blocked after %d failures; the limit is %d", i+1, loginFailures)
		}
	}
	if g.blocked("10.0.0.1:6000") {
		t.Fatal("blocked at the limit")
	}
	if !g.failed("10.0.0.1:5001") || !g.blocked("10.0.0.1:7000") {
		t.Fatal("not blocked past the limit")
	}
	if g.blocked("10.0.0.2:5000") {
		t.Fatal("another address is blocked too")
	}
	now = now.Add(loginBlock + time.Second)
	if g.blocked("10.0.0.1:5000") {
		t.Fatal("still blocked after loginBlock")
	}
	// Slow guessing: one failure every few seconds never blocks.
	for range 3 * loginFailures {
		now = now.Add(loginWindow / loginFailures * 2)
		if g.failed("10.0.0.3:1") {
			t.Fatal("failures spread wider than the window blocked a source")
		}
	}
	// Loopback is never throttled.
	for range 3 * loginFailures {
		if g.failed("127.0.0.1:1") || g.failed("[::1]:1") {
			t.Fatal("a loopback address was blocked")
		}
	}
	if g.blocked("127.0.0.1:1") {
		t.Fatal("a loopback address is blocked")
	}
	// The table of sources is bounded.
	for i := range loginSources + 10 {
		g.failed(fmt.Sprintf("10.%d.%d.%d:1", i>>16&255, i>>8&255, i&255))
	}
	if len(g.m) > loginSources {
		t.Fatalf("%d sources remembered; the bound is %d", len(g.m), loginSources)
	}
}
