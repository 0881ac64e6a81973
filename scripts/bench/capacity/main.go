// Command capacity measures what a large fleet costs Sealcast scaled out (docs/SCALING.md):
// it starts a Redis Cluster (masters with a replica each), a Mosquitto and
// `sealcast serve -external-broker ... -redis redis+cluster://...` on loopback, provisions
// N devices through the admin protocol (device.provision, 1,000 a request, files thrown
// away), then creates a release to every device, none of them connected, and times the
// fan-out until the updater has published every wrapped key (retained, for the devices to
// find when they connect). It reads the memory of every process and of every Redis node
// before and after, and the CPU each spent, and prints a Markdown report.
//
//	go build -o /tmp/sealcast ./cmd/sealcast
//	cd scripts/bench && go run ./capacity -sealcast /tmp/sealcast -devices 1000000
//
// Needs redis-server, redis-cli and mosquitto on PATH. Everything binds 127.0.0.1; the
// processes are stopped at the end (or on SIGINT).
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/scripts/bench/internal/procstat"
)

type config struct {
	sealcast    string
	devices     int
	chainLength int
	masters     int
	replicas    int
	imageSize   int
	keep        string
}

func main() {
	var c config
	flag.StringVar(&c.sealcast, "sealcast", "", "the sealcast binary (go build -o /tmp/sealcast ./cmd/sealcast)")
	flag.IntVar(&c.devices, "devices", 1_000_000, "devices to provision and release to")
	flag.IntVar(&c.chainLength, "chain-length", 0, "chain length of the devices (0: the server's default)")
	flag.IntVar(&c.masters, "masters", 3, "Redis Cluster masters")
	flag.IntVar(&c.replicas, "replicas", 1, "replicas of each master")
	flag.IntVar(&c.imageSize, "image-size", 1<<20, "image size in bytes")
	flag.StringVar(&c.keep, "dir", "", "working directory (default: a temporary one, removed at the end)")
	flag.Parse()
	if c.sealcast == "" {
		log.Fatal("capacity: give -sealcast, the path of a sealcast binary")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, c); err != nil {
		log.Fatalf("capacity: %v", err)
	}
}

// proc is a child process.
type proc struct {
	name string
	cmd  *exec.Cmd
}

var procs []*proc

func start(name, logPath, bin string, args ...string) (*proc, error) {
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd}
	procs = append(procs, p)
	return p, nil
}

func stopAll() {
	for i := len(procs) - 1; i >= 0; i-- {
		p := procs[i]
		p.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { p.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			p.cmd.Process.Kill()
		}
	}
}

// freePort is procstat.FreePort for a tool that cannot go on without one.
func freePort() int {
	p, err := procstat.FreePort()
	if err != nil {
		log.Fatal(err)
	}
	return p
}

