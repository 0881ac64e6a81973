package device

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// ChunkStore keeps the chunks of one release fetched ahead of its key [SC-9.9], each as
// its chunk topic carries it (C_i || proof_i), checked against the release's chunk tree
// before it is kept. DirChunkStore and MemChunkStore implement it.
type ChunkStore interface {
	// Limit is the most bytes of chunks it keeps: a release whose chunks take more is
	// not prefetched.
	Limit() uint64
	// Hold makes it keep release id's chunks, dropping any other release's.
	Hold(id keychain.ReleaseID) error
	// Put keeps chunk i of release id.
	Put(id keychain.ReleaseID, i uint32, payload []byte) error
	// Get returns chunk i of release id, if kept.
	Get(id keychain.ReleaseID, i uint32) ([]byte, bool)
	// Drop forgets release id's chunks.
	Drop(id keychain.ReleaseID) error
}

// MemChunkStore keeps chunks in memory (simulators, tests). It is safe for concurrent use.
type MemChunkStore struct {
	limit  uint64
	mu     sync.Mutex
	id     keychain.ReleaseID
	chunks map[uint32][]byte
}

// NewMemChunkStore returns a store that keeps at most limit bytes.
func NewMemChunkStore(limit uint64) *MemChunkStore { return &MemChunkStore{limit: limit} }

func (m *MemChunkStore) Limit() uint64 { return m.limit }

func (m *MemChunkStore) Hold(id keychain.ReleaseID) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.id != id || m.chunks == nil {
		m.id, m.chunks = id, map[uint32][]byte{}
	}
	return nil
}

func (m *MemChunkStore) Put(id keychain.ReleaseID, i uint32, payload []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.id != id || m.chunks == nil {
		return fmt.Errorf("device: the chunk store does not hold release %s", id)
	}
	m.chunks[i] = append([]byte(nil), payload...)
	return nil
}

func (m *MemChunkStore) Get(id keychain.ReleaseID, i uint32) ([]byte, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.id != id {
		return nil, false
	}
	p, ok := m.chunks[i]
	return p, ok
}

func (m *MemChunkStore) Drop(id keychain.ReleaseID) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.id == id {
		m.chunks = nil
	}
	return nil
}

// DirChunkStore keeps chunks as files in a directory: DIR/<release id>/<index>. It keeps
// one release at a time.
type DirChunkStore struct {
	dir   string
	limit uint64
}

// NewDirChunkStore uses dir (created, mode 0700) for at most limit bytes of chunks.
func NewDirChunkStore(dir string, limit uint64) (*DirChunkStore, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("device: creating the prefetch directory: %w", err)
	}
	return &DirChunkStore{dir: dir, limit: limit}, nil
}

func (d *DirChunkStore) Limit() uint64 { return d.limit }

func (d *DirChunkStore) Hold(id keychain.ReleaseID) error {
	ents, err := os.ReadDir(d.dir)
	if err != nil {
		return fmt.Errorf("device: reading the prefetch directory: %w", err)
	}
	for _, e := range ents {
		if e.Name() != id.String() {
			if err := os.RemoveAll(filepath.Join(d.dir, e.Name())); err != nil {
				return fmt.Errorf("device: dropping prefetched release %s: %w", e.Name(), err)
			}
		}
	}
	return os.MkdirAll(filepath.Join(d.dir, id.String()), 0o700)
}

func (d *DirChunkStore) Put(id keychain.ReleaseID, i uint32, payload []byte) error {
	return writeFileAtomic(filepath.Join(d.dir, id.String(), strconv.FormatUint(uint64(i), 10)), payload, 0o600)
}

func (d *DirChunkStore) Get(id keychain.ReleaseID, i uint32) ([]byte, bool) {
	b, err := os.ReadFile(filepath.Join(d.dir, id.String(), strconv.FormatUint(uint64(i), 10)))
	return b, err == nil
}

func (d *DirChunkStore) Drop(id keychain.ReleaseID) error {
	return os.RemoveAll(filepath.Join(d.dir, id.String()))
}

// prefetch is a release being fetched ahead of its key [SC-9.9].
type prefetch struct {
	n       keychain.PrefetchNotice
	startAt time.Time // a random moment within the notice's jitter
	started bool
	m       *keychain.Manifest
	prefix  string
	next    uint32          // the first chunk not kept yet
	subbed  map[uint32]bool // chunk subscriptions believed open
	fails   int             // failed fetches of the manifest, or of chunk next
	due     time.Time       // when the manifest or chunk next is late
	lastPr  time.Time
	done    bool // every chunk is kept
}

