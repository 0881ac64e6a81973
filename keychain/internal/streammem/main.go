// Command streammem encrypts and decrypts an image of a given size through the streaming
// API, through a pipe so that neither side ever holds the image, and prints its own peak
// resident memory (VmHWM) in KiB. keychain's TestStreamingMemory runs it.
package main

import (
	"bufio"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/sealcast/sealcast/keychain"
)

func main() {
	size, err := strconv.ParseInt(os.Args[1], 10, 64)
	if err != nil {
		fmt.Fprintln(os.Stderr, "usage: streammem BYTES")
		os.Exit(2)
	}
	pk := [keychain.Size]byte{7}
	pr, pw := io.Pipe()
	src := sha256.New()
	go func() {
		w, _ := keychain.EncryptStream(pw, pk, keychain.DefaultChunkSize)
		// Deterministic pseudo-random plaintext, generated as it is written.
		block := make([]byte, 32*1024)
		for left := size; left > 0; left -= int64(len(block)) {
			sum := sha256.Sum256(block[:32])
			for i := 0; i < len(block); i += 32 {
				copy(block[i:], sum[:])
			}
			n := min(int64(len(block)), left)
			src.Write(block[:n])
			if _, err := w.Write(block[:n]); err != nil {
				pw.CloseWithError(err)
				return
			}
		}
		pw.CloseWithError(w.Close())
	}()
	r, _ := keychain.DecryptStream(pr, pk, keychain.DefaultChunkSize)
	dst := sha256.New()
	n, err := io.Copy(dst, r)
	if err != nil {
		fmt.Fprintln(os.Stderr, "decrypt:", err)
		os.Exit(1)
	}
	if n != size || string(dst.Sum(nil)) != string(src.Sum(nil)) {
		fmt.Fprintln(os.Stderr, "decrypted image differs")
		os.Exit(1)
	}
	fmt.Println(peakKiB())
}

func peakKiB() string {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "VmHWM:"); ok {
			return strings.TrimSuffix(strings.TrimSpace(v), " kB")
		}
	}
	return "unknown"
}