func waitPort(addr string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s does not answer: %w", addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// readUsage is procstat.Read, zero for a process that is gone.
func readUsage(pid int) procstat.Usage {
	u, _ := procstat.Read(pid)
	return u
}

// redisInfo returns the fields of INFO on a node, through redis-cli.
func redisInfo(addr string) map[string]string {
	host, port, _ := net.SplitHostPort(addr)
	out, err := exec.Command("redis-cli", "-h", host, "-p", port, "info").Output()
	m := map[string]string{}
	if err != nil {
		return m
	}
	for _, line := range strings.Split(string(out), "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), ":")
		if ok {
			m[k] = v
		}
	}
	return m
}

// node is a Redis Cluster node.
type node struct {
	addr string
	p    *proc
}

// snapshot is what every process used at one moment.
type snapshot struct {
	at       time.Time
	serve    procstat.Usage
	mosq     procstat.Usage
	redis    []procstat.Usage
	redisMem []int64 // used_memory of each node, bytes
	roles    []string
	keys     []int64
}

func take(serve, mosq *proc, nodes []node) snapshot {
	s := snapshot{at: time.Now(), serve: readUsage(serve.cmd.Process.Pid), mosq: readUsage(mosq.cmd.Process.Pid)}
	for _, n := range nodes {
		s.redis = append(s.redis, readUsage(n.p.cmd.Process.Pid))
		info := redisInfo(n.addr)
		mem, _ := strconv.ParseInt(info["used_memory"], 10, 64)
		s.redisMem = append(s.redisMem, mem)
		s.roles = append(s.roles, info["role"])
		var keys int64
		if db := info["db0"]; db != "" {
			k, _, _ := strings.Cut(strings.TrimPrefix(db, "keys="), ",")
			keys, _ = strconv.ParseInt(k, 10, 64)
		}
		s.keys = append(s.keys, keys)
	}
	return s
}

func (s snapshot) redisTotals() (masterMem, allMem int64, cpu float64, masterKeys int64) {
	for i := range s.redis {
		allMem += s.redisMem[i]
		cpu += s.redis[i].CPU
		if s.roles[i] == "master" {
			masterMem += s.redisMem[i]
			masterKeys += s.keys[i]
		}
	}
	return
}

// keyMemory is MEMORY USAGE of key in the cluster (redis-cli -c follows the redirect).
func keyMemory(addr, key string) int64 {
	host, port, _ := net.SplitHostPort(addr)
	out, err := exec.Command("redis-cli", "-c", "-h", host, "-p", port, "memory", "usage", key, "samples", "0").Output()
	if err != nil {
		return -1
	}
	n, _ := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64)
	return n
}

func metric(httpAddr, name string) (float64, error) {
	resp, err := http.Get("http://" + httpAddr + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			return strconv.ParseFloat(v, 64)
		}
	}
	return 0, fmt.Errorf("no metric %s", name)
}

