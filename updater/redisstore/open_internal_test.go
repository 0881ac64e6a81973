package redisstore

import (
	"testing"

	"github.com/redis/go-redis/v9"
)

// TestURLForms checks which client each documented URL form builds (without connecting).
func TestURLForms(t *testing.T) {
	for _, tc := range []struct {
		url  string
		want string
	}{
		{"redis://127.0.0.1:6379/0", "single"},
		{"rediss://user:pw@redis.example:6380/2", "single"},
		{"unix:///run/redis.sock?db=1", "single"},
		{"redis+sentinel://s1:26379/0?master_name=mymaster&addr=s2:26379", "single"}, // a failover client is a *redis.Client
		{"rediss+sentinel://s1:26379?master_name=m", "single"},
		{"redis+cluster://n1:6379?addr=n2:6379&addr=n3:6379", "cluster"},
		{"rediss+cluster://n1:6379", "cluster"},
	} {
		c, err := client(tc.url)
		if err != nil {
			t.Errorf("client(%q): %v", tc.url, err)
			continue
		}
		got := "other"
		switch c.(type) {
		case *redis.Client:
			got = "single"
		case *redis.ClusterClient:
			got = "cluster"
		}
		if got != tc.want {
			t.Errorf("client(%q) is %T, want %s", tc.url, c, tc.want)
		}
		c.Close()
	}
	for _, bad := range []string{"unix+cluster:///x", "redis+ring://h:1", "redis://h:1/a/b"} {
		if c, err := client(bad); err == nil {
			c.Close()
			t.Errorf("client(%q): no error", bad)
		}
	}
}
