package broker

import (
	"net"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// Login throttling: a source address (IP) with more than loginFailures failed CONNECTs
// within loginWindow is refused without a check for loginBlock. Devices that log in
// correctly never count; a misconfigured client behind the same NAT as good ones delays
// them by at most loginBlock. Loopback addresses are never throttled: a client on the
// broker's own machine is no remote guesser, and the service's own parts (the CLI, a
// local proxy, the tests' hostile clients) all share 127.0.0.1.
const (
	loginFailures = 20
	loginWindow   = time.Minute
	loginBlock    = time.Minute
	// loginSources bounds the addresses remembered; past it the oldest are forgotten.
	loginSources = 10000
)

type loginSource struct {
	fails   int
	since   time.Time // start of the window fails counts in
	blocked time.Time // refused until then
}

// loginGuard throttles failed logins by source address.
type loginGuard struct {
	mu  sync.Mutex
	now func() time.Time
	m   map[string]*loginSource
}

func newLoginGuard() *loginGuard {
	return &loginGuard{now: time.Now, m: map[string]*loginSource{}}
}

func sourceIP(remote string) string {
	if host, _, err := net.SplitHostPort(remote); err == nil {
		return host
	}
	return remote
}

// exempt reports whether remote is a loopback address, which is never throttled.
func exempt(remote string) bool {
	ip := net.ParseIP(sourceIP(remote))
	return ip != nil && ip.IsLoopback()
}

// blocked reports whether logins from remote are refused now.
func (g *loginGuard) blocked(remote string) bool {
	if exempt(remote) {
		return false
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	s := g.m[sourceIP(remote)]
	return s != nil && g.now().Before(s.blocked)
}

// failed counts a failed login from remote, and reports whether it blocked the source.
func (g *loginGuard) failed(remote string) bool {
	if exempt(remote) {
		return false
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	now, ip := g.now(), sourceIP(remote)
	s := g.m[ip]
	if s == nil {
		if len(g.m) >= loginSources {
			g.prune(now)
		}
		s = &loginSource{since: now}
		g.m[ip] = s
	}
	if now.Sub(s.since) > loginWindow {
		s.fails, s.since = 0, now
	}
	s.fails++
	if s.fails > loginFailures {
		s.blocked = now.Add(loginBlock)
		s.fails, s.since = 0, now
		return true
	}
	return false
}

// prune forgets the sources neither blocked nor failing within the window, and, if that
// is not enough, every source.
func (g *loginGuard) prune(now time.Time) {
	for ip, s := range g.m {
		if now.After(s.blocked) && now.Sub(s.since) > loginWindow {
			delete(g.m, ip)
		}
	}
	if len(g.m) >= loginSources {
		clear(g.m)
	}
}

// dummyHash is compared against when a login names no account and fails as a device
// too, so that a failed login takes a bcrypt comparison whatever the username: account
// names cannot be told from the time a refusal takes.
var dummyHash = func() []byte {
	h, err := bcrypt.GenerateFromPassword([]byte("sealcast: no such account"), bcrypt.DefaultCost)
	if err != nil {
		panic(err)
	}
	return h
}()

// spendLikeAccount takes as long as checking an account's password.
func spendLikeAccount(password []byte) {
	_ = bcrypt.CompareHashAndPassword(dummyHash, password)
}
