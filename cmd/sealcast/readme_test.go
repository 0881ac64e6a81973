package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// readmeBlocks returns the ```sh blocks of README.md's section that starts with heading.
func readmeBlocks(t *testing.T, readme, heading string) []string {
	t.Helper()
	i := strings.Index(readme, "\n"+heading+"\n")
	if i < 0 {
		t.Fatalf("README.md has no section %q", heading)
	}
	section := readme[i+len(heading)+2:]
	if j := regexp.MustCompile(`\n#{2,3} `).FindStringIndex(section); j != nil {
		section = section[:j[0]]
	}
	var blocks []string
	for _, m := range regexp.MustCompile("(?s)```sh\n(.*?)```").FindAllStringSubmatch(section, -1) {
		blocks = append(blocks, m[1])
	}
	return blocks
}

// TestREADME runs the README's tour and its "Releasing and watching" block as written,
// in bash, from an empty directory, against a real serve: every command must succeed
// (a README that dead-ends fails here). Only what a person does by hand is replaced:
// the build (the binary is built once by the test), running serve in another terminal
// (here in the background, with a state directory of its own), and pasting the password
// serve printed.
func TestREADME(t *testing.T) {
	if testing.Short() {
		t.Skip("builds sealcast and runs the README's tour; skipped under -short")
	}
	if _, err := exec.LookPath("bash"); err != nil {
		t.Skip("no bash")
	}
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)
	tour := readmeBlocks(t, readme, "## A tour")
	releasing := readmeBlocks(t, readme, "### Releasing and watching")
	if len(tour) < 2 || len(releasing) < 1 {
		t.Fatalf("README.md: %d tour blocks and %d releasing blocks; want 2 and 1", len(tour), len(releasing))
	}
	dir := t.TempDir()
	bin := filepath.Join(t.TempDir(), "sealcast")
	build := exec.Command("go", "build", "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}

	// The first block builds and starts serve; the build is the test's, serve runs in the
	// background and the script waits for the password it prints.
	start := tour[0]
	if !strings.Contains(start, "go build -o sealcast ./cmd/sealcast") || !strings.Contains(start, "./sealcast serve") {
		t.Fatalf("the tour's first block no longer builds and starts serve:\n%s", start)
	}
	start = strings.Replace(start, "go build -o sealcast ./cmd/sealcast", "cp "+bin+" sealcast", 1)
	start = strings.Replace(start, "./sealcast serve", "./sealcast serve -listen 127.0.0.1:$MQTT_PORT -http '' 2>serve.log &", 1)
	// The second pastes the password: the script reads it from serve's output instead.
	commands := tour[1]
	paste := regexp.MustCompile(`(?m)^export SEALCAST_PASSWORD='\.\.\.'.*$`)
	if !paste.MatchString(commands) {
		t.Fatalf("the tour's second block no longer exports the password serve printed:\n%s", commands)
	}
	commands = paste.ReplaceAllString(commands, `export SEALCAST_PASSWORD="$(sed -n "s/.*SEALCAST_PASSWORD='\([^']*\)'.*/\1/p" serve.log | head -1)"`)
	script := strings.Join([]string{
		"set -euo pipefail",
		"export XDG_STATE_HOME=\"$PWD/state\" SEALCAST_BROKER=tcp://127.0.0.1:$MQTT_PORT",
		"trap 'kill $(jobs -p) 2>/dev/null || true' EXIT",
		// serve must not see the client commands' broker variable (it refuses it).
		strings.Replace(start, "./sealcast serve", "env -u SEALCAST_BROKER ./sealcast serve", 1),
		"for i in $(seq 1 300); do grep -q 'sealcast serving' serve.log && break; sleep 0.1; done",
		commands,
		releasing[0],
		"echo README-DONE",
	}, "\n")
	port := strings.TrimPrefix(freeAddr(t), "127.0.0.1:")
	cmd := exec.Command("bash", "-c", script)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "MQTT_PORT="+port, "SEALCAST_PASSWORD=", "SEALCAST_USER=")
	done := make(chan struct{})
	var out []byte
	go func() {
		out, err = cmd.CombinedOutput()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Minute):
		cmd.Process.Kill()
		<-done
		t.Fatalf("the README's commands did not finish in 5 minutes:\n%s", out)
	}
	log, _ := os.ReadFile(filepath.Join(dir, "serve.log"))
	if err != nil || !strings.Contains(string(out), "README-DONE") {
		t.Fatalf("the README's commands failed: %v\n%s\nserve.log (tail):\n%s", err, out, tail(string(log), 3000))
	}
	for _, want := range []string{"installed version 1", "confirmed version 1", "provisioned 100 devices", "completed, 101 of 101 installed"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("the output does not say %q:\n%s", want, out)
		}
	}
}