// onPrefetch follows [SC-9.9] for a prefetch notice: one that verifies under the key of
// the device's own index schedules the download of its release within its jitter.
func (a *Agent) onPrefetch(p []byte) {
	if len(p) == 0 || a.opts.Prefetch == nil {
		return
	}
	n, err := keychain.ParsePrefetchNotice(p)
	if err == nil && (n.Epoch != a.st.Epoch || n.Seq != a.st.Seq) {
		err = fmt.Errorf("it names index %d of epoch %d; the device is at %d of %d", n.Seq, n.Epoch, a.st.Seq, a.st.Epoch)
	}
	if err == nil {
		err = keychain.VerifyPrefetchNotice(p, keychain.Key(a.st.UnitData, n.Seq), a.serial)
	}
	if err != nil {
		a.log.Warn().Err(err).Msg("ignoring a prefetch notice")
		return
	}
	if pf := a.pre; pf != nil && pf.n.ID == n.ID {
		return // scheduled or under way
	}
	a.abortPrefetch()
	jitter := time.Duration(n.Jitter) * time.Second
	a.pre = &prefetch{n: n, startAt: time.Now().Add(rand.N(jitter + 1)), subbed: map[uint32]bool{}}
	a.log.Info().Stringer("id", n.ID).Time("start_at", a.pre.startAt).Msg("release announced; prefetching it")
}

// prefetchIdle reports whether a prefetch may use the connection: no update or trial
// is in progress.
func (a *Agent) prefetchIdle() bool {
	return a.job == nil && (a.st.Trial == nil || a.st.Trial.failed()) && a.conn != nil
}

// stepPrefetch starts the prefetch when its moment came, and fetches again what is late.
func (a *Agent) stepPrefetch(now time.Time) {
	pf := a.pre
	if pf == nil || !a.prefetchIdle() {
		return
	}
	switch {
	case !pf.started && !now.Before(pf.startAt):
		pf.started = true
		a.prefetchManifest(now)
	case pf.started && !now.Before(pf.due):
		if pf.fails++; pf.fails >= a.opts.FetchTries {
			a.log.Warn().Stringer("id", pf.n.ID).Msg("prefetch given up: the manifest or a chunk did not arrive")
			a.abortPrefetch()
			return
		}
		if pf.m == nil {
			a.unsubscribe(protocol.ManifestTopic(pf.n.ID))
			a.prefetchManifest(now)
			return
		}
		topic := pf.prefix + strconv.FormatUint(uint64(pf.next), 10)
		a.unsubscribe(topic)
		pf.subbed[pf.next] = false
		a.prefetchFill(now)
	}
}

func (a *Agent) prefetchManifest(now time.Time) {
	a.pre.due = now.Add(a.opts.ChunkTimeout)
	a.subscribe(protocol.ManifestTopic(a.pre.n.ID))
}

// onPrefetchManifest checks the manifest of the release announced: signed, the one the
// notice names, newer than what runs, and small enough to keep.
func (a *Agent) onPrefetchManifest(p []byte) {
	pf := a.pre
	a.unsubscribe(protocol.ManifestTopic(pf.n.ID))
	m, err := keychain.ParseManifest(p, a.st.ReleasePublicKey)
	switch {
	case err != nil:
	case m.Release != pf.n.ID || keychain.ManifestDigest(p) != pf.n.ManifestDigest:
		err = errors.New("the manifest is not the one the notice names")
	case m.Version <= a.st.Version:
		err = fmt.Errorf("version %d is not above the installed %d", m.Version, a.st.Version)
	case m.ChunkSize > a.opts.MaxChunkSize:
		err = fmt.Errorf("chunk size %d is above what the device buffers", m.ChunkSize)
	case prefetchSize(m) > a.opts.Prefetch.Limit():
		err = fmt.Errorf("its chunks take %d bytes, above the prefetch limit of %d", prefetchSize(m), a.opts.Prefetch.Limit())
	}
	if err == nil {
		err = a.opts.Prefetch.Hold(m.Release)
	}
	if err != nil {
		a.log.Info().Err(err).Stringer("id", pf.n.ID).Msg("not prefetching the release")
		a.abortPrefetch()
		return
	}
	pf.m, pf.fails = m, 0
	pf.prefix = strings.TrimSuffix(protocol.ChunkTopic(m.Release, 0), "0")
	for pf.next < m.ChunkCount {
		if _, ok := a.opts.Prefetch.Get(m.Release, pf.next); !ok {
			break
		}
		pf.next++ // kept before a restart
	}
	a.prefetchFill(time.Now())
}

// prefetchSize is what the chunks of m take: each chunk's ciphertext, its 16-byte tag
// and its proof.
func prefetchSize(m *keychain.Manifest) uint64 {
	return m.ImageSize + uint64(m.ChunkCount)*(16+32*uint64(keychain.ChunkTreeDepth(m.ChunkCount)))
}

