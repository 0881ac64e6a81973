package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestExitStatuses: every command exits with the status its failure calls for, as
// "sealcast help" documents: 2 usage, 3 timeout, 4 not found, 5 conflict, 6 cannot
// connect; and pause and resume are idempotent (exit 0 the second time).
func TestExitStatuses(t *testing.T) {
	t.Parallel()
	s := startServe(t)
	dir := t.TempDir()
	provisionFile(t, s, dir, "exit-1")
	img := filepath.Join(dir, "fw.bin")
	if err := os.WriteFile(img, []byte("a small image"), 0o600); err != nil {
		t.Fatal(err)
	}
	env := []string{"SEALCAST_BROKER=" + s.url, "SEALCAST_PASSWORD=" + s.adminPW}
	sealcast := func(want int, args ...string) *proc {
		t.Helper()
		p := runProc(t, env, args...)
		if got := p.exitCode(); got != want {
			t.Fatalf("sealcast %s: exit %d, want %d\nstderr: %s", strings.Join(args, " "), got, want, p.stderr)
		}
		return p
	}
	sealcast(exitUsage, "status", "-nosuchflag")
	sealcast(exitUsage, "pause")
	sealcast(exitNotFound, "status", strings.Repeat("ab", 16))
	sealcast(exitNotFound, "tag", "no-such-device", "k=v")
	// The id, then the devices still pending (exit-1 runs no agent).
	out := strings.Fields(sealcast(exitTimeout, "release", "-image", img, "-version", "1", "-devices", "exit-1", "-wait", "-wait-timeout", "1s").stdout.String())
	if len(out) != 2 || out[1] != "exit-1" {
		t.Fatalf("release -wait-timeout printed %q; want the id and the pending device", out)
	}
	id := out[0]
	sealcast(0, "pause", id)
	sealcast(0, "pause", id) // again: nothing to do, no error
	sealcast(0, "resume", id)
	sealcast(0, "resume", id)
	sealcast(exitConflict, "approve", id) // no waves waiting for approval
	sealcast(exitConflict, "release", "-image", img, "-version", "1", "-all")
	p := runProc(t, []string{"SEALCAST_BROKER=tcp://127.0.0.1:1", "SEALCAST_PASSWORD=x"}, "status", "-timeout", "2s")
	if p.exitCode() != exitConnect {
		t.Fatalf("status against no broker: exit %d, want %d\nstderr: %s", p.exitCode(), exitConnect, p.stderr)
	}
	p = runProc(t, []string{"SEALCAST_BROKER=" + s.url, "SEALCAST_PASSWORD=wrong"}, "status")
	if p.exitCode() != exitConnect {
		t.Fatalf("status with a wrong password: exit %d, want %d\nstderr: %s", p.exitCode(), exitConnect, p.stderr)
	}
}
