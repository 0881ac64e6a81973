package broker

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// clientConn is every client connection the broker accepts. It does two jobs for mochi's
// client loops, without a goroutine per idle connection:
//
//   - No write blocks. mochi holds a client's lock while it writes to that client's
//     socket, and takes the same lock on the publisher's goroutine to number every QoS 1
//     delivery (mochi v2.7.9 Client.WritePacket, Client.NextPacketID): one client that
//     stops reading would otherwise freeze every publisher whose messages it receives,
//     and with them the whole service. So Write only queues: what the socket takes at
//     once is written at once (plain TCP), the rest is kept and written out by a flusher
//     goroutine that exists only while something is kept. A client whose kept bytes pass
//     maxPending, or that takes no part of a write within writeDeadline, is a slow
//     consumer: its connection is closed and onSlow is told, and mochi ends the client as
//     for any broken connection (a persistent session stays). This is NATS's policy.
//
//   - Writes are batched, the way Redis batches replies. mochi writes each
//     acknowledgement (PUBACK, SUBACK, ...) from the client's read goroutine with its own
//     write, and on loopback each such write also runs the receiver's network stack: for
//     a client that publishes thousands of messages a second (the updater's fan-out) that
//     was most of the broker's work. A write made while the reader is between reads is
//     kept and written out together with the others just before the reader next blocks
//     on the socket (at the latest after maxDelay, should the reader be held up). A write
//     made while the reader waits for input (an idle device receiving a delivery) goes
//     out at once, so nothing waits for input that may never come.
//
// One goroutine at a time owns the socket's write side (flushing is set): the flusher,
// the reader writing out its batch before it blocks, the batch timer, or Close.
type clientConn struct {
	net.Conn
	raw           *rawWriter // non-blocking writes to the socket; nil where there is none (TLS, WebSocket)
	maxPending    int
	writeDeadline time.Duration
	onSlow        func(c *clientConn, err error) // told once, after the connection is closed
	onClose       func()                         // told once, by Close
	closeOnce     sync.Once

	mu       sync.Mutex // guards the fields below; never held during a blocking system call
	idle     sync.Cond  // signalled when flushing ends
	pending  []byte
	reading  bool        // the reader is blocked in the underlying Read
	flushing bool        // a goroutine owns the socket's write side
	timer    *time.Timer // flushes after maxDelay; armed while something is kept
	armed    bool
	closeBy  time.Time // set by Close: no write may take longer
	err      error     // first write error; every later Write and Read returns it
	client   string    // the MQTT client id, once known (for the slow-consumer log)
}

const (
	// maxBatch bounds the bytes kept for batching: past it, they go out at once.
	maxBatch = 64 << 10
	// maxDelay bounds how long a write is kept for batching.
	maxDelay = 2 * time.Millisecond
	// writeSlice is the most written to the socket with one deadline: a client must take
	// at least this much within the write deadline to stay connected.
	writeSlice = 64 << 10
)

// SlowConsumerError is the error a slow consumer's connection ends with.
type SlowConsumerError struct {
	Reason  string // "pending bytes" or "write deadline"
	Pending int    // bytes kept for the client when it was cut off
}

func (e *SlowConsumerError) Error() string {
	return fmt.Sprintf("broker: slow consumer disconnected (%s, %d bytes pending)", e.Reason, e.Pending)
}

// ErrSlowConsumer matches every *SlowConsumerError with errors.Is.
var ErrSlowConsumer = errors.New("broker: slow consumer")

func (e *SlowConsumerError) Is(target error) bool { return target == ErrSlowConsumer }

func newClientConn(c net.Conn, maxPending int, writeDeadline time.Duration, onSlow func(*clientConn, error)) *clientConn {
	cc := &clientConn{Conn: c, raw: newRawWriter(c), maxPending: maxPending,
		writeDeadline: writeDeadline, onSlow: onSlow}
	cc.idle.L = &cc.mu
	// The listener's deadline for TLS and CONNECT would also end writes (tryWrite's
	// direct ones too, which check it); from here on clientConn bounds writes itself.
	_ = c.SetWriteDeadline(time.Time{})
	return cc
}

// NetConn returns the wrapped connection (crypto/tls's Conn has the same method).
func (c *clientConn) NetConn() net.Conn { return c.Conn }

// SetDeadline sets the read deadline only. mochi sets its keepalive deadline with it,
// which is about the client's input; writes are bounded by clientConn's own write
// deadline and pending bytes.
func (c *clientConn) SetDeadline(t time.Time) error { return c.Conn.SetReadDeadline(t) }

// SetWriteDeadline does nothing, for the same reason.
func (c *clientConn) SetWriteDeadline(time.Time) error { return nil }

// setClient records the MQTT client id for logs.
func (c *clientConn) setClient(id string) {
	c.mu.Lock()
	c.client = id
	c.mu.Unlock()
}

