package scaleout_test

import (
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// gate is a TCP proxy from a client (the updater) to the broker. Pace makes it pass the
// client's bytes to the broker at a fixed rate, so that a burst of publishes takes
// seconds however fast the client. Freeze stops the client's bytes at once: what the
// client wrote and the broker did not get is lost, as in a crash; connections made while
// frozen are closed. Cut closes every connection and lets the next ones through at full
// speed.
type gate struct {
	t      *testing.T
	l      net.Listener
	target string
	wg     sync.WaitGroup

	mu     sync.Mutex
	rate   int // bytes per second from client to broker; 0: no limit
	frozen bool
	conns  map[net.Conn]bool
}

func startGate(t *testing.T, target string) *gate {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := &gate{t: t, l: l, target: target, conns: map[net.Conn]bool{}}
	g.wg.Add(1)
	go g.accept()
	t.Cleanup(func() {
		l.Close()
		g.Cut()
		g.wg.Wait()
	})
	return g
}

// URL is the gate's address as an MQTT URL.
func (g *gate) URL() string { return "tcp://" + g.l.Addr().String() }

// Pace limits the client-to-broker direction of the open connections to rate bytes a
// second.
func (g *gate) Pace(rate int) {
	g.mu.Lock()
	g.rate = rate
	g.mu.Unlock()
}

// Freeze stops every byte from clients to the broker until Cut.
func (g *gate) Freeze() {
	g.mu.Lock()
	g.frozen = true
	g.mu.Unlock()
}

// Cut closes every open connection, and lets the next ones through at full speed.
func (g *gate) Cut() {
	g.mu.Lock()
	for c := range g.conns {
		c.Close()
	}
	g.conns = map[net.Conn]bool{}
	g.rate, g.frozen = 0, false
	g.mu.Unlock()
}

func (g *gate) accept() {
	defer g.wg.Done()
	for {
		c, err := g.l.Accept()
		if err != nil {
			return
		}
		b, err := net.Dial("tcp", g.target)
		if err != nil {
			g.t.Logf("gate: dialing %s: %v", g.target, err)
			c.Close()
			continue
		}
		g.mu.Lock()
		g.conns[c], g.conns[b] = true, true
		g.mu.Unlock()
		g.wg.Add(2)
		go func() {
			defer g.wg.Done()
			io.Copy(c, b)
			c.Close()
		}()
		go func() {
			defer g.wg.Done()
			g.up(c, b)
			b.Close()
		}()
	}
}

// up copies client bytes to the broker, at most 1 KiB at a time, sleeping after each
// piece as long as the pace asks.
func (g *gate) up(c, b net.Conn) {
	buf := make([]byte, 1024)
	for {
		n, err := c.Read(buf)
		g.mu.Lock()
		rate, frozen := g.rate, g.frozen
		g.mu.Unlock()
		if frozen {
			return
		}
		if n > 0 {
			if _, werr := b.Write(buf[:n]); werr != nil {
				return
			}
			if rate > 0 {
				time.Sleep(time.Duration(n) * time.Second / time.Duration(rate))
			}
		}
		if err != nil {
			return
		}
	}
}