func run(ctx context.Context, c config) error {
	dir := c.keep
	if dir == "" {
		d, err := os.MkdirTemp("", "sealcast-capacity-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		dir = d
	}
	defer stopAll()
	log.Printf("capacity: %d cores, load %s, working in %s", numCPU(), loadavg(), dir)

	// Redis Cluster.
	var nodes []node
	var addrs []string
	for i := range c.masters * (1 + c.replicas) {
		nd := filepath.Join(dir, fmt.Sprintf("redis%d", i))
		if err := os.MkdirAll(nd, 0o755); err != nil {
			return err
		}
		port := freePort()
		p, err := start(fmt.Sprintf("redis%d", i), filepath.Join(nd, "out.log"), "redis-server",
			"--bind", "127.0.0.1", "--port", strconv.Itoa(port), "--dir", nd, "--save", "", "--appendonly", "no",
			"--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000",
			"--cluster-port", strconv.Itoa(freePort()),
			"--repl-diskless-sync-delay", "0", "--logfile", filepath.Join(nd, "redis.log"))
		if err != nil {
			return err
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		if err := waitPort(addr, 10*time.Second); err != nil {
			return err
		}
		nodes = append(nodes, node{addr: addr, p: p})
		addrs = append(addrs, addr)
	}
	args := append([]string{"--cluster", "create"}, addrs...)
	args = append(args, "--cluster-replicas", strconv.Itoa(c.replicas), "--cluster-yes")
	if out, err := exec.Command("redis-cli", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("redis-cli --cluster create: %v\n%s", err, out)
	}
	time.Sleep(3 * time.Second) // the cluster agrees and the replicas sync
	redisURL := "redis+cluster://" + addrs[0] + "?addr=" + strings.Join(addrs[1:], "&addr=")

	// Mosquitto: anonymous (no device connects; the access checks of the updater's
	// publishes are not what is measured), retained messages in memory.
	mport := freePort()
	conf := filepath.Join(dir, "mosquitto.conf")
	lines := []string{fmt.Sprintf("listener %d 127.0.0.1", mport), "allow_anonymous true", "persistence false",
		"max_inflight_messages 1000", "max_queued_messages 1000000", "message_size_limit 0"}
	if os.Geteuid() == 0 {
		lines = append(lines, "user root")
	}
	if err := os.WriteFile(conf, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		return err
	}
	mosq, err := start("mosquitto", filepath.Join(dir, "mosquitto.log"), "mosquitto", "-c", conf)
	if err != nil {
		return err
	}
	brokerURL := fmt.Sprintf("tcp://127.0.0.1:%d", mport)
	if err := waitPort(fmt.Sprintf("127.0.0.1:%d", mport), 10*time.Second); err != nil {
		return err
	}

	// The updater.
	httpAddr := fmt.Sprintf("127.0.0.1:%d", freePort())
	serveArgs := []string{"serve", "-data", filepath.Join(dir, "data"), "-external-broker", brokerURL, "-redis", redisURL, "-http", httpAddr, "-log-format", "json"}
	if c.chainLength > 0 {
		serveArgs = append(serveArgs, "-chain-length", strconv.Itoa(c.chainLength))
	}
	serve, err := start("serve", filepath.Join(dir, "serve.log"), c.sealcast, serveArgs...)
	if err != nil {
		return err
	}
	if err := waitPort(httpAddr, 60*time.Second); err != nil {
		return err
	}
	op, err := operator.Dial(ctx, operator.Options{URL: brokerURL, Username: "admin", Password: "admin", Timeout: 30 * time.Minute})
	if err != nil {
		return err
	}
	defer op.Close()
	base := take(serve, mosq, nodes)

	// Provision, 1,000 a request.
	t0 := time.Now()
	const batch = 1000
	serials := make([]string, batch)
	for i := 0; i < c.devices; i += batch {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		n := min(batch, c.devices-i)
		for k := range n {
			serials[k] = fmt.Sprintf("cap-%07d", i+k)
		}
		var res protocol.ProvisionResult
		if err := op.Do(ctx, protocol.CmdProvision, protocol.ProvisionArgs{Serials: serials[:n], ChainLength: uint32(c.chainLength)}, &res); err != nil {
			return fmt.Errorf("provisioning devices %d to %d: %w", i, i+n, err)
		}
		if (i/batch)%100 == 99 {
			log.Printf("capacity: provisioned %d in %v", i+n, time.Since(t0).Round(time.Second))
		}
	}
	provisioned := take(serve, mosq, nodes)
	provTime := provisioned.at.Sub(t0)
	serialsBytes := keyMemory(addrs[0], "sealcast:serials")
	log.Printf("capacity: provisioned %d devices in %v", c.devices, provTime.Round(time.Millisecond))
	time.Sleep(2 * time.Second)
	idle := take(serve, mosq, nodes)

	// The release.
	img := make([]byte, c.imageSize)
	rand.Read(img)
	pub0, _ := metric(httpAddr, "sealcast_keys_published_total")
	t1 := time.Now()
	rel, err := op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{Version: 1, All: true})
	if err != nil {
		return fmt.Errorf("release: %w", err)
	}
	replied := time.Since(t1)
	log.Printf("capacity: release %s created (reply in %v); waiting for %d keys", rel.Release, replied.Round(time.Millisecond), c.devices)
	var lastLog time.Time
	for {
		pub, err := metric(httpAddr, "sealcast_keys_published_total")
		if err == nil && pub-pub0 >= float64(c.devices) {
			break
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if time.Since(lastLog) > 30*time.Second {
			log.Printf("capacity: %v keys published after %v", pub-pub0, time.Since(t1).Round(time.Second))
			lastLog = time.Now()
		}
		time.Sleep(200 * time.Millisecond)
	}
	fanned := take(serve, mosq, nodes)
	fanTime := fanned.at.Sub(t1)
	log.Printf("capacity: every key published %v after release.create", fanTime.Round(time.Millisecond))
	time.Sleep(5 * time.Second)
	after := take(serve, mosq, nodes)
	report(os.Stdout, c, base, provisioned, idle, fanned, after, provTime, fanTime, replied)
	fmt.Printf("the list of serials, one key on one master: %.1f MiB (MEMORY USAGE)\n", float64(serialsBytes)/(1<<20))
	return nil
}

func report(w io.Writer, c config, base, prov, idle, fanned, after snapshot, provTime, fanTime, replied time.Duration) {
	mib := func(kib int64) string { return fmt.Sprintf("%.0f MiB", float64(kib)/1024) }
	mibB := func(b int64) string { return fmt.Sprintf("%.0f MiB", float64(b)/(1<<20)) }
	n := float64(c.devices)
	bm, ba, bcpu, _ := base.redisTotals()
	pm, pa, pcpu, pkeys := prov.redisTotals()
	_, _, fcpu0, _ := idle.redisTotals()
	am, aa, _, akeys := after.redisTotals()
	_, _, fancpu, _ := fanned.redisTotals()
	fmt.Fprintf(w, "\n## Capacity run: %d devices, Redis Cluster %d masters x %d replicas, Mosquitto (%s, %d cores, load %s)\n\n",
		c.devices, c.masters, c.replicas, time.Now().UTC().Format(time.DateOnly), numCPU(), loadavg())
	fmt.Fprintf(w, "| | provisioning | fan-out (release.create to every key published) |\n|---|---|---|\n")
	fmt.Fprintf(w, "| wall time | %v (%.0f devices/s) | %v (%.0f keys/s; reply after %v) |\n", provTime.Round(time.Second), n/provTime.Seconds(),
		fanTime.Round(time.Millisecond), n/fanTime.Seconds(), replied.Round(time.Millisecond))
	fmt.Fprintf(w, "| serve CPU | %.1f s (%.0f µs/device) | %.1f s (%.1f µs/device) |\n", prov.serve.CPU-base.serve.CPU, (prov.serve.CPU-base.serve.CPU)/n*1e6,
		fanned.serve.CPU-idle.serve.CPU, (fanned.serve.CPU-idle.serve.CPU)/n*1e6)
	fmt.Fprintf(w, "| Redis CPU (all nodes) | %.1f s (%.0f µs/device) | %.1f s (%.1f µs/device) |\n", pcpu-bcpu, (pcpu-bcpu)/n*1e6, fancpu-fcpu0, (fancpu-fcpu0)/n*1e6)
	fmt.Fprintf(w, "| Mosquitto CPU | %.1f s | %.1f s (%.1f µs/key) |\n\n", prov.mosq.CPU-base.mosq.CPU, fanned.mosq.CPU-idle.mosq.CPU, (fanned.mosq.CPU-idle.mosq.CPU)/n*1e6)
	fmt.Fprintf(w, "| memory | empty | %d provisioned | after the fan-out | per device |\n|---|---|---|---|---|\n", c.devices)
	fmt.Fprintf(w, "| Redis used_memory, masters | %s | %s | %s | %.0f B provisioned, +%.0f B with the release |\n", mibB(bm), mibB(pm), mibB(am),
		float64(pm-bm)/n, float64(am-pm)/n)
	fmt.Fprintf(w, "| Redis used_memory, all nodes | %s | %s | %s | |\n", mibB(ba), mibB(pa), mibB(aa))
	fmt.Fprintf(w, "| Redis keys (masters) | | %d | %d | |\n", pkeys, akeys)
	fmt.Fprintf(w, "| Mosquitto RSS (peak) | %s | %s | %s (%s) | %.0f B retained key message |\n", mib(base.mosq.RSS), mib(prov.mosq.RSS), mib(after.mosq.RSS), mib(after.mosq.PeakRSS),
		float64((after.mosq.RSS-prov.mosq.RSS)*1024)/n)
	fmt.Fprintf(w, "| serve RSS (peak) | %s | %s | %s (%s) | |\n", mib(base.serve.RSS), mib(prov.serve.RSS), mib(after.serve.RSS), mib(after.serve.PeakRSS))
	fmt.Fprintf(w, "\nserve CPU while idle with %d devices (5 s after the fan-out): %.2f s\n", c.devices, after.serve.CPU-fanned.serve.CPU)
}

func numCPU() int {
	b, _ := os.ReadFile("/proc/cpuinfo")
	return strings.Count(string(b), "processor\t:")
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}
