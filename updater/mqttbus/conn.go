package mqttbus

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"golang.org/x/net/proxy"
)

// bufferedConn makes paho cheap on a busy connection. paho reads each packet with three
// or more small reads straight from the socket (type, length, body) and writes each packet
// with its own write; at tens of thousands of packets a second each way those system calls
// are most of the updater's work, and on loopback every write also runs the receiver's
// network stack. bufferedConn reads through a bufio.Reader and coalesces writes: Write
// copies into a buffer that one goroutine flushes, so packets written while a flush is in
// progress go out together in the next one. An idle connection flushes at once, so latency
// is unchanged.
//
// A write error is returned by the next Write and closes the connection, so paho's reader
// sees it and reconnects; as with any TCP write, data reported written may not have
// arrived, which QoS 1 covers.
type bufferedConn struct {
	net.Conn
	r       *bufio.Reader
	timeout time.Duration // bounds each flush; paho's own write deadlines apply to the buffer

	mu     sync.Mutex
	cond   *sync.Cond // signalled when a flush completes or the connection fails
	buf    []byte     // written, not yet flushed
	spare  []byte     // the previous flush's buffer, reused
	err    error      // first flush error, or errClosed
	wake   chan struct{}
	done   chan struct{} // closed when the flusher has returned
	closed bool
}

const (
	// maxPending bounds the bytes written and not yet flushed: Write blocks above it, so a
	// stalled socket holds back the writer instead of growing the buffer.
	maxPending = 256 << 10
	readBuffer = 64 << 10
	// socketReadBuffer is the kernel's receive buffer asked for (SO_RCVBUF).
	socketReadBuffer = 4 << 20
)

var errClosed = errors.New("mqttbus: connection closed")

func newBufferedConn(c net.Conn, timeout time.Duration) *bufferedConn {
	b := &bufferedConn{Conn: c, r: bufio.NewReaderSize(c, readBuffer), timeout: timeout,
		wake: make(chan struct{}, 1), done: make(chan struct{})}
	b.cond = sync.NewCond(&b.mu)
	go b.flushLoop()
	return b
}

func (b *bufferedConn) Read(p []byte) (int, error) { return b.r.Read(p) }

func (b *bufferedConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for b.err == nil && len(b.buf) > 0 && len(b.buf)+len(p) > maxPending {
		b.cond.Wait()
	}
	if b.err != nil {
		return 0, b.err
	}
	b.buf = append(b.buf, p...)
	select {
	case b.wake <- struct{}{}:
	default: // a flush is already due
	}
	return len(p), nil
}

// flushLoop writes out what Write buffered until the connection is closed and drained.
func (b *bufferedConn) flushLoop() {
	defer close(b.done)
	for range b.wake {
		b.mu.Lock()
		out := b.buf
		b.buf, b.spare = b.spare[:0], nil
		closed := b.closed
		b.mu.Unlock()
		var err error
		if len(out) > 0 {
			if b.timeout > 0 {
				_ = b.Conn.SetWriteDeadline(time.Now().Add(b.timeout))
			}
			_, err = b.Conn.Write(out)
		}
		b.mu.Lock()
		if cap(out) <= maxPending {
			b.spare = out[:0]
		}
		if err != nil && b.err == nil {
			b.err = err
			b.Conn.Close() // wakes paho's reader, which reconnects
		}
		b.cond.Broadcast()
		b.mu.Unlock()
		if closed || err != nil {
			return
		}
	}
}

// Close flushes what is buffered (for up to a second: paho's DISCONNECT is written just
// before) and closes the connection.
func (b *bufferedConn) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	b.mu.Unlock()
	_ = b.Conn.SetWriteDeadline(time.Now().Add(time.Second))
	// The flusher sees closed on its next round; make sure there is one.
	select {
	case b.wake <- struct{}{}:
	default:
	}
	<-b.done
	b.mu.Lock()
	if b.err == nil {
		b.err = errClosed
	}
	b.cond.Broadcast()
	b.mu.Unlock()
	return b.Conn.Close()
}

// SetWriteDeadline is ignored: writes only fill the buffer, and each flush has its own
// deadline (Options.WriteTimeout).
func (b *bufferedConn) SetWriteDeadline(time.Time) error { return nil }

// SetDeadline applies t to reads only (see SetWriteDeadline).
func (b *bufferedConn) SetDeadline(t time.Time) error { return b.Conn.SetReadDeadline(t) }

// openBuffered opens the connections paho would (tcp, mqtt, unix, ssl, tls, mqtts,
// mqtt+ssl, tcps, ws, wss; proxies from the environment for tcp and TLS as paho does) and
// wraps them in a bufferedConn.
func openBuffered(uri *url.URL, o mqtt.ClientOptions) (net.Conn, error) {
	dialer := o.Dialer
	if dialer == nil {
		dialer = &net.Dialer{Timeout: 30 * time.Second}
	}
	var (
		c   net.Conn
		err error
	)
	switch uri.Scheme {
	case "mqtt", "tcp":
		c, err = proxy.FromEnvironmentUsing(dialer).Dial("tcp", uri.Host)
	case "unix":
		path := uri.Host
		if path == "" {
			path = uri.Path
		}
		c, err = dialer.Dial("unix", path)
	case "ssl", "tls", "mqtts", "mqtt+ssl", "tcps":
		var raw net.Conn
		if raw, err = proxy.FromEnvironmentUsing(dialer).Dial("tcp", uri.Host); err == nil {
			tc := tls.Client(raw, tlsConfigFor(o.TLSConfig, uri))
			ctx, cancel := context.WithTimeout(context.Background(), o.ConnectTimeout)
			if err = tc.HandshakeContext(ctx); err != nil {
				raw.Close()
			}
			cancel()
			c = tc
		}
	case "ws", "wss":
		dialURI := *uri
		dialURI.User = nil
		var tc *tls.Config
		if uri.Scheme == "wss" {
			tc = o.TLSConfig
		}
		c, err = mqtt.NewWebsocket(dialURI.String(), tc, o.ConnectTimeout, o.HTTPHeaders, o.WebsocketOptions)
	default:
		return nil, fmt.Errorf("mqttbus: unknown scheme %q in broker URL (use tcp, ssl, ws or wss)", uri.Scheme)
	}
	if err != nil {
		return nil, err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		// Room in the kernel for a burst of incoming messages while the process is busy:
		// brokers drop what does not fit in their queue for a subscriber that stops
		// reading. (Linux caps this at net.core.rmem_max.)
		_ = tc.SetReadBuffer(socketReadBuffer)
	}
	return newBufferedConn(c, o.WriteTimeout), nil
}

// tlsConfigFor fills in the server name from the URL, as tls.Dial would.
func tlsConfigFor(c *tls.Config, uri *url.URL) *tls.Config {
	if c == nil {
		c = &tls.Config{}
	}
	if c.ServerName == "" && !c.InsecureSkipVerify {
		c = c.Clone()
		c.ServerName = uri.Hostname()
	}
	return c
}