// Write queues p and returns at once; it fails only once the connection has failed.
func (c *clientConn) Write(p []byte) (int, error) {
	n := len(p)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return 0, err
	}
	if (c.reading || len(p) >= maxBatch) && !c.flushing && len(c.pending) == 0 && c.raw != nil {
		// The socket is ours and nothing is queued before p: write what it takes now.
		// (Batching is for small writes made while the reader handles input; a large one,
		// such as a chunk delivered from the subscriber's own goroutine, goes at once.)
		w, err := c.raw.tryWrite(p)
		if err != nil {
			c.failLocked(err)
			c.mu.Unlock()
			_ = c.Conn.Close() // releases the reader, which ends mochi's client
			return 0, err
		}
		p = p[w:]
		if len(p) == 0 {
			c.mu.Unlock()
			return n, nil
		}
	}
	if len(c.pending)+len(p) > c.maxPending {
		err := &SlowConsumerError{Reason: "pending bytes", Pending: len(c.pending) + len(p)}
		c.failLocked(err)
		c.mu.Unlock()
		c.cutOff(err)
		return 0, err
	}
	c.pending = append(c.pending, p...)
	switch {
	case c.flushing:
		// The owner of the write side takes it with the rest.
	case !c.reading && len(c.pending) <= maxBatch:
		if !c.armed {
			c.armed = true
			if c.timer == nil {
				c.timer = time.AfterFunc(maxDelay, c.timedFlush)
			} else {
				c.timer.Reset(maxDelay)
			}
		}
	default:
		c.flushing = true
		go c.flush()
	}
	c.mu.Unlock()
	return n, nil
}

// Read writes out what is kept before it may block.
func (c *clientConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	for {
		if c.err != nil {
			err := c.err
			c.mu.Unlock()
			return 0, err
		}
		if c.flushing || len(c.pending) == 0 {
			break
		}
		c.flushing = true
		c.mu.Unlock()
		c.flush()
		c.mu.Lock()
	}
	// Nothing may be kept for batching once reading is set: from then on writes go out.
	c.reading = true
	c.mu.Unlock()
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	c.reading = false
	if err != nil && c.err != nil {
		err = c.err // the reason the connection was closed under the reader
	}
	c.mu.Unlock()
	return n, err
}

// timedFlush writes out what is still kept maxDelay after it was written.
func (c *clientConn) timedFlush() {
	c.mu.Lock()
	c.armed = false
	if c.flushing || len(c.pending) == 0 || c.err != nil {
		c.mu.Unlock()
		return
	}
	c.flushing = true
	c.mu.Unlock()
	c.flush()
}

// flush writes out what is kept until nothing is; the caller has set flushing.
func (c *clientConn) flush() {
	c.mu.Lock()
	for len(c.pending) > 0 && c.err == nil {
		out := c.pending
		c.pending = nil
		c.mu.Unlock()
		err := c.writeOut(out)
		c.mu.Lock()
		if err != nil {
			c.failLocked(err)
			c.mu.Unlock()
			if errors.Is(err, ErrSlowConsumer) {
				c.cutOff(err)
			} else {
				_ = c.Conn.Close() // releases the reader, which ends mochi's client
			}
			c.mu.Lock()
		}
	}
	c.flushing = false
	c.idle.Broadcast()
	c.mu.Unlock()
}

// writeOut writes b to the socket, a slice at a time, each within the write deadline (or
// Close's). A slice of which the client takes nothing in time makes it a slow consumer.
func (c *clientConn) writeOut(b []byte) error {
	for len(b) > 0 {
		s := b[:min(len(b), writeSlice)]
		// The deadline is set under mu, so that Close's shorter one is never overwritten.
		c.mu.Lock()
		deadline, closing := time.Now().Add(c.writeDeadline), !c.closeBy.IsZero()
		if closing && c.closeBy.Before(deadline) {
			deadline = c.closeBy
		}
		_ = c.Conn.SetWriteDeadline(deadline)
		c.mu.Unlock()
		n, err := c.Conn.Write(s)
		b = b[n:]
		var ne net.Error
		switch {
		case err == nil:
		case errors.As(err, &ne) && ne.Timeout() && !closing:
			if n > 0 && c.raw != nil {
				continue // the client took some: it is slow, not stalled (plain TCP only; TLS cannot resume)
			}
			c.mu.Lock()
			pending := len(c.pending)
			c.mu.Unlock()
			return &SlowConsumerError{Reason: "write deadline", Pending: len(b) + pending}
		default:
			return err
		}
	}
	// Clear the deadline, or the direct writes of tryWrite would find it expired.
	c.mu.Lock()
	if c.closeBy.IsZero() {
		_ = c.Conn.SetWriteDeadline(time.Time{})
	}
	c.mu.Unlock()
	return nil
}

func (c *clientConn) failLocked(err error) {
	if c.err == nil {
		c.err = err
	}
}

// cutOff closes a slow consumer's connection, which ends mochi's client, and reports it.
func (c *clientConn) cutOff(err error) {
	_ = c.Conn.Close()
	if c.onSlow != nil {
		c.onSlow(c, err)
	}
}

// Close writes out what is kept (for up to a second: a refused client's CONNACK, a
// DISCONNECT) and closes the connection.
func (c *clientConn) Close() error {
	c.mu.Lock()
	c.closeBy = time.Now().Add(time.Second)
	if c.timer != nil {
		c.timer.Stop()
		c.armed = false
	}
	if !c.flushing && len(c.pending) > 0 && c.err == nil {
		c.flushing = true
		c.mu.Unlock()
		c.flush()
		c.mu.Lock()
	}
	if c.flushing {
		// Bound the owner's current write too, then wait for it.
		_ = c.Conn.SetWriteDeadline(c.closeBy)
		for c.flushing {
			c.idle.Wait()
		}
	}
	if c.err == nil {
		c.err = net.ErrClosed
	}
	c.mu.Unlock()
	if c.onClose != nil {
		c.closeOnce.Do(c.onClose)
	}
	return c.Conn.Close()
}
