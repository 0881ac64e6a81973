package broker

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

func tcpPair(t *testing.T) (server *clientConn, client net.Conn) {
	return tcpPairWith(t, DefaultMaxPending, DefaultWriteDeadline, nil)
}

func tcpPairWith(t *testing.T, maxPending int, deadline time.Duration, onSlow func(*clientConn, error)) (server *clientConn, client net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c := <-accepted
	if c == nil {
		t.Fatal("accept failed")
	}
	server = newClientConn(c, maxPending, deadline, onSlow)
	t.Cleanup(func() { server.Close(); client.Close() })
	return server, client
}

func readWithin(t *testing.T, c net.Conn, n int) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	b := make([]byte, n)
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("reading %d bytes: %v", n, err)
	}
	return b
}

// TestClientConnIdleReaderWritesAtOnce: while the reader waits for input that does not
// come (an idle device), a delivery written from another goroutine reaches the peer
// without waiting for that input.
func TestClientConnIdleReaderWritesAtOnce(t *testing.T) {
	bc, peer := tcpPair(t)
	readerIn := make(chan struct{})
	go func() {
		close(readerIn)
		bc.Read(make([]byte, 1)) // blocks: the peer sends nothing
	}()
	<-readerIn
	// The reader may not be in Read yet; keep writing until the peer sees a byte.
	got := make(chan []byte, 1)
	go func() { got <- readWithin(t, peer, 5) }()
	deadline := time.After(10 * time.Second)
	for i := 0; ; i++ {
		select {
		case b := <-got:
			if !bytes.Equal(b, []byte("hello")) {
				t.Fatalf("peer got %q", b)
			}
			return
		case <-deadline:
			t.Fatal("a write made while the reader was blocked never reached the peer")
		case <-time.After(10 * time.Millisecond):
			if i == 0 {
				bc.Write([]byte("hello"))
			}
		}
	}
}

// TestClientConnFlushesBeforeReading: writes made between reads (acknowledgements of the
// input being handled) reach the peer before the reader blocks again, whole and in order,
// also when another goroutine writes at the same time.
func TestClientConnFlushesBeforeReading(t *testing.T) {
	bc, peer := tcpPair(t)
	const rounds, per, others = 200, 20, 2000
	record := func(kind byte, n uint32) []byte {
		return append(binary.BigEndian.AppendUint32([]byte{kind, 8}, n), 0, 0)
	}
	go func() { // a second writer, as mochi's write loop is
		for i := uint32(0); i < others; i++ {
			if _, err := bc.Write(record('O', i)); err != nil {
				return
			}
			if i%10 == 0 {
				time.Sleep(time.Millisecond)
			}
		}
	}()
	go func() { // the reader: for each byte in, per records out, then read again
		buf := make([]byte, 1)
		for r := uint32(0); r < rounds; r++ {
			if _, err := bc.Read(buf); err != nil {
				return
			}
			for i := uint32(0); i < per; i++ {
				bc.Write(record('R', r*per+i))
			}
		}
	}()
	in := bufio.NewReader(peer)
	peer.SetReadDeadline(time.Now().Add(30 * time.Second))
	var nextR, nextO uint32
	next := func() {
		rec := make([]byte, 8)
		if _, err := io.ReadFull(in, rec); err != nil {
			t.Fatalf("after R %d, O %d: %v", nextR, nextO, err)
		}
		n := binary.BigEndian.Uint32(rec[2:])
		switch {
		case rec[0] == 'R' && rec[1] == 8 && n == nextR:
			nextR++
		case rec[0] == 'O' && rec[1] == 8 && n == nextO:
			nextO++
		default:
			t.Fatalf("record %q out of order or torn (next R %d, next O %d)", rec, nextR, nextO)
		}
	}
	for r := 0; r < rounds; r++ {
		peer.Write([]byte{1})
		// Every record of this round arrives without more input from the peer.
		for nextR < uint32(r+1)*per {
			next()
		}
	}
	for nextO < others {
		next()
	}
}

// TestClientConnCloseFlushes: what is kept when the connection is closed (a refused
// client's CONNACK) still reaches the peer.
func TestClientConnCloseFlushes(t *testing.T) {
	bc, peer := tcpPair(t)
	bc.Write([]byte("connack")) // the reader is not in Read: kept
	bc.Close()
	peer.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(peer)
	if err != nil || string(got) != "connack" {
		t.Fatalf("peer got %q, %v", got, err)
	}
}

