package redisstore_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sealcast/sealcast/internal/testkit/redistest"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/updater"
	"github.com/sealcast/sealcast/updater/redisstore"
	"github.com/sealcast/sealcast/updater/storetest"
)

var prefixes atomic.Int64

// newStore returns a store on url under a key prefix no other test uses, and deletes its
// keys at cleanup.
func newStore(t testing.TB, url string) *redisstore.Store {
	t.Helper()
	o, err := redis.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(o)
	prefix := fmt.Sprintf("sctest-%d-%d", os.Getpid(), prefixes.Add(1))
	t.Cleanup(func() {
		ctx := context.Background()
		iter := rdb.Scan(ctx, 0, prefix+":*", 1000).Iterator()
		var keys []string
		for iter.Next(ctx) {
			keys = append(keys, iter.Val())
		}
		for len(keys) > 0 {
			n := min(len(keys), 1000)
			rdb.Unlink(ctx, keys[:n]...)
			keys = keys[n:]
		}
		rdb.Close()
	})
	return redisstore.New(rdb, redisstore.Options{Prefix: prefix})
}

func TestContract(t *testing.T) {
	url := redistest.URL(t)
	storetest.Run(t, func(t *testing.T) updater.Store { return newStore(t, url) })
}

// TestContractCluster runs the contract suite against a real Redis Cluster (three
// masters, a replica each): every script touches one slot, and batches spread over
// every master.
func TestContractCluster(t *testing.T) {
	c := redistest.StartCluster(t, 3, 1)
	storetest.Run(t, func(t *testing.T) updater.Store {
		rdb := c.Client()
		t.Cleanup(func() { rdb.Close() })
		return redisstore.New(rdb, redisstore.Options{Prefix: fmt.Sprintf("sctest-%d", prefixes.Add(1))})
	})
	// Open takes the cluster's URL as a user gives it to serve -redis.
	s, err := redisstore.Open(c.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Serials(t.Context()); err != nil {
		t.Fatalf("a store opened from %s: %v", c.URL, err)
	}
}

// TestContractSentinel runs the contract suite against a master found through three
// Redis Sentinels, and opens a store from the URL a user gives serve -redis.
func TestContractSentinel(t *testing.T) {
	st := redistest.StartSentinel(t)
	storetest.Run(t, func(t *testing.T) updater.Store {
		rdb := st.Client()
		t.Cleanup(func() { rdb.Close() })
		return redisstore.New(rdb, redisstore.Options{Prefix: fmt.Sprintf("sctest-%d", prefixes.Add(1))})
	})
	s, err := redisstore.Open(st.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Serials(t.Context()); err != nil {
		t.Fatalf("a store opened from %s: %v", st.URL, err)
	}
}

// TestRestartAOF kills Redis (SIGKILL, like a crash) right after an Advance and a
// RecordResults returned, restarts it from its append-only file, and finds both.
func TestRestartAOF(t *testing.T) {
	srv := redistest.Start(t, "--appendonly", "yes", "--appendfsync", "always")
	s, err := redisstore.Open(srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := t.Context()

	d := storetest.NewDevice("aof-1")
	if _, err := s.CreateDevices(ctx, []*updater.Device{d}); err != nil {
		t.Fatal(err)
	}
	id := keychain.ReleaseID{7}
	if err := s.PutRelease(ctx, storetest.NewRelease(id, time.Now())); err != nil {
		t.Fatal(err)
	}
	adv := updater.Advance{Serial: d.Serial, From: d.Pos(), To: updater.Position{Seq: d.Seq - 1}, Chain: []byte("next"), LastAck: []byte("ack")}
	if ok, err := s.Advance(ctx, []updater.Advance{adv}); err != nil || !ok[0] {
		t.Fatalf("Advance = %v, %v", ok, err)
	}
	if err := s.RecordResults(ctx, id, []updater.Result{{Serial: d.Serial, Result: updater.ResultInstalled}}); err != nil {
		t.Fatal(err)
	}

	srv.Restart(t) // SIGKILL, then start again from the append-only file

	// The client reconnects by itself.
	var ds []*updater.Device
	for range 50 {
		if ds, err = s.Devices(ctx, []string{d.Serial}); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("Devices after restart: %v", err)
	}
	if ds[0] == nil || ds[0].Pos() != adv.To || string(ds[0].Chain) != "next" || string(ds[0].LastAck) != "ack" {
		t.Fatalf("after restart: %+v, want the device at %v", ds[0], adv.To)
	}
	r, err := s.Release(ctx, id)
	if err != nil || r.Installed != 1 {
		t.Fatalf("Release after restart = %+v, %v; want 1 installed", r, err)
	}
	// And the compare-and-set still holds against the restored state.
	if ok, err := s.Advance(ctx, []updater.Advance{adv}); err != nil || ok[0] {
		t.Fatalf("repeated Advance after restart = %v, %v; want [false]", ok, err)
	}
}

// TestScriptFlush shows the fallback from EVALSHA to EVAL after Redis lost its scripts.
func TestScriptFlush(t *testing.T) {
	url := redistest.URL(t)
	s := newStore(t, url)
	ctx := t.Context()
	d := storetest.NewDevice("f-1")
	if _, err := s.CreateDevices(ctx, []*updater.Device{d}); err != nil {
		t.Fatal(err)
	}
	o, _ := redis.ParseURL(url)
	rdb := redis.NewClient(o)
	defer rdb.Close()
	if err := rdb.ScriptFlush(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	adv := updater.Advance{Serial: d.Serial, From: d.Pos(), To: updater.Position{Seq: d.Seq - 1}}
	if ok, err := s.Advance(ctx, []updater.Advance{adv, adv}); err != nil || !ok[0] || ok[1] {
		t.Fatalf("Advance after SCRIPT FLUSH = %v, %v; want [true false]", ok, err)
	}
}

func TestOpen(t *testing.T) {
	url := redistest.URL(t)
	s, err := redisstore.Open(url)
	if err != nil {
		t.Fatalf("Open(%s): %v", url, err)
	}
	if _, err := s.Serials(t.Context()); err != nil {
		t.Error(err)
	}
	if err := s.Close(); err != nil {
		t.Error(err)
	}

	for _, tc := range []struct{ url, want string }{
		{"localhost:6379", "no scheme"},
		{"http://localhost", `scheme "http"`},
		{"redis+sentinel://127.0.0.1:1", "master_name"},
		{"redis://127.0.0.1:1/0?dial_timeout=200ms&max_retries=-1", "cannot reach Redis"},
		{"redis://:hunter2@127.0.0.1:1/0?dial_timeout=200ms&max_retries=-1", "cannot reach Redis"},
		{"redis://127.0.0.1/0?nonsense=1", "nonsense"},
	} {
		_, err := redisstore.Open(tc.url)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Open(%q) = %v, want an error mentioning %q", tc.url, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), "hunter2") {
			t.Errorf("Open(%q) error shows the password: %v", tc.url, err)
		}
	}
}

func TestPrefixWithBrace(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Error("New with a prefix containing '{' did not panic")
		}
	}()
	redisstore.New(nil, redisstore.Options{Prefix: "a{b}"})
}

func TestUnknownReleaseIsErrNotFound(t *testing.T) {
	s := newStore(t, redistest.URL(t))
	_, err := s.Release(t.Context(), keychain.ReleaseID{1})
	if !errors.Is(err, updater.ErrNotFound) {
		t.Fatalf("Release: %v", err)
	}
	t.Logf("error: %v", err)
}

const benchBatch = 1000

// The raw rate of the Advance script, without Go in the way, for comparison (1,000 device
// hashes sc:dev:{000000000000}.. created first with HSET epoch 0 seq 1000; from = to so
// every call applies):
//
//	sha=$(redis-cli SCRIPT LOAD "$(the body of advanceScript)")
//	redis-benchmark -n 200000 -P 16 -r 1000 -q EVALSHA $sha 1 'sc:dev:{__rand_int__}' \
//		0 1000 0 1000 1000 2 <120 B chain> <90 B ack> <70 B receipt> installed ok 2025-03-14T09:39:26Z

func BenchmarkAdvance(b *testing.B) {
	url := redistest.URL(b)
	b.Run("batch=1", func(b *testing.B) { storetest.BenchmarkAdvance(b, newStore(b, url), 1) })
	b.Run("batch=1000", func(b *testing.B) { storetest.BenchmarkAdvance(b, newStore(b, url), benchBatch) })
	// With the durability the counters need: every reply after an fsync of the AOF.
	srv := redistest.Start(b, "--appendonly", "yes", "--appendfsync", "always")
	aof := srv.URL()
	b.Run("aof=always/batch=1", func(b *testing.B) { storetest.BenchmarkAdvance(b, newStore(b, aof), 1) })
	b.Run("aof=always/batch=1000", func(b *testing.B) { storetest.BenchmarkAdvance(b, newStore(b, aof), benchBatch) })
}

func BenchmarkDevicesBatch(b *testing.B) {
	storetest.BenchmarkDevices(b, newStore(b, redistest.URL(b)), benchBatch)
}
