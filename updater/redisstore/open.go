package redisstore

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Open connects to the Redis named by rawURL, checks that it answers, and returns a store
// with the default key prefix. The store owns the client: Close closes it.
//
// URL forms (query parameters are go-redis option names in snake case, e.g.
// dial_timeout=3s, pool_size=20; unknown ones are an error):
//
//	redis://[user:password@]host:port[/db]              one node (go-redis ParseURL)
//	rediss://[user:password@]host:port[/db]             one node over TLS
//	unix://[user:password@]/path/to/redis.sock[?db=N]   one node on a Unix socket
//	redis+sentinel://[user:password@]sentinel1:26379[/db]?master_name=mymaster&addr=sentinel2:26379
//	                                                    Sentinel (go-redis ParseFailoverURL;
//	                                                    the userinfo authenticates to the sentinels,
//	                                                    password=... to the master)
//	redis+cluster://[user:password@]node1:6379?addr=node2:6379&addr=node3:6379
//	                                                    Cluster (go-redis ParseClusterURL)
//
// rediss+sentinel and rediss+cluster use TLS. For anything a URL cannot say (TLS
// certificates, a custom dialer), build the client with redis.NewUniversalClient from one
// redis.UniversalOptions (MasterName set: Sentinel; several Addrs or IsClusterMode:
// Cluster; else one node) and pass it to New.
func Open(rawURL string) (*Store, error) {
	rdb, err := client(rawURL)
	if err != nil {
		return nil, fmt.Errorf("redisstore: URL %s: %w", redact(rawURL), err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := rdb.Ping(ctx).Err(); err != nil {
		rdb.Close()
		return nil, fmt.Errorf("redisstore: cannot reach Redis at %s (is it running, and are the address and credentials right?): %w", redact(rawURL), err)
	}
	s := New(rdb, Options{})
	s.owned = true
	return s, nil
}

// ClusterStateReload is how old a Redis Cluster client's map of slots to masters may
// grow before the next command has it read again. go-redis re-reads it at once on a
// MOVED reply, but not when a master stops answering: with its default (60 s) a
// failed-over master's slots would stay unreachable for up to a minute after its
// replica took them over. Reading the map costs one CLUSTER SLOTS per interval.
const ClusterStateReload = time.Second

func client(rawURL string) (redis.UniversalClient, error) {
	scheme, rest, ok := strings.Cut(rawURL, "://")
	if !ok {
		return nil, fmt.Errorf("no scheme; want redis://host:port/db (or rediss, unix, redis+sentinel, redis+cluster)")
	}
	base, topology, _ := strings.Cut(scheme, "+")
	if base != "redis" && base != "rediss" && !(base == "unix" && topology == "") {
		return nil, fmt.Errorf("scheme %q: want redis, rediss, unix, redis+sentinel or redis+cluster", scheme)
	}
	plain := base + "://" + rest
	switch topology {
	case "":
		o, err := redis.ParseURL(plain)
		if err != nil {
			return nil, err
		}
		return redis.NewClient(o), nil
	case "sentinel":
		o, err := redis.ParseFailoverURL(plain)
		if err != nil {
			return nil, err
		}
		if o.MasterName == "" {
			return nil, fmt.Errorf("a sentinel URL needs master_name=<name of the monitored master>")
		}
		return redis.NewFailoverClient(o), nil
	case "cluster":
		o, err := redis.ParseClusterURL(plain)
		if err != nil {
			return nil, err
		}
		o.ClusterStateReloadInterval = ClusterStateReload
		return redis.NewClusterClient(o), nil
	default:
		return nil, fmt.Errorf("scheme %q: want redis, rediss, unix, redis+sentinel or redis+cluster", scheme)
	}
}

// redact hides passwords in a URL for error messages.
func redact(rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil {
		return "(unparseable URL)"
	}
	q := u.Query()
	if q.Has("password") {
		q.Set("password", "xxxxx")
		u.RawQuery = q.Encode()
	}
	return u.Redacted()
}
