package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/device/simulate"
	"github.com/sealcast/sealcast/protocol"
)

// simConfig is the simulator child's configuration, written by the parent.
type simConfig struct {
	Devices []protocol.DeviceFile `json:"devices"`
	Out     string                `json:"out"` // where to write the simResult
	// PrefetchLimit, if set, makes every device prefetch, keeping this many bytes.
	PrefetchLimit uint64 `json:"prefetch_limit,omitempty"`
}

// simResult is what the simulator child reports: when each device confirmed (Unix
// nanoseconds, wall clock, comparable with the parent's on the same machine).
type simResult struct {
	Confirmed []int64 `json:"confirmed"`
	Failed    int     `json:"failed"`
	Summary   string  `json:"summary"`
}

// runSim is the child: it runs every device until each confirmed version 1 or later,
// printing "ready" once every device is connected and "done" at the end, then waits for
// its standard input to close so that the parent can read its /proc figures first.
func runSim(ctx context.Context, path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var c simConfig
	if err := json.Unmarshal(b, &c); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	var (
		mu        sync.Mutex
		connected = map[string]bool{}
		confirmed = map[string]int64{}
	)
	opts := simulate.Options{
		Devices: c.Devices, TargetVersion: 1, PrefetchLimit: c.PrefetchLimit,
		// A loaded two-core machine delivers 2 GB to 2,000 devices: the agents' defaults
		// (30 s chunk timeout, first ack re-send after 30 s) would make one lost message
		// dominate the tail, so re-send sooner.
		ChunkTimeout: 60 * time.Second, AckResend: 5 * time.Second, AckResendMax: 30 * time.Second,
		ReconnectMin: 200 * time.Millisecond, ReconnectMax: 5 * time.Second,
		StartSpread: time.Duration(len(c.Devices)) * time.Millisecond, // 1,000 connects a second
		Logger:      zerolog.New(os.Stderr).Level(zerolog.WarnLevel).With().Timestamp().Logger(),
		OnEvent: func(e device.Event) {
			switch e.Kind {
			case device.EventConnected:
				mu.Lock()
				connected[e.Serial] = true
				if len(connected) == len(c.Devices) {
					fmt.Println("ready")
				}
				mu.Unlock()
			case device.EventConfirmed:
				if e.Version >= 1 {
					mu.Lock()
					if _, ok := confirmed[e.Serial]; !ok {
						confirmed[e.Serial] = time.Now().UnixNano()
					}
					mu.Unlock()
				}
			}
		},
	}
	sum, err := simulate.Run(ctx, opts)
	mu.Lock()
	res := simResult{Failed: sum.Failed, Summary: sum.String()}
	for _, t := range confirmed {
		res.Confirmed = append(res.Confirmed, t)
	}
	mu.Unlock()
	out, merr := json.Marshal(res)
	if merr != nil {
		return merr
	}
	if werr := os.WriteFile(c.Out, out, 0o644); werr != nil {
		return werr
	}
	fmt.Println("done")
	if err != nil {
		return err
	}
	io.Copy(io.Discard, os.Stdin) // the parent closes it after reading /proc
	return nil
}
