package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// $SYS topics with the bytes a broker received, and its count of retained messages:
// mochi's names first, then Mosquitto's.
var (
	sysBytesIn        = []string{"$SYS/broker/load/bytes/received", "$SYS/broker/bytes/received"}
	sysRetainedTopics = []string{"$SYS/broker/retained", "$SYS/broker/retained messages/count"}
)

// probe is an admin connection that reads the broker's $SYS figures and its retained
// messages.
type probe struct {
	c mqtt.Client

	mu          sync.Mutex
	changed     chan struct{} // closed and replaced on every $SYS update
	bytesIn     int64
	bytesAt     time.Time
	sysRetained int64 // the broker's own count
	walk        map[string]int64
	walkLast    time.Time
}

// retainedFigures are the retained messages under sealcast/, read back from the broker.
type retainedFigures struct {
	Messages    int64 `json:"messages"`
	Bytes       int64 `json:"bytes"`        // payloads
	ImageBytes  int64 `json:"image_bytes"`  // payloads on sealcast/releases/ (chunks and manifests)
	BrokerCount int64 `json:"broker_count"` // the broker's own count, $SYS topics included
}

func dialProbe(ctx context.Context, url, user, pw string) (*probe, error) {
	p := &probe{changed: make(chan struct{}), bytesIn: -1, sysRetained: -1}
	o := mqtt.NewClientOptions().AddBroker(url).SetClientID(fmt.Sprintf("bench-probe-%d", os.Getpid())).
		SetUsername(user).SetPassword(pw).SetCleanSession(true).SetAutoReconnect(false).
		SetOrderMatters(false).SetMessageChannelDepth(10000)
	p.c = mqtt.NewClient(o)
	if err := wait(ctx, p.c.Connect()); err != nil {
		return nil, fmt.Errorf("probe: connecting: %w", err)
	}
	subs := map[string]byte{}
	for _, t := range append(sysBytesIn, sysRetainedTopics...) {
		subs[t] = 0
	}
	if err := wait(ctx, p.c.SubscribeMultiple(subs, p.onSys)); err != nil {
		return nil, fmt.Errorf("probe: subscribing to $SYS: %w", err)
	}
	return p, nil
}

func (p *probe) close() { p.c.Disconnect(100) }

func (p *probe) onSys(_ mqtt.Client, m mqtt.Message) {
	v, err := strconv.ParseInt(strings.TrimSpace(string(m.Payload())), 10, 64)
	if err != nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, t := range sysRetainedTopics {
		if m.Topic() == t {
			p.sysRetained = v
		}
	}
	for _, t := range sysBytesIn {
		if m.Topic() == t && !m.Retained() { // a retained copy may be a tick old
			p.bytesIn, p.bytesAt = v, time.Now()
			close(p.changed)
			p.changed = make(chan struct{})
		}
	}
}

// freshBytesIn returns the broker's bytes-received counter from the first $SYS update
// after t (mochi publishes every 10 s, our Mosquitto every second), or -1 after 30 s.
func (p *probe) freshBytesIn(ctx context.Context, t time.Time) int64 {
	limit := time.After(30 * time.Second)
	for {
		p.mu.Lock()
		v, at, ch := p.bytesIn, p.bytesAt, p.changed
		p.mu.Unlock()
		if at.After(t) {
			return v
		}
		select {
		case <-ch:
		case <-limit:
			return -1
		case <-ctx.Done():
			return -1
		}
	}
}

// retained reads back every retained message of the given releases and devices, and the
// status topics, one filter at a time so that no broker queue overflows, and adds up
// their sizes.
func (p *probe) retained(ctx context.Context, ids []keychain.ReleaseID, serials []string) (retainedFigures, error) {
	p.mu.Lock()
	p.walk, p.walkLast = map[string]int64{}, time.Now()
	p.mu.Unlock()
	on := func(_ mqtt.Client, m mqtt.Message) {
		if !m.Retained() {
			return
		}
		p.mu.Lock()
		p.walk[m.Topic()] = int64(len(m.Payload()))
		p.walkLast = time.Now()
		p.mu.Unlock()
	}
	// Each filter matches at most one release's chunks and manifest (17 messages for a
	// 1 MiB image): one matching thousands (sealcast/status/#) would overflow the
	// broker's queue for this client and lose messages.
	filters := []string{protocol.FleetStatusTopic}
	for _, id := range ids {
		filters = append(filters, protocol.ReleaseFilter(id), protocol.ReleaseStatusTopic(id))
	}
	for _, s := range serials {
		filters = append(filters, protocol.DeviceFilter(s), protocol.DeviceStatusTopic(s))
	}
	// Eight filters a SUBSCRIBE: at most ~140 retained messages, under the embedded
	// broker's 256-message queue per client.
	for i := 0; i < len(filters); i += 8 {
		subs := map[string]byte{}
		for _, f := range filters[i:min(i+8, len(filters))] {
			subs[f] = 0
		}
		if err := wait(ctx, p.c.SubscribeMultiple(subs, on)); err != nil {
			return retainedFigures{}, fmt.Errorf("probe: subscribing to %s: %w", filters[i], err)
		}
	}
	for { // until no retained message arrived for a second
		p.mu.Lock()
		quiet := time.Since(p.walkLast)
		p.mu.Unlock()
		if quiet > time.Second {
			break
		}
		if err := sleep(ctx, 200*time.Millisecond); err != nil {
			return retainedFigures{}, err
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	f := retainedFigures{BrokerCount: p.sysRetained}
	for t, n := range p.walk {
		f.Messages++
		f.Bytes += n
		if strings.HasPrefix(t, protocol.ReleasesPrefix) {
			f.ImageBytes += n
		}
	}
	return f, nil
}

func wait(ctx context.Context, t mqtt.Token) error {
	select {
	case <-t.Done():
		return t.Error()
	case <-ctx.Done():
		return ctx.Err()
	}
}

// profiler takes back-to-back CPU profiles of the server until stopped.
type profiler struct {
	base, dir, key string
	seconds        int
	stopCh         chan struct{}
	done           chan struct{}
	files          []string
}

func startProfiler(addr, dir, key string, seconds int) *profiler {
	p := &profiler{base: "http://" + addr + "/debug/pprof/", dir: dir, key: key, seconds: max(1, seconds),
		stopCh: make(chan struct{}), done: make(chan struct{})}
	old, _ := filepath.Glob(filepath.Join(dir, key+"-*.pb.gz"))
	for _, f := range old {
		os.Remove(f)
	}
	go func() {
		defer close(p.done)
		for i := 0; ; i++ {
			f := filepath.Join(dir, fmt.Sprintf("%s-cpu-%03d.pb.gz", key, i))
			if err := fetch(context.Background(), fmt.Sprintf("%sprofile?seconds=%d", p.base, p.seconds), f); err == nil {
				p.files = append(p.files, f)
			}
			select {
			case <-p.stopCh:
				return
			default:
			}
		}
	}()
	return p
}

// stop waits for the profile being taken and returns the files.
func (p *profiler) stop() []string {
	close(p.stopCh)
	<-p.done
	return p.files
}

// heap saves the server's heap profile.
func (p *profiler) heap(ctx context.Context) (string, error) {
	f := filepath.Join(p.dir, p.key+"-heap.pb.gz")
	return f, fetch(ctx, p.base+"heap", f)
}

func fetch(ctx context.Context, url, file string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	return os.WriteFile(file, b, 0o644)
}
