package keychain

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
)

// TestStreamingMemory decrypts a 100 MiB image through the streaming API in a separate
// process (built without the race detector, whose shadow memory would dominate) and checks
// that its peak resident memory stays under 32 MiB: memory is bounded by the chunk size,
// not the image size.
func TestStreamingMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs a helper process")
	}
	if runtime.GOOS != "linux" {
		t.Skip("reads /proc/self/status")
	}
	bin := filepath.Join(t.TempDir(), "streammem")
	build := exec.Command("go", "build", "-o", bin, "./internal/streammem")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, strconv.Itoa(100<<20)).Output()
	if err != nil {
		t.Fatalf("streammem: %v", err)
	}
	kib, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatalf("streammem printed %q", out)
	}
	t.Logf("peak RSS decrypting 100 MiB: %.1f MiB", float64(kib)/1024)
	if kib > 32*1024 {
		t.Errorf("peak RSS %d KiB exceeds 32 MiB", kib)
	}
}
