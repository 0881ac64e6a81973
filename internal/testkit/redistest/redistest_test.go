package redistest_test

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sealcast/sealcast/internal/testkit/redistest"
)

// TestClusterFailover: a key written to the cluster survives its master's SIGKILL, its
// replica takes the slots over, and the cluster takes writes again.
func TestClusterFailover(t *testing.T) {
	c := redistest.StartCluster(t, 3, 1)
	ctx := context.Background()
	rdb := c.Client()
	defer rdb.Close()
	if err := rdb.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	master := c.MasterOf(t, "k")
	// WAIT on the master itself: the write has reached the replica before the kill.
	direct := redis.NewClient(&redis.Options{Addr: master.Addr})
	if n, err := direct.Do(ctx, "WAIT", 1, 5000).Int(); err != nil || n != 1 {
		t.Logf("WAIT: %d, %v (the write may have been replicated before it)", n, err)
	}
	direct.Close()
	master.Kill()
	c.WaitOK(t, 30*time.Second)
	if now := c.MasterOf(t, "k"); now == master {
		t.Fatal("the killed master still serves the key")
	}
	// The client learns the new map from its first failed command; a few may fail.
	deadline := time.Now().Add(10 * time.Second)
	for {
		v, err := rdb.Get(ctx, "k").Result()
		if err == nil {
			if v != "v" {
				t.Fatalf("after the failover: %q, want v", v)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("reading after the failover: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := rdb.Set(ctx, "k", "w", 0).Err(); err != nil {
		t.Fatalf("writing after the failover: %v", err)
	}
}

// TestSentinelFailover: when the master is killed the sentinels promote the replica, and
// a client that asks the sentinels writes to it.
func TestSentinelFailover(t *testing.T) {
	st := redistest.StartSentinel(t)
	ctx := context.Background()
	rdb := st.Client()
	defer rdb.Close()
	if err := rdb.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if got := st.MasterAddr(t); got != st.Master.Addr {
		t.Fatalf("the sentinels name %s as the master, want %s", got, st.Master.Addr)
	}
	st.Master.Kill()
	deadline := time.Now().Add(30 * time.Second)
	for st.MasterAddr(t) != st.Replica.Addr {
		if time.Now().After(deadline) {
			t.Fatal("the sentinels did not promote the replica within 30 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	deadline = time.Now().Add(10 * time.Second)
	for {
		err := rdb.Set(ctx, "k", "w", 0).Err()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("writing after the failover: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if v, err := rdb.Get(ctx, "k").Result(); err != nil || v != "w" {
		t.Fatalf("after the failover: %q, %v", v, err)
	}
}
