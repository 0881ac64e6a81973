package broker

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

func tcpPair(t *testing.T) (server *batchConn, client net.Conn) {
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
	server = newBatchConn(c)
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

// TestBatchConnIdleReaderWritesAtOnce: while the reader waits for input that does not
// come (an idle device), a delivery written from another goroutine reaches the peer
// without waiting for that input.
func TestBatchConnIdleReaderWritesAtOnce(t *testing.T) {
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

// TestBatchConnFlushesBeforeReading: writes made between reads (acknowledgements of the
// input being handled) reach the peer before the reader blocks again, whole and in order,
// also when another goroutine writes at the same time.
func TestBatchConnFlushesBeforeReading(t *testing.T) {
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

// TestBatchConnCloseFlushes: what is kept when the connection is closed (a refused
// client's CONNACK) still reaches the peer.
func TestBatchConnCloseFlushes(t *testing.T) {
	bc, peer := tcpPair(t)
	bc.Write([]byte("connack")) // the reader is not in Read: kept
	bc.Close()
	peer.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(peer)
	if err != nil || string(got) != "connack" {
		t.Fatalf("peer got %q, %v", got, err)
	}
}

// TestBatchConnReaderHeldUp: writes kept while the reader is held up elsewhere (never
// returning to Read) still go out, after at most maxDelay.
func TestBatchConnReaderHeldUp(t *testing.T) {
	bc, peer := tcpPair(t)
	bc.Write([]byte("puback")) // no Read will ever flush this
	if got := readWithin(t, peer, 6); string(got) != "puback" {
		t.Fatalf("peer got %q", got)
	}
}
