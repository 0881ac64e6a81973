// Command e2e is the end-to-end benchmark of scripts/bench.sh (docs/BENCHMARKS.md): it
// starts the real `sealcast serve` binary, provisions simulated devices through the admin
// topic, releases one image and measures the time until every device installed it and
// its ack was confirmed, with the CPU time and peak memory of each process.
//
// It runs up to three scenarios, each on a fresh data directory, one after the other:
//
//	envelope   the Sealcast release: one encrypted image, a wrapped key per device
//	perdevice  the earlier approach as a baseline: the image encrypted separately for each
//	           device under its own content key, retained on that device's own topics
//	mosquitto  the Sealcast release through an external Mosquitto started here
//
// The simulated devices (device/simulate) run in a child process (this program with
// -role sim), so that the server, the simulator and Mosquitto are measured apart. Every
// listener is on 127.0.0.1; every child is stopped when the run ends or fails.
//
// Output, in -out: e2e.md (tables), e2e.csv (time to each installed device, for the
// plot), e2e.json (everything measured), and pprof/ (CPU profiles of the server taken
// during each release, and its heap at the end).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/sealcast/sealcast/protocol"
)

// config is what one invocation runs.
type config struct {
	sealcast        string // the sealcast binary
	mosquitto       string // the mosquitto binary; "" skips that scenario
	devices         int
	baselineDevices int // devices of the per-device scenario; 0 skips it
	imageSize       int
	chunkSize       uint
	out             string
	pprof           bool
	pprofSeconds    int  // length of each CPU profile
	sysTicks        bool // wait for fresh $SYS figures (up to 10 s each with the embedded broker)
	scenarios       string
	maxConcurrent   int // the capped scenario's bound
	activate        time.Duration
	log             func(format string, args ...any)
}