// TestClientConnReaderHeldUp: writes kept while the reader is held up elsewhere (never
// returning to Read) still go out, after at most maxDelay.
func TestClientConnReaderHeldUp(t *testing.T) {
	bc, peer := tcpPair(t)
	bc.Write([]byte("puback")) // no Read will ever flush this
	if got := readWithin(t, peer, 6); string(got) != "puback" {
		t.Fatalf("peer got %q", got)
	}
}

// stallingPeer dials with a small receive buffer and never reads, like a client that
// stopped reading: the server's writes fill the socket buffers and then stall.
func stallingPair(t *testing.T, maxPending int, deadline time.Duration) (*clientConn, net.Conn, <-chan error) {
	t.Helper()
	slow := make(chan error, 1)
	server, client := tcpPairWith(t, maxPending, deadline, func(_ *clientConn, err error) { slow <- err })
	if tc, ok := client.(*net.TCPConn); ok {
		_ = tc.SetReadBuffer(4096)
	}
	return server, client, slow
}

// TestClientConnWriteNeverBlocks: writes to a peer that never reads return at once, up to
// maxPending; past it the connection is cut off as a slow consumer, and every later write
// fails at once.
func TestClientConnWriteNeverBlocks(t *testing.T) {
	const maxPending = 8 << 20
	c, _, slow := stallingPair(t, maxPending, time.Hour)
	go c.Read(make([]byte, 1)) // a reader blocked on input, as mochi's is
	msg := make([]byte, 64<<10)
	done := make(chan error, 1)
	go func() {
		// Far more than the socket buffers and maxPending hold together.
		for range 4 * maxPending / len(msg) {
			if _, err := c.Write(msg); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if !errors.Is(err, ErrSlowConsumer) {
			t.Fatalf("writes ended with %v, want a slow-consumer error", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("a write blocked on a peer that does not read")
	}
	var sc *SlowConsumerError
	if err := <-slow; !errors.As(err, &sc) || sc.Reason != "pending bytes" || sc.Pending <= maxPending {
		t.Fatalf("reported %v", err)
	}
	if _, err := c.Write([]byte("x")); !errors.Is(err, ErrSlowConsumer) {
		t.Fatalf("write after cut-off: %v", err)
	}
}

// TestClientConnWriteDeadline: a peer that takes nothing within the write deadline is cut
// off, and the reader blocked on its input returns the slow-consumer error.
func TestClientConnWriteDeadline(t *testing.T) {
	c, peer, slow := stallingPair(t, DefaultMaxPending, 200*time.Millisecond)
	readErr := make(chan error, 1)
	go func() {
		_, err := c.Read(make([]byte, 1))
		readErr <- err
	}()
	msg := make([]byte, 64<<10)
	for range 256 { // 16 MiB: more than loopback's socket buffers
		if _, err := c.Write(msg); err != nil {
			break
		}
	}
	var sc *SlowConsumerError
	select {
	case err := <-slow:
		if !errors.As(err, &sc) || sc.Reason != "write deadline" {
			t.Fatalf("reported %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("a peer that reads nothing was not cut off")
	}
	select {
	case err := <-readErr:
		if !errors.Is(err, ErrSlowConsumer) {
			t.Fatalf("reader got %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the reader was not released")
	}
	// The socket is closed (the peer sees the end once it has drained what reached it).
	if err := c.Conn.SetReadDeadline(time.Time{}); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("the slow consumer's socket is still open (%v)", err)
	}
	_ = peer
}

// TestClientConnSlowReaderKept: a peer that reads slowly but steadily is not cut off,
// however much waits for it, and gets every byte in order.
func TestClientConnSlowReaderKept(t *testing.T) {
	slow := make(chan error, 1)
	c, peer := tcpPairWith(t, DefaultMaxPending, 300*time.Millisecond, func(_ *clientConn, err error) { slow <- err })
	go c.Read(make([]byte, 1))
	const block, total = 32 << 10, 24 << 20 // more than loopback's socket buffers hold
	go func() {
		b := make([]byte, block)
		for i := range total / block {
			for j := range b {
				b[j] = byte(i)
			}
			if _, err := c.Write(b); err != nil {
				return
			}
		}
	}()
	buf := make([]byte, 64<<10)
	got := 0
	peer.SetReadDeadline(time.Now().Add(60 * time.Second))
	for got < total {
		n, err := peer.Read(buf)
		if err != nil {
			t.Fatalf("after %d bytes: %v", got, err)
		}
		for k := range n {
			if buf[k] != byte((got+k)/block) {
				t.Fatalf("byte %d out of order", got+k)
			}
		}
		got += n
		time.Sleep(2 * time.Millisecond) // at most 32 MB/s
	}
	select {
	case err := <-slow:
		t.Fatalf("a reading peer was cut off: %v", err)
	default:
	}
}
