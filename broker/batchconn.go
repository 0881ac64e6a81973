package broker

import (
	"net"
	"sync"
	"time"
)

// batchConn batches what mochi writes to a client while it is busy with that client's
// input, the way Redis batches replies. mochi writes each acknowledgement (PUBACK,
// SUBACK, ...) from the client's read goroutine as its own write system call, and on
// loopback each such write also runs the receiver's network stack: for a client that
// publishes thousands of messages a second (the updater, during a fan-out), that is most
// of the broker's work.
//
// A write made while the connection's reader is between reads is kept, and written out
// together with the others just before the reader next blocks on the socket, which
// happens as soon as it has handled the input it already has (and at the latest after
// maxDelay, should the reader be held up). A write made while the reader is blocked (an
// idle device receiving a delivery) goes out at once, as before, so nothing waits for
// input that may never come. No goroutine is added per connection.
type batchConn struct {
	net.Conn
	wmu sync.Mutex // held while writing to the socket, so that writes keep their order

	mu      sync.Mutex // guards the fields below; never held during a system call
	pending []byte
	reading bool        // the reader is blocked in the underlying Read
	timer   *time.Timer // flushes after maxDelay; armed while something is kept
	armed   bool
	err     error // first write error
}

const (
	// maxBatch bounds the bytes kept: past it, a write goes out at once with what is kept.
	maxBatch = 64 << 10
	// maxDelay bounds how long a write is kept.
	maxDelay = 2 * time.Millisecond
)

func newBatchConn(c net.Conn) *batchConn { return &batchConn{Conn: c} }

// NetConn returns the wrapped connection (crypto/tls's Conn has the same method).
func (c *batchConn) NetConn() net.Conn { return c.Conn }

func (c *batchConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return 0, err
	}
	if !c.reading && len(c.pending)+len(p) <= maxBatch {
		c.pending = append(c.pending, p...)
		if !c.armed {
			c.armed = true
			if c.timer == nil {
				c.timer = time.AfterFunc(maxDelay, c.timedFlush)
			} else {
				c.timer.Reset(maxDelay)
			}
		}
		c.mu.Unlock()
		return len(p), nil
	}
	c.mu.Unlock()
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.flush(); err != nil {
		return 0, err
	}
	n, err := c.Conn.Write(p)
	if err != nil {
		c.fail(err)
	}
	return n, err
}

// Read writes out what is kept before it may block.
func (c *batchConn) Read(p []byte) (int, error) {
	for {
		// Nothing may be kept once reading is set: from then on writes go out at once.
		c.mu.Lock()
		if len(c.pending) == 0 || c.err != nil {
			c.reading = true
			c.mu.Unlock()
			break
		}
		c.mu.Unlock()
		c.wmu.Lock()
		err := c.flush()
		c.wmu.Unlock()
		if err != nil {
			return 0, err
		}
	}
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	c.reading = false
	c.mu.Unlock()
	return n, err
}

// timedFlush writes out what is still kept maxDelay after it was written.
func (c *batchConn) timedFlush() {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	c.armed = false
	c.mu.Unlock()
	_ = c.flush()
}

// flush writes out what is kept; the caller holds wmu.
func (c *batchConn) flush() error {
	c.mu.Lock()
	out, err := c.pending, c.err
	c.pending = nil
	c.mu.Unlock()
	if err != nil || len(out) == 0 {
		return err
	}
	if _, err := c.Conn.Write(out); err != nil {
		c.fail(err)
		return err
	}
	return nil
}

func (c *batchConn) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
}

// Close writes out what is kept (for up to a second: a refused client's CONNACK, a
// DISCONNECT) and closes the connection.
func (c *batchConn) Close() error {
	c.mu.Lock()
	waiting := len(c.pending) > 0 && c.err == nil
	c.mu.Unlock()
	if waiting {
		_ = c.Conn.SetWriteDeadline(time.Now().Add(time.Second))
		c.wmu.Lock()
		_ = c.flush()
		c.wmu.Unlock()
	}
	c.mu.Lock()
	if c.timer != nil {
		c.timer.Stop()
	}
	c.mu.Unlock()
	return c.Conn.Close()
}
