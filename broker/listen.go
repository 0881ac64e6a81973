package broker

import (
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// connListener wraps a net.Listener for mochi's listeners.Net:
//   - it wraps every accepted connection in a clientConn: batched writes that never block,
//     and slow consumers cut off;
//   - it gives every accepted connection a deadline for its CONNECT (mochi applies the
//     keepalive deadline only after reading CONNECT, so without this a client that never
//     sends one holds a socket and a goroutine forever);
//   - it lets Close wait until mochi's accept loop has returned.
type connListener struct {
	net.Listener
	connectTimeout time.Duration
	wrap           func(net.Conn) *clientConn
	// unread counts accepted connections that mochi has not read from yet: until the
	// first read, mochi's goroutine for it may not have registered with its ClientsWg,
	// and a Close meanwhile races with that (upstream #424). Close waits for it to reach 0.
	unread    atomic.Int64
	once      sync.Once
	done      chan struct{} // closed when Accept has returned an error after Close
	closing   chan struct{}
	closeOnce sync.Once
}

func newConnListener(l net.Listener, connectTimeout time.Duration, wrap func(net.Conn) *clientConn) *connListener {
	return &connListener{Listener: l, connectTimeout: connectTimeout, wrap: wrap,
		done: make(chan struct{}), closing: make(chan struct{})}
}

func (l *connListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			select {
			case <-l.closing:
				l.once.Do(func() { close(l.done) })
				return nil, err
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				// A transient error (e.g. EMFILE under load) must not stop the
				// broker from accepting: mochi's loop returns on any error.
				time.Sleep(50 * time.Millisecond)
				continue
			}
			l.once.Do(func() { close(l.done) })
			return nil, err
		}
		// The deadline covers the TLS handshake and the CONNECT packet; mochi replaces it
		// with the keepalive deadline once CONNECT is read.
		_ = c.SetDeadline(time.Now().Add(l.connectTimeout))
		l.unread.Add(1)
		return l.wrap(&trackedConn{Conn: c, l: l}), nil
	}
}

// settle waits until mochi has read from every accepted connection (or closed it), or d
// elapses.
func (l *connListener) settle(d time.Duration) {
	deadline := time.Now().Add(d)
	for l.unread.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
}

// trackedConn tells its listener when mochi first reads from it or closes it.
type trackedConn struct {
	net.Conn
	l    *connListener
	once sync.Once
}

func (c *trackedConn) seen() { c.once.Do(func() { c.l.unread.Add(-1) }) }

func (c *trackedConn) Read(p []byte) (int, error) {
	c.seen()
	return c.Conn.Read(p)
}

func (c *trackedConn) Close() error {
	c.seen()
	return c.Conn.Close()
}

// netConn returns the connection a mochi client reads from without the broker's own
// wrappers (a *tls.Conn on the TLS listener).
func netConn(c net.Conn) net.Conn {
	for {
		switch w := c.(type) {
		case *clientConn:
			c = w.Conn
		case *trackedConn:
			c = w.Conn
		default:
			return c
		}
	}
}

func (l *connListener) Close() error {
	l.closeOnce.Do(func() { close(l.closing) })
	return l.Listener.Close()
}

// wait waits until the accept loop has seen the listener closed, or d elapses (the loop
// may never have been started if Start was not called).
func (l *connListener) wait(d time.Duration) {
	select {
	case <-l.done:
	case <-time.After(d):
	}
}