func main() {
	role := flag.String("role", "bench", "bench (default) or sim (the simulator child; internal)")
	simConfig := flag.String("sim-config", "", "simulator child: its configuration file (internal)")
	var c config
	flag.StringVar(&c.sealcast, "sealcast", "", "the sealcast binary to benchmark (go build -o bin/sealcast ./cmd/sealcast)")
	flag.StringVar(&c.mosquitto, "mosquitto", "mosquitto", "the mosquitto binary for the external-broker scenario (\"\" skips it)")
	flag.IntVar(&c.devices, "devices", 2000, "simulated devices")
	flag.IntVar(&c.baselineDevices, "baseline-devices", -1, "devices of the per-device baseline (default: -devices; 0 skips it)")
	flag.IntVar(&c.imageSize, "image-size", 1<<20, "image size in bytes")
	flag.UintVar(&c.chunkSize, "chunk-size", 0, "release chunk size (0: the server's default)")
	flag.StringVar(&c.out, "out", "docs/bench", "directory for e2e.md, e2e.csv, e2e.json and pprof/")
	flag.BoolVar(&c.pprof, "pprof", true, "take CPU and heap profiles of the server")
	flag.IntVar(&c.pprofSeconds, "pprof-seconds", 5, "length of each back-to-back CPU profile")
	flag.BoolVar(&c.sysTicks, "bytes-in", true, "measure the bytes the broker received from its $SYS figures (waits up to 20 s a scenario)")
	flag.StringVar(&c.scenarios, "scenarios", "envelope,perdevice,mosquitto", "scenarios to run, comma-separated (also: capped, the envelope with -max-concurrent; default, the envelope with the server's default bound; activate and prefetch, a release whose keys go out -activate-after its creation, without and with prefetch)")
	flag.IntVar(&c.maxConcurrent, "max-concurrent", 500, "the capped scenario's bound on devices downloading at once")
	flag.DurationVar(&c.activate, "activate-after", time.Minute, "the activate and prefetch scenarios: the release's start time, this long after its creation (times count from it)")
	timeout := flag.Duration("timeout", 45*time.Minute, "give up after this long")
	short := flag.Bool("short", false, "smoke run: 50 devices, a 64 KiB image, no -bytes-in")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch *role {
	case "sim":
		err = runSim(ctx, *simConfig)
	case "bench":
		if *short {
			c.devices, c.imageSize, c.sysTicks, c.pprofSeconds = 50, 64<<10, false, 1
		}
		if c.baselineDevices < 0 {
			c.baselineDevices = c.devices
		}
		ctx, cancel := context.WithTimeout(ctx, *timeout)
		defer cancel()
		c.log = func(format string, args ...any) {
			fmt.Fprintf(os.Stderr, "e2e %s: %s\n", time.Now().Format(time.TimeOnly), fmt.Sprintf(format, args...))
		}
		var rs []*result
		if rs, err = run(ctx, c); err == nil {
			err = writeOutputs(c, rs)
		}
	default:
		err = fmt.Errorf("unknown -role %q", *role)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
}

// run runs the chosen scenarios in order and returns their results.
func run(ctx context.Context, c config) ([]*result, error) {
	if c.sealcast == "" {
		return nil, errors.New("-sealcast is required: go build -o bin/sealcast ./cmd/sealcast")
	}
	if c.devices < 1 {
		return nil, errors.New("-devices must be at least 1")
	}
	if err := os.MkdirAll(filepath.Join(c.out, "pprof"), 0o755); err != nil {
		return nil, err
	}
	img := makeImage(c.imageSize)
	var rs []*result
	for _, name := range strings.Split(c.scenarios, ",") {
		sc := scenario{key: strings.TrimSpace(name), devices: c.devices}
		switch sc.key {
		case "envelope":
			sc.title, sc.maxConcurrent = "Sealcast envelope, embedded broker, no bound", protocol.NoBound
		case "activate", "prefetch":
			sc.activate, sc.prefetch = c.activate, sc.key == "prefetch"
			sc.title = fmt.Sprintf("Sealcast envelope, embedded broker, keys at a start time %v after creation", c.activate)
			if sc.prefetch {
				sc.title += ", prefetched"
			}
		case "default":
			sc.title = fmt.Sprintf("Sealcast envelope, embedded broker, the default bound (%d online)", protocol.DefaultMaxConcurrent)
		case "capped":
			sc.title, sc.maxConcurrent = fmt.Sprintf("Sealcast envelope, embedded broker, max_concurrent %d", c.maxConcurrent), c.maxConcurrent
		case "perdevice":
			sc.title, sc.perDevice, sc.devices = "Per-device images (baseline), embedded broker", true, c.baselineDevices
			if sc.devices == 0 {
				c.log("skipping the per-device baseline (-baseline-devices 0)")
				continue
			}
		case "mosquitto":
			sc.title, sc.maxConcurrent = "Sealcast envelope, external Mosquitto, no bound", protocol.NoBound
			path, err := findMosquitto(c.mosquitto)
			if err != nil {
				if os.Getenv("SEALCAST_REQUIRE_TOOLS") == "1" {
					return nil, err
				}
				c.log("skipping the Mosquitto scenario: %v", err)
				continue
			}
			sc.mosquitto = path
		default:
			return nil, fmt.Errorf("unknown scenario %q (want envelope, capped, perdevice, mosquitto)", sc.key)
		}
		c.log("scenario %s: %d devices, %d-byte image", sc.key, sc.devices, len(img))
		r, err := runScenario(ctx, c, sc, img)
		if err != nil {
			return rs, fmt.Errorf("scenario %s: %w", sc.key, err)
		}
		c.log("scenario %s: %d of %d installed and acked in %.1f s; server CPU %.1f s, peak RSS %d MiB",
			sc.key, r.Confirmed, r.Devices, r.T100, r.Server.CPU, r.Server.PeakRSS>>10)
		rs = append(rs, r)
	}
	if len(rs) == 0 {
		return nil, errors.New("no scenario ran")
	}
	return rs, nil
}

func writeOutputs(c config, rs []*result) error {
	b, err := json.MarshalIndent(rs, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(c.out, "e2e.json"), b, 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(c.out, "e2e.csv"), []byte(curveCSV(rs)), 0o644); err != nil {
		return err
	}
	md := markdown(c, rs)
	if err := os.WriteFile(filepath.Join(c.out, "e2e.md"), []byte(md), 0o644); err != nil {
		return err
	}
	fmt.Print(md)
	return nil
}
