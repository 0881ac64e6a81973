package updater

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/sealcast/sealcast/protocol"
)

// partSize is the size of every upload part but the last (PROTOCOL.md 12.3).
const partSize = 256 << 10

// uploadTTL is how long an unfinished or unused upload is kept.
const uploadTTL = 24 * time.Hour

// defaultMaxUploads bounds the uploads kept at once unless Options.MaxUploads says (each
// holds a file descriptor and its declared size on disk); together they hold at most
// maxUploadShare times the largest image allowed.
const (
	defaultMaxUploads = 16
	maxUploadShare    = 4
)

// uploads receives images published in parts on the upload topics and keeps them as
// files in dir until a release uses them.
type uploads struct {
	dir string
	max uint64
	// open is the most uploads kept at once.
	open int
	mu   sync.Mutex
	m    map[string]*upload
}

type upload struct {
	id       string
	size     uint64
	sha256   string
	f        *os.File
	got      []bool
	missing  int
	finished bool
	started  time.Time
}

func newUploads(dataDir string, max uint64, open int) (*uploads, error) {
	dir := filepath.Join(dataDir, "uploads")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("updater: creating the upload directory: %w", err)
	}
	// Uploads do not survive a restart (their parts were in flight); remove leftovers.
	old, _ := filepath.Glob(filepath.Join(dir, "*.part"))
	for _, p := range old {
		os.Remove(p)
	}
	return &uploads{dir: dir, max: max, open: open, m: map[string]*upload{}}, nil
}

func (us *uploads) begin(size uint64, sum string) (*upload, error) {
	if size > us.max {
		return nil, protocol.Errorf(protocol.ErrTooLarge, "image of %d bytes is over the limit of %d bytes", size, us.max)
	}
	if b, err := hex.DecodeString(sum); err != nil || len(b) != sha256.Size || strings.ToLower(sum) != sum {
		return nil, protocol.Errorf(protocol.ErrBadRequest, "sha256 must be 64 lowercase hex digits")
	}
	us.mu.Lock()
	us.gc()
	open, held := len(us.m), uint64(0)
	for _, u := range us.m {
		held += u.size
	}
	us.mu.Unlock()
	if open >= us.open || held+size > uint64(max(maxUploadShare, us.open/4))*us.max {
		return nil, protocol.Errorf(protocol.ErrConflict, "%d uploads (%d bytes) are kept already, the most the service holds at once (%d uploads, %d bytes): create releases from them, or wait: an upload is dropped %s after it began", open, held, us.open, uint64(max(maxUploadShare, us.open/4))*us.max, uploadTTL)
	}
	var rnd [8]byte
	rand.Read(rnd[:])
	id := "up-" + hex.EncodeToString(rnd[:])
	f, err := os.OpenFile(filepath.Join(us.dir, id+".part"), os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("creating upload file: %w", err)
	}
	if err := f.Truncate(int64(size)); err != nil {
		f.Close()
		return nil, fmt.Errorf("sizing upload file: %w", err)
	}
	parts := int((size + partSize - 1) / partSize)
	up := &upload{id: id, size: size, sha256: sum, f: f, got: make([]bool, parts), missing: parts, started: time.Now()}
	us.mu.Lock()
	us.gc()
	us.m[id] = up
	us.mu.Unlock()
	return up, nil
}

// part stores one part; wrong sizes and unknown uploads are ignored (and logged by the
// caller), and are reported at finish as missing parts.
func (us *uploads) part(id string, n uint32, data []byte) error {
	us.mu.Lock()
	defer us.mu.Unlock()
	up := us.m[id]
	switch {
	case up == nil:
		return fmt.Errorf("no upload %q in progress", id)
	case up.finished:
		return fmt.Errorf("upload %q is already finished", id)
	case int(n) >= len(up.got):
		return fmt.Errorf("upload %q has %d parts; part %d is out of range", id, len(up.got), n)
	}
	want := uint64(partSize)
	if int(n) == len(up.got)-1 {
		want = up.size - uint64(n)*partSize
	}
	if uint64(len(data)) != want {
		return fmt.Errorf("upload %q part %d is %d bytes, want %d", id, n, len(data), want)
	}
	if _, err := up.f.WriteAt(data, int64(n)*partSize); err != nil {
		return fmt.Errorf("writing upload %q part %d: %w", id, n, err)
	}
	if !up.got[n] {
		up.got[n] = true
		up.missing--
	}
	return nil
}

// finish checks that every part arrived and the image hashes to what begin declared.
func (us *uploads) finish(id string) (*upload, error) {
	us.mu.Lock()
	up := us.m[id]
	us.mu.Unlock()
	if up == nil {
		return nil, protocol.Errorf(protocol.ErrNotFound, "no upload %q (uploads are kept for %s and do not survive a restart)", id, uploadTTL)
	}
	us.mu.Lock()
	missing := up.missing
	var first []string
	for i, ok := range up.got {
		if !ok && len(first) < 10 {
			first = append(first, fmt.Sprint(i))
		}
	}
	us.mu.Unlock()
	if missing > 0 {
		return nil, protocol.Errorf(protocol.ErrBadUpload, "upload %q is missing %d of %d parts (first: %s); publish them and finish again", id, missing, len(up.got), strings.Join(first, ", "))
	}
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(up.f, 0, int64(up.size))); err != nil {
		return nil, fmt.Errorf("reading upload %q: %w", id, err)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != up.sha256 {
		return nil, protocol.Errorf(protocol.ErrBadUpload, "upload %q has sha256 %s, but upload.begin declared %s", id, got, up.sha256)
	}
	us.mu.Lock()
	up.finished = true
	us.mu.Unlock()
	return up, nil
}

// get returns a finished upload.
func (us *uploads) get(id string) (*upload, error) {
	us.mu.Lock()
	defer us.mu.Unlock()
	up := us.m[id]
	if up == nil || !up.finished {
		return nil, protocol.Errorf(protocol.ErrNotFound, "no finished upload %q: run upload.begin, publish the parts, then upload.finish", id)
	}
	return up, nil
}

// remove deletes an upload and its file: a release has published it.
func (us *uploads) remove(id string) {
	us.mu.Lock()
	defer us.mu.Unlock()
	if up := us.m[id]; up != nil {
		up.f.Close()
		os.Remove(up.f.Name())
		delete(us.m, id)
	}
}

// reader returns the image of a finished upload.
func (up *upload) reader() *io.SectionReader { return io.NewSectionReader(up.f, 0, int64(up.size)) }

// gc removes uploads older than uploadTTL. Called with us.mu held.
func (us *uploads) gc() {
	for id, up := range us.m {
		if time.Since(up.started) > uploadTTL {
			up.f.Close()
			os.Remove(up.f.Name())
			delete(us.m, id)
		}
	}
}

func (us *uploads) close() {
	us.mu.Lock()
	defer us.mu.Unlock()
	for id, up := range us.m {
		up.f.Close()
		os.Remove(up.f.Name())
		delete(us.m, id)
	}
}

// receive stores a part published on an upload topic (PROTOCOL.md 12.3).
func (us *uploads) receive(topic string, payload []byte) error {
	id, n, ok := protocol.UploadOf(topic)
	if !ok {
		return fmt.Errorf("%q is not an upload part topic", topic)
	}
	return us.part(id, n, payload)
}
