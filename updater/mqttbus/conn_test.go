package mqttbus

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server net.Conn) {
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
	server = <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// TestBufferedConnKeepsEveryWrite: concurrent writers, as paho's outgoing goroutine and
// its acks are; every record arrives once, whole, and in each writer's order.
func TestBufferedConnKeepsEveryWrite(t *testing.T) {
	c, peer := tcpPair(t)
	bc := newBufferedConn(c, 10*time.Second)
	const writers, records = 4, 5000
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range records {
				// A record: writer, index, and a body whose size varies with i.
				rec := make([]byte, 8+i%300)
				binary.BigEndian.PutUint32(rec, uint32(w))
				binary.BigEndian.PutUint32(rec[4:], uint32(i))
				if _, err := bc.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(rec))), rec...)); err != nil {
					t.Errorf("write: %v", err)
					return
				}
			}
		}()
	}
	next := make([]uint32, writers)
	done := make(chan error, 1)
	go func() {
		r := peer
		var hdr [2]byte
		for n := 0; n < writers*records; n++ {
			if _, err := io.ReadFull(r, hdr[:]); err != nil {
				done <- err
				return
			}
			rec := make([]byte, binary.BigEndian.Uint16(hdr[:]))
			if _, err := io.ReadFull(r, rec); err != nil {
				done <- err
				return
			}
			w, i := binary.BigEndian.Uint32(rec), binary.BigEndian.Uint32(rec[4:])
			if w >= writers || i != next[w] || len(rec) != 8+int(i)%300 {
				done <- errors.New("record out of order, torn or duplicated")
				return
			}
			next[w]++
		}
		done <- nil
	}()
	wg.Wait()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("records still missing after 30 s: got %v of %d each", next, records)
	}
	bc.Close()
}

// TestBufferedConnCloseFlushes: what was written before Close reaches the peer (paho
// writes DISCONNECT and closes at once), then the peer sees the end.
func TestBufferedConnCloseFlushes(t *testing.T) {
	c, peer := tcpPair(t)
	bc := newBufferedConn(c, 10*time.Second)
	want := bytes.Repeat([]byte("sealcast"), 100_000) // more than maxPending
	go func() {
		for off := 0; off < len(want); off += 1000 {
			bc.Write(want[off:min(off+1000, len(want))])
		}
		bc.Close()
	}()
	peer.SetReadDeadline(time.Now().Add(30 * time.Second))
	got, err := io.ReadAll(peer)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("peer got %d bytes, want %d", len(got), len(want))
	}
	if _, err := bc.Write([]byte("late")); err == nil {
		t.Error("Write after Close succeeded")
	}
}

// TestBufferedConnFailure: once the peer is gone, writes fail and stay failed, and a
// read returns an error, so that paho notices and reconnects.
func TestBufferedConnFailure(t *testing.T) {
	c, peer := tcpPair(t)
	bc := newBufferedConn(c, 10*time.Second)
	peer.(*net.TCPConn).SetLinger(0) // reset, so writes fail instead of filling buffers
	peer.Close()
	deadline := time.Now().Add(30 * time.Second)
	var err error
	for err == nil && time.Now().Before(deadline) {
		_, err = bc.Write(make([]byte, 4096))
		time.Sleep(time.Millisecond)
	}
	if err == nil {
		t.Fatal("writes to a reset connection kept succeeding for 30 s")
	}
	if _, again := bc.Write([]byte{1}); again == nil {
		t.Error("a write after a failed flush succeeded")
	}
	bc.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := bc.Read(make([]byte, 1)); err == nil {
		t.Error("read on a failed connection succeeded")
	}
	bc.Close()
}
