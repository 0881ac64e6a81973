package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"
	"github.com/schollz/progressbar/v3"

	"github.com/sealcast/sealcast/device/simulate"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
)

func demoCommand(e *env) *ffcli.Command {
	fs := newFlags("demo", e)
	devices := fs.Int("devices", 20, "number of simulated devices")
	size := fs.Int("image-size", 256<<10, "size of the generated image in bytes")
	chunk := fs.Uint("chunk-size", 16<<10, "chunk size of the releases")
	timeout := fs.Duration("timeout", 5*time.Minute, "give up after this long")
	return &ffcli.Command{
		Name:       "demo",
		ShortUsage: "sealcast demo [-devices N]",
		ShortHelp:  "run everything in one process on loopback and update a simulated fleet twice",
		LongHelp: `Starts the embedded broker and the updater on 127.0.0.1 with a temporary data
directory, provisions N simulated devices, releases a generated image, then a second
version, and checks that every device installed both and that its counter moved twice.
Exits non-zero if anything failed.`,
		FlagSet: fs,
		Exec: func(ctx context.Context, _ []string) error {
			if *devices < 1 || *devices > 10000 {
				return fmt.Errorf("-devices must be 1 to 10000")
			}
			ctx, cancel := context.WithTimeout(ctx, *timeout)
			defer cancel()
			return runDemo(ctx, e, *devices, *size, uint32(*chunk))
		},
	}
}

func runDemo(ctx context.Context, e *env, n, size int, chunk uint32) error {
	dir, err := os.MkdirTemp("", "sealcast-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	log := e.logger()
	if *e.logLevel == "info" {
		log = log.Level(warnLevel) // the demo prints its own story
	}
	fmt.Fprintf(e.stdout, "Starting broker and updater on 127.0.0.1 (data in %s)\n", dir)
	s, err := startStack(ctx, stackConfig{dataDir: dir, listen: "127.0.0.1:0", chainLength: 1024, scratch: true}, log)
	if err != nil {
		return err
	}
	defer s.close()
	op, err := operator.Dial(ctx, operator.Options{URL: s.brokerURL, Username: "admin", Password: s.adminPW})
	if err != nil {
		return err
	}
	defer op.Close()

	serials := make([]string, n)
	for i := range serials {
		serials[i] = fmt.Sprintf("demo-%05d", i+1)
	}
	start := time.Now()
	files, err := op.Provision(ctx, serials, 0)
	if err != nil {
		return fmt.Errorf("provisioning: %w", err)
	}
	fmt.Fprintf(e.stdout, "Provisioned %d devices in %s (chain length %d: each starts at sequence number %d)\n",
		len(files), time.Since(start).Round(time.Millisecond), files[0].ChainLength, files[0].Seq)

	simCtx, stopSim := context.WithCancel(ctx)
	defer stopSim()
	simDone := make(chan simResult, 1)
	go func() {
		sum, err := simulate.Run(simCtx, simulate.Options{Devices: files, TargetVersion: 2, Logger: log, StartSpread: 200 * time.Millisecond})
		simDone <- simResult{sum, err}
	}()

	for version := uint64(1); version <= 2; version++ {
		img := make([]byte, size)
		rand.Read(img)
		t0 := time.Now()
		res, err := op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{Version: version, All: true, ChunkSize: chunk, Label: fmt.Sprintf("demo v%d", version)})
		if err != nil {
			return fmt.Errorf("release %d: %w", version, err)
		}
		fmt.Fprintf(e.stdout, "Release v%d (%s, %d KiB in %d-byte chunks) to %d devices:\n", version, res.Release, size>>10, chunk, res.Targets)
		if err := waitRelease(ctx, e, op, res.Release, res.Targets); err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "  all %d installed and confirmed in %s\n", res.Targets, time.Since(t0).Round(time.Millisecond))
	}
	var r simResult
	select {
	case r = <-simDone:
	case <-ctx.Done():
		return fmt.Errorf("devices did not finish: %w", ctx.Err())
	}
	if r.err != nil {
		return fmt.Errorf("simulated devices: %w", r.err)
	}
	return demoSummary(ctx, e, s, files, r.sum)
}

// demoSummary checks the server's counters (every device moved twice, from L to L-2)
// and prints what the demo did.
func demoSummary(ctx context.Context, e *env, s *stack, files []protocol.DeviceFile, sim simulate.Summary) error {
	n := len(files)
	serials := make([]string, n)
	for i, f := range files {
		serials[i] = f.Serial
	}
	devs, err := s.store.Devices(ctx, serials)
	if err != nil {
		return err
	}
	bad := 0
	for i, d := range devs {
		if d == nil || d.Version != 2 || d.Seq != files[i].Seq-2 {
			bad++
		}
	}
	st := s.upd.Stats()
	fmt.Fprintf(e.stdout, "\nSummary\n")
	fmt.Fprintf(e.stdout, "  devices updated twice:     %d of %d\n", n-bad, n)
	fmt.Fprintf(e.stdout, "  counters moved %d -> %d:  %d of %d\n", files[0].Seq, files[0].Seq-2, n-bad, n)
	fmt.Fprintf(e.stdout, "  key messages published:    %d\n", st.KeysPublished)
	fmt.Fprintf(e.stdout, "  acks accepted/duplicate:   %d/%d, rejected: %d\n", st.AcksAccepted, st.AcksDuplicate, sum(st.AcksRejected))
	fmt.Fprintf(e.stdout, "  chunk fetches:             %d, failed installs: %d\n", sim.Stats.ChunkFetches, sim.Failed)
	if bad > 0 || sim.Failed > 0 || sim.Confirmed != n {
		return errors.New("demo failed: not every device was updated twice")
	}
	fmt.Fprintf(e.stdout, "OK: every device installed both releases, each with a fresh one-time key.\n")
	return nil
}

type simResult struct {
	sum simulate.Summary
	err error
}

func sum(m map[string]int64) (n int64) {
	for _, v := range m {
		n += v
	}
	return n
}

// waitRelease shows a progress bar, on a terminal, until every target installed the
// release.
func waitRelease(ctx context.Context, e *env, op *operator.Client, id keychain.ReleaseID, targets int) error {
	var bar *progressbar.ProgressBar
	if isTerminal(e.stdout) {
		bar = progressbar.NewOptions(targets, progressbar.OptionSetWriter(e.stdout), progressbar.OptionSetWidth(30),
			progressbar.OptionSetDescription("  installed"), progressbar.OptionShowCount())
		defer func() {
			bar.Finish()
			fmt.Fprintln(e.stdout)
		}()
	}
	for {
		st, err := op.ReleaseStatus(ctx, id)
		if err != nil {
			return err
		}
		if bar != nil {
			bar.Set(st.Installed)
		}
		if st.Installed >= targets {
			return nil
		}
		if st.State == protocol.ReleaseCancelled {
			return fmt.Errorf("release %s was cancelled", id)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for release %s: %d of %d installed: %w", id, st.Installed, targets, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}