// prefetchFill subscribes to the window of chunks not kept yet, as 9.2 does.
func (a *Agent) prefetchFill(now time.Time) {
	pf := a.pre
	if pf.done {
		return
	}
	if pf.next == pf.m.ChunkCount {
		a.prefetchDone()
		return
	}
	end := min(uint64(pf.next)+uint64(a.opts.Window), uint64(pf.m.ChunkCount))
	for i := pf.next; uint64(i) < end; i++ {
		if !pf.subbed[i] {
			if _, ok := a.opts.Prefetch.Get(pf.m.Release, i); !ok && a.subscribe(pf.prefix+strconv.FormatUint(uint64(i), 10)) {
				pf.subbed[i] = true
				a.c.chunkFetches.Add(1)
			}
		}
	}
	pf.due = now.Add(a.opts.ChunkTimeout)
}

// onPrefetchChunk keeps chunk i once the chunk tree authenticates it [SC-4.3].
func (a *Agent) onPrefetchChunk(i uint32, p []byte) {
	pf := a.pre
	if !pf.subbed[i] {
		return
	}
	a.unsubscribe(pf.prefix + strconv.FormatUint(uint64(i), 10))
	pf.subbed[i] = false
	if _, err := keychain.VerifyChunk(pf.m.ChunksRoot, pf.m.ChunkCount, i, p); err != nil {
		a.log.Warn().Err(err).Uint32("chunk", i).Msg("a prefetched chunk is not in the release's chunk tree")
		if i == pf.next {
			pf.due = time.Now() // counted as a failed fetch at the next tick
		}
		return
	}
	if err := a.opts.Prefetch.Put(pf.m.Release, i, p); err != nil {
		a.log.Warn().Err(err).Msg("prefetch given up: the chunk store refused a chunk")
		a.abortPrefetch()
		return
	}
	for pf.next < pf.m.ChunkCount {
		if _, ok := a.opts.Prefetch.Get(pf.m.Release, pf.next); !ok {
			break
		}
		pf.next++
		pf.fails = 0
	}
	now := time.Now()
	if now.Sub(pf.lastPr) >= a.opts.ProgressInterval {
		pf.lastPr = now
		a.publishState()
	}
	a.prefetchFill(now)
}

// prefetchDone records a release whose every chunk is kept.
func (a *Agent) prefetchDone() {
	pf := a.pre
	pf.done, pf.due = true, time.Now().Add(100*365*24*time.Hour)
	a.log.Info().Stringer("id", pf.m.Release).Uint32("chunks", pf.m.ChunkCount).Msg("release prefetched")
	a.emit(Event{Kind: EventPrefetched, Release: pf.m.Release})
	a.publishState()
}

// abortPrefetch drops the prefetch in progress and its subscriptions (not what is kept).
func (a *Agent) abortPrefetch() {
	pf := a.pre
	if pf == nil {
		return
	}
	a.pre = nil
	if pf.started && pf.m == nil {
		a.unsubscribe(protocol.ManifestTopic(pf.n.ID))
	}
	for i, on := range pf.subbed {
		if on {
			a.unsubscribe(pf.prefix + strconv.FormatUint(uint64(i), 10))
		}
	}
}

// prefetchState is the prefetch part of the device's state document (13.3).
func (a *Agent) prefetchState() *protocol.PrefetchState {
	pf := a.pre
	if pf == nil || pf.m == nil {
		return nil
	}
	return &protocol.PrefetchState{Release: pf.m.Release, ChunksDone: pf.next, ChunkCount: pf.m.ChunkCount}
}

// routePrefetch hands a message on a release topic to the prefetch, and reports whether
// it was one of its topics.
func (a *Agent) routePrefetch(topic string, p []byte) bool {
	pf := a.pre
	if pf == nil || !pf.started {
		return false
	}
	if pf.m == nil {
		if topic != protocol.ManifestTopic(pf.n.ID) {
			return false
		}
		a.onPrefetchManifest(p)
		return true
	}
	rest, ok := strings.CutPrefix(topic, pf.prefix)
	if !ok {
		return false
	}
	n, err := strconv.ParseUint(rest, 10, 32)
	if err == nil && n < uint64(pf.m.ChunkCount) {
		a.onPrefetchChunk(uint32(n), p)
	}
	return true
}

// stored returns chunk i of release id if the prefetch kept it.
func (a *Agent) stored(id keychain.ReleaseID, i uint32) ([]byte, bool) {
	if a.opts.Prefetch == nil {
		return nil, false
	}
	return a.opts.Prefetch.Get(id, i)
}
