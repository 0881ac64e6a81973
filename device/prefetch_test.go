package device_test

import (
	"bytes"
	"testing"
	"time"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/internal/testkit/devicetest"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// TestPrefetch: a device told of a release by a notice that verifies under its key
// downloads every chunk before the key comes, checked against the chunk tree; when the
// key comes it installs from what it kept, with the chunk topics gone from the broker
// [SC-9.9]. A notice with a bad MAC, or one at another index, is ignored.
func TestPrefetch(t *testing.T) {
	e := newEnv(t)
	const serial = "pre-1"
	v, inst := e.provision(serial, t.TempDir())
	store, err := device.NewDirChunkStore(t.TempDir(), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	rec := &devicetest.Recorder{}
	o := e.opts(v, inst, rec)
	o.Prefetch = store
	run(t, o)
	img := image(9*testChunk+7, 51)
	r := e.release(img, 1)

	// Forged, and at another index: nothing is fetched.
	forged := e.srv.Notice(r, serial, 0)
	forged[80] ^= 1
	e.srv.Publish(protocol.PrefetchTopic(serial), forged, true)
	time.Sleep(300 * time.Millisecond)
	if rec.Count(device.EventPrefetched) != 0 {
		t.Fatal("a notice with a bad MAC started a prefetch")
	}
	if _, ok := store.Get(r.ID, 0); ok {
		t.Fatal("a notice with a bad MAC made the device keep a chunk")
	}

	e.srv.Publish(protocol.PrefetchTopic(serial), e.srv.Notice(r, serial, 0), true)
	deadline := time.Now().Add(20 * time.Second)
	for rec.Count(device.EventPrefetched) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the release was not prefetched")
		}
		time.Sleep(10 * time.Millisecond)
	}
	for i := range r.Chunks {
		got, ok := store.Get(r.ID, uint32(i))
		if !ok || !bytes.Equal(got, r.Chunks[i]) {
			t.Fatalf("chunk %d kept: %v", i, ok)
		}
	}
	if st, _ := v.Load(); st.Seq != 16 || st.Version != 0 {
		t.Fatalf("prefetching changed the vault: D=%d v=%d", st.Seq, st.Version)
	}
	// The chunks leave the broker; the key comes; the device installs from what it kept.
	for i := range r.Chunks {
		e.srv.Publish(protocol.ChunkTopic(r.ID, uint32(i)), nil, true)
	}
	fetches := rec.Fetches()
	if err := e.srv.Wrap(r, serial); err != nil {
		t.Fatal(err)
	}
	if _, err := e.srv.WaitAck(serial, 20*time.Second, func(a keychain.Ack) bool { return a.Kind == keychain.AckInstalled && a.ID == r.ID }); err != nil {
		t.Fatal(err)
	}
	checkSlot(t, inst, img)
	if after := rec.Fetches(); len(after) != len(fetches) {
		t.Fatalf("the install fetched chunks (%v before the key, %v after): it should use the kept ones", fetches, after)
	}
	if _, ok := store.Get(r.ID, 0); ok {
		t.Fatal("the kept chunks were not dropped after the install")
	}
}

// TestPrefetchOverLimit: a release whose chunks exceed the device's limit is not
// prefetched; the key then installs it the usual way [SC-9.9].
func TestPrefetchOverLimit(t *testing.T) {
	e := newEnv(t)
	const serial = "pre-2"
	v, inst := e.provision(serial, t.TempDir())
	store := device.NewMemChunkStore(4 * testChunk)
	rec := &devicetest.Recorder{}
	o := e.opts(v, inst, rec)
	o.Prefetch = store
	run(t, o)
	img := image(9*testChunk, 52)
	r := e.release(img, 1)
	e.srv.Publish(protocol.PrefetchTopic(serial), e.srv.Notice(r, serial, 0), true)
	time.Sleep(500 * time.Millisecond)
	if rec.Count(device.EventPrefetched) != 0 {
		t.Fatal("a release over the limit was prefetched")
	}
	if _, ok := store.Get(r.ID, 0); ok {
		t.Fatal("a chunk of a release over the limit was kept")
	}
	e.srv.Wrap(r, serial)
	if _, err := e.srv.WaitAck(serial, 20*time.Second, func(a keychain.Ack) bool { return a.Kind == keychain.AckInstalled }); err != nil {
		t.Fatal(err)
	}
	checkSlot(t, inst, img)
}
