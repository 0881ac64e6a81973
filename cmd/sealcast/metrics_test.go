package main

import (
	"bytes"
	"io"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestMetricsDocumented: every sealcast_* metric serve exposes is in OPERATIONS.md 7.1,
// every metric listed there is exposed, the Go and process collectors are there, and,
// where promtool is installed (Debian's prometheus package), the exposition passes
// promtool check metrics.
func TestMetricsDocumented(t *testing.T) {
	t.Parallel()
	addr := freeAddr(t)
	data := t.TempDir()
	p := startProc(t, []string{"SEALCAST_ADMIN_PASSWORD=metrics-test-password"}, "serve", "-data", data, "-listen", "127.0.0.1:0", "-http", addr, "-log-level", "warn")
	var body []byte
	eventually(t, "/metrics answers", func() bool {
		resp, err := http.Get("http://" + addr + "/metrics")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		body, err = io.ReadAll(resp.Body)
		return err == nil && resp.StatusCode == http.StatusOK && bytes.Contains(body, []byte("sealcast_devices "))
	}, p)
	var exposed []string
	for _, m := range regexp.MustCompile(`(?m)^# TYPE (\S+) `).FindAllSubmatch(body, -1) {
		exposed = append(exposed, string(m[1]))
	}
	doc, err := os.ReadFile("../../docs/OPERATIONS.md")
	if err != nil {
		t.Fatal(err)
	}
	section := string(doc)[strings.Index(string(doc), "### 7.1"):strings.Index(string(doc), "### 7.2")]
	var documented []string
	for _, m := range regexp.MustCompile("(?m)^\\| `(sealcast_[a-z_]+)").FindAllStringSubmatch(section, -1) {
		documented = append(documented, m[1])
	}
	for _, name := range exposed {
		if strings.HasPrefix(name, "sealcast_") && !slices.Contains(documented, name) {
			t.Errorf("%s is exposed but not in OPERATIONS.md 7.1", name)
		}
	}
	for _, name := range documented {
		if !slices.Contains(exposed, name) {
			t.Errorf("%s is in OPERATIONS.md 7.1 but not exposed", name)
		}
	}
	for _, name := range []string{"go_goroutines", "process_resident_memory_bytes", "sealcast_build_info", "sealcast_ack_seconds", "sealcast_install_seconds"} {
		if !slices.Contains(exposed, name) {
			t.Errorf("%s is not exposed", name)
		}
	}
	if _, err := exec.LookPath("promtool"); err != nil {
		if os.Getenv("SEALCAST_REQUIRE_TOOLS") == "1" {
			t.Fatal("promtool not found (apt-get install -y prometheus)")
		}
		t.Skip("promtool not found; the exposition was not linted")
	}
	cmd := exec.Command("promtool", "check", "metrics")
	cmd.Stdin = bytes.NewReader(body)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("promtool check metrics: %v\n%s", err, out)
	}
}
