package device

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// failure remembers the last failed key message, so a redelivery on the same connection
// does not redo (and re-report) it.
type failure struct {
	epoch, seq uint32
	id         keychain.ReleaseID
	code       protocol.Code
	// attempts counts consecutive failed attempts at this key message; a transient
	// failure is tried again at retryAt while connected (and at every reconnect).
	attempts int
	retryAt  time.Time
	retrying bool // the key message was asked for again; the next delivery is processed
}

func (f *failure) is(epoch, seq uint32, id keychain.ReleaseID) bool {
	return f != nil && f.epoch == epoch && f.seq == seq && f.id == id
}

func (f *failure) transient() bool { return f.code.Transient() }

// onKey follows [SC-10.1] for one key message.
func (a *Agent) onKey(p []byte) {
	if len(p) == 0 {
		return // a cleared key topic [SC-6.1]
	}
	a.c.keyMessages.Add(1)
	km, err := keychain.ParseKeyMessage(p)
	if err != nil {
		a.badKeyMessage(p, err)
		return
	}
	log := a.log.With().Stringer("kind", km.Kind).Uint32("epoch", km.Epoch).Uint32("seq", km.Seq).Stringer("id", km.ID).Logger()
	a.emit(Event{Kind: EventKeyMessage, Release: km.ID})
	// Step 1: the message our last ack answers. Re-sent even if confirmed: a server whose
	// store lost its latest writes is back at this position and needs it again.
	if l := a.lastAck; l != nil && l.Epoch == km.Epoch && l.Seq == km.Seq && l.ID == km.ID {
		a.sendAck()
		return
	}
	// [SC-10.5]: nothing else starts while an image runs on trial, and a key message
	// whose trial failed gets its report again.
	if tr := a.st.Trial; tr != nil && !tr.failed() {
		a.holdKey(p)
		return
	} else if tr.answers(km.Epoch, km.Seq, km.ID) {
		a.publishReport(tr.Report)
		return
	}
	if j := a.job; j != nil && j.km.Epoch == km.Epoch && j.km.Seq == km.Seq && j.km.ID == km.ID {
		return // already working on it (redelivered after a reconnect)
	}
	if f := a.failed; f.is(km.Epoch, km.Seq, km.ID) && !f.retrying {
		return // failed already; a transient failure is retried later (retryAt, reconnect)
	}
	// Step 2: stale.
	if km.Epoch != a.st.Epoch || km.Seq > a.st.Seq || km.Seq < 1 {
		log.Warn().Uint32("device_epoch", a.st.Epoch).Uint32("device_seq", a.st.Seq).Msg("stale key message")
		if km.Epoch == a.st.Epoch {
			// version = what is installed, so a server that moves down to D also knows it.
			a.fail(km.Epoch, km.Seq, km.ID, keychain.Key(a.st.UnitData, km.Seq), a.st.Version, protocol.CodeStaleKey,
				fmt.Sprintf("key message for index %d, but the device is at %d", km.Seq, a.st.Seq))
		} else {
			a.publishState()
		}
		return
	}
	if a.job != nil {
		log.Info().Stringer("old", a.job.km.ID).Msg("a new key message replaces the update in progress")
		a.abortJob()
	}
	// Step 3: open the secret before acting on anything else.
	k := keychain.Key(a.st.UnitData, km.Seq)
	secret, err := km.Open(k, a.serial)
	if err != nil {
		a.fail(km.Epoch, km.Seq, km.ID, k, 0, protocol.CodeUnwrapFailed, "the key message did not open under this device's key")
		return
	}
	if km.Kind == keychain.KindRekey {
		a.rekey(km, k, secret)
		return
	}
	log.Info().Msg("release offered")
	a.startJob(km, k, keychain.ContentKey(secret))
}

// badKeyMessage reports bad_message when the header is readable and names a key the
// device can use to authenticate the report [SC-6.1].
func (a *Agent) badKeyMessage(p []byte, err error) {
	a.log.Warn().Err(err).Int("bytes", len(p)).Msg("malformed key message")
	if len(p) < 29 || string(p[:4]) != keychain.MagicKey {
		a.publishState()
		return
	}
	epoch, seq := binary.BigEndian.Uint32(p[5:]), binary.BigEndian.Uint32(p[9:])
	var id keychain.ReleaseID
	copy(id[:], p[13:29])
	if a.failed.is(epoch, seq, id) {
		return
	}
	if epoch != a.st.Epoch || seq < 1 || seq > a.st.Seq {
		a.publishState()
		return
	}
	a.fail(epoch, seq, id, keychain.Key(a.st.UnitData, seq), 0, protocol.CodeBadMessage, err.Error())
}

// fail reports a failed update, MACed under K_seq, with D unchanged [SC-7.1, SC-10.1].
func (a *Agent) fail(epoch, seq uint32, id keychain.ReleaseID, k keychain.ChainKey, version uint64, code protocol.Code, msg string) {
	f := &failure{epoch: epoch, seq: seq, id: id, code: code, attempts: 1}
	if a.failed.is(epoch, seq, id) {
		f.attempts = a.failed.attempts + 1
	}
	if f.transient() {
		// Backoff doubling per attempt, with jitter, so a fleet that failed together
		// (a broker hiccup) does not retry together.
		d := a.opts.RetryAfter << min(f.attempts-1, 16)
		d = min(d, a.opts.RetryMax)
		f.retryAt = time.Now().Add(d/2 + rand.N(d/2+1))
	}
	a.failed = f
	a.log.Warn().Stringer("code", code).Stringer("id", id).Uint32("seq", seq).Str("reason", msg).Msg("update failed")
	rep := keychain.Ack{Kind: keychain.AckFailed, Epoch: epoch, Seq: seq, ID: id, Version: version, DeviceSeq: a.st.Seq, Code: uint16(code)}
	raw, err := rep.Seal(k, a.serial)
	if err != nil {
		a.log.Error().Err(err).Msg("sealing the report")
	} else {
		a.publishReport(raw)
	}
	a.emit(Event{Kind: EventFailed, Release: id, Code: code, Version: version, Err: errors.New(msg)})
	rid := id
	a.doc = protocol.DeviceState{State: protocol.AgentFailed, Release: &rid, Error: &protocol.DeviceError{Code: code, Message: msg}}
	a.publishState()
}

func (a *Agent) publishReport(raw []byte) {
	if !a.publish(protocol.AckTopic(a.serial), false, raw) {
		a.report = raw // sent at the next connection
		return
	}
	a.report = nil
	a.c.reportsSent.Add(1)
	code := protocol.Code(binary.BigEndian.Uint16(raw[41:]))
	var id keychain.ReleaseID
	copy(id[:], raw[13:29])
	a.emit(Event{Kind: EventReportSent, Code: code, Release: id})
}

// rekey persists the next chain before acking [SC-10.1 step 5, SC-10.3].
func (a *Agent) rekey(km *keychain.KeyMessage, k keychain.ChainKey, secret [keychain.Size]byte) {
	ack := keychain.Ack{Kind: keychain.AckRekeyed, Epoch: km.Epoch, Seq: km.Seq, ID: km.ID, DeviceSeq: km.NewLength}
	raw, err := ack.Seal(k, a.serial)
	if err != nil {
		a.fatal = fmt.Errorf("device: sealing the re-key ack: %w", err)
		return
	}
	ns := a.st.Clone()
	ns.UnitData = keychain.NextUnitData(a.st.UnitData, secret) // [SC-3.2a]
	ns.Epoch = km.Epoch + 1
	ns.Seq, ns.ChainLength = km.NewLength, km.NewLength
	ns.LastAck, ns.LastAckConfirmed, ns.LastAckKey = raw, false, k
	if !a.persist(ns, &ack) {
		return
	}
	a.log.Info().Uint32("epoch", ns.Epoch).Uint32("length", ns.ChainLength).Msg("re-keyed")
	a.doc = protocol.DeviceState{State: protocol.AgentIdle}
	a.newAck()
}

// persist saves ns and makes it current. A vault that cannot be written stops the agent.
func (a *Agent) persist(ns State, ack *keychain.Ack) bool {
	if err := a.opts.Vault.Save(ns); err != nil {
		a.fatal = fmt.Errorf("device: cannot persist the new sequence number, so not acking: %w", err)
		return false
	}
	a.st = ns
	a.lastAck = ack
	a.emit(Event{Kind: EventPersisted, Version: ns.Version, Release: ack.ID})
	if a.opts.Faults.CrashAfterPersist || a.crashAt(CrashPersisted, ack.ID, 0) {
		a.crash()
		return false
	}
	return true
}

// newAck publishes a freshly persisted ack and starts its re-send timer [SC-10.1 step 6].
func (a *Agent) newAck() {
	a.ackEvery = a.opts.AckResend
	if d := a.opts.Faults.AckDelay; d > 0 {
		a.ackHeld = true
		a.ackAt = time.Now().Add(d)
		a.publishState()
		return
	}
	a.ackHeld = false
	a.sendAck()
	a.ackAt = time.Now().Add(a.ackEvery)
	a.publishState()
}

func (a *Agent) sendAck() {
	if a.st.LastAck == nil || !a.publish(protocol.AckTopic(a.serial), false, a.st.LastAck) {
		return
	}
	a.c.acksSent.Add(1)
	a.emit(Event{Kind: EventAckSent, Release: a.lastAck.ID, Version: a.lastAck.Version})
}

// onReceipt confirms the last ack [SC-10.1 step 7, SC-8.1].
func (a *Agent) onReceipt(p []byte) {
	if len(p) == 0 || a.lastAck == nil || a.st.LastAckConfirmed {
		return
	}
	r, err := keychain.ParseReceipt(p)
	if err != nil {
		a.log.Warn().Err(err).Msg("ignoring a malformed receipt")
		return
	}
	if !r.Answers(*a.lastAck) {
		return // a receipt for a report or an older ack
	}
	if err := keychain.VerifyReceipt(p, a.st.LastAckKey, a.serial); err != nil {
		a.log.Warn().Msg("ignoring a receipt whose MAC does not verify")
		return
	}
	ns := a.st.Clone()
	ns.LastAckConfirmed = true
	ns.LastAckKey = keychain.ChainKey{}
	if err := a.opts.Vault.Save(ns); err != nil {
		a.fatal = fmt.Errorf("device: cannot persist the confirmed ack: %w", err)
		return
	}
	a.st = ns
	a.ackHeld = false
	a.c.confirmed.Add(1)
	a.log.Info().Stringer("id", r.ID).Uint32("seq", a.st.Seq).Msg("ack confirmed")
	a.emit(Event{Kind: EventConfirmed, Release: r.ID, Version: a.st.Version})
}

// publishState publishes the device state JSON, retained [SC-13.3].
func (a *Agent) publishState() {
	if a.conn == nil {
		return
	}
	d := a.doc
	d.Serial, d.Version, d.Epoch, d.Seq, d.Updated = a.serial, a.st.Version, a.st.Epoch, a.st.Seq, time.Now().UTC()
	d.Prefetch = a.prefetchState()
	if d.State == "" {
		d.State = protocol.AgentIdle
	}
	b, err := json.Marshal(d)
	if err != nil {
		return
	}
	if a.publish(protocol.StateTopic(a.serial), true, b) {
		a.c.statePublishes.Add(1)
	}
}

// ---------------------------------------------------------------------------------------
// Downloading [SC-9.4].

type phase int

const (
	phaseManifest phase = iota
	phaseChunks
)

// job is one release being downloaded and installed. It lives across reconnects, so a
// download resumes at the first unprocessed chunk.
type job struct {
	a        *Agent
	km       *keychain.KeyMessage
	key      keychain.ChainKey
	ck       keychain.ContentKey
	phase    phase
	fails    int // failures of the manifest fetch
	deadline time.Time

	m       *keychain.Manifest
	waiting []byte // a manifest signed by a key this device has not learned yet [SC-5.3]
	prefix  string // chunk topic prefix
	dec     *keychain.ImageDecryptor
	inst    Install
	plain   []byte
	next    uint32
	buf     map[uint32][]byte // arrived, not processed; at most Window entries
	subbed  map[uint32]bool   // subscriptions believed open
	tries   map[uint32]int    // fetches per index, for events
	bad     map[uint32]int    // failures per index (bad or late)
	lastPr  time.Time
}

func (a *Agent) startJob(km *keychain.KeyMessage, k keychain.ChainKey, ck keychain.ContentKey) {
	a.abortPrefetch() // the update takes the connection; what was prefetched is used [SC-9.9]
	j := &job{a: a, km: km, key: k, ck: ck}
	a.job = j
	id := km.ID
	a.doc = protocol.DeviceState{State: protocol.AgentDownloading, Release: &id}
	j.fetchManifest(time.Now())
	a.publishState()
}

func (j *job) fetchManifest(now time.Time) {
	j.deadline = now.Add(j.a.opts.ChunkTimeout)
	if j.a.subscribe(protocol.ManifestTopic(j.km.ID)) {
		j.a.emit(Event{Kind: EventManifestFetch, Release: j.km.ID})
	}
}

func (j *job) fetch(i uint32, now time.Time) {
	j.deadline = now.Add(j.a.opts.ChunkTimeout)
	if !j.a.subscribe(j.prefix + strconv.FormatUint(uint64(i), 10)) {
		return
	}
	j.subbed[i] = true
	j.tries[i]++
	j.a.c.chunkFetches.Add(1)
	j.a.emit(Event{Kind: EventChunkFetch, Release: j.km.ID, Index: i, Try: j.tries[i]})
}

// fill subscribes to every index of the window [next, next+W) that has neither arrived
// nor an open subscription.
func (j *job) fill(now time.Time) {
	end := uint64(j.next) + uint64(j.a.opts.Window)
	end = min(end, uint64(j.m.ChunkCount))
	for i := j.next; uint64(i) < end; i++ {
		if _, ok := j.buf[i]; ok || j.subbed[i] {
			continue
		}
		if p, ok := j.a.stored(j.km.ID, i); ok {
			j.buf[i] = p // prefetched [SC-9.9]; process opens it as any chunk
			continue
		}
		j.fetch(i, now)
	}
}

// disconnected forgets which subscriptions are open: after a reconnect every missing
// window chunk is subscribed again, which makes the broker send the retained chunk.
func (j *job) disconnected() {
	clear(j.subbed)
}

func (j *job) resume(now time.Time) {
	if j.phase == phaseManifest {
		j.fetchManifest(now)
		return
	}
	j.deadline = now.Add(j.a.opts.ChunkTimeout)
	j.fill(now)
}

func (j *job) abort() {
	if j.inst != nil {
		if err := j.inst.Abort(); err != nil {
			j.a.log.Warn().Err(err).Msg("aborting the install")
		}
		j.inst = nil
	}
}

// abortJob drops the job and its subscriptions.
func (a *Agent) abortJob() {
	j := a.job
	if j == nil {
		return
	}
	a.job = nil
	j.abort()
	if j.phase == phaseManifest {
		a.unsubscribe(protocol.ManifestTopic(j.km.ID))
		return
	}
	for i, on := range j.subbed {
		if on {
			a.unsubscribe(j.prefix + strconv.FormatUint(uint64(i), 10))
		}
	}
}

func (a *Agent) failJob(code protocol.Code, msg string) {
	j := a.job
	a.abortJob()
	var version uint64
	if j.m != nil {
		version = j.m.Version
	}
	a.fail(j.km.Epoch, j.km.Seq, j.km.ID, j.key, version, code, msg)
}

func (a *Agent) jobTimeout(now time.Time) {
	j := a.job
	if j.phase == phaseManifest {
		j.fails++
		if j.fails >= a.opts.FetchTries {
			a.failJob(protocol.CodeTimeout, fmt.Sprintf("the manifest did not arrive after %d tries", j.fails))
			return
		}
		a.unsubscribe(protocol.ManifestTopic(j.km.ID))
		j.fetchManifest(now)
		return
	}
	i := j.next
	j.bad[i]++
	if j.bad[i] >= a.opts.FetchTries {
		a.failJob(protocol.CodeTimeout, fmt.Sprintf("chunk %d did not arrive after %d tries", i, j.bad[i]))
		return
	}
	a.log.Warn().Uint32("chunk", i).Msg("chunk late; fetching it again")
	if j.subbed[i] {
		a.unsubscribe(j.prefix + strconv.FormatUint(uint64(i), 10))
		j.subbed[i] = false
	}
	j.fetch(i, now)
}

// onRelease handles a manifest or chunk of the release being downloaded.
func (a *Agent) onRelease(topic string, p []byte) {
	if a.routePrefetch(topic, p) {
		return
	}
	j := a.job
	if j == nil {
		return
	}
	if j.phase == phaseManifest {
		if topic == protocol.ManifestTopic(j.km.ID) {
			a.onManifest(p)
		}
		return
	}
	rest, ok := strings.CutPrefix(topic, j.prefix)
	if !ok {
		return
	}
	n, err := strconv.ParseUint(rest, 10, 32)
	if err != nil {
		return
	}
	i := uint32(n)
	a.emit(Event{Kind: EventChunkReceived, Release: j.km.ID, Index: i})
	if i < j.next || uint64(i) >= uint64(j.next)+uint64(a.opts.Window) || j.buf[i] != nil {
		return // a duplicate, or a late copy of a processed chunk
	}
	j.buf[i] = p
	if j.subbed[i] {
		a.unsubscribe(topic)
		j.subbed[i] = false
	}
	a.process()
}

// onManifest verifies the manifest [SC-5.2] and opens the install.
func (a *Agent) onManifest(p []byte) {
	j := a.job
	a.unsubscribe(protocol.ManifestTopic(j.km.ID))
	if len(p) == 0 {
		return // cleared; keep waiting until the timeout
	}
	if len(p) != keychain.ManifestSize || string(p[:4]) != keychain.MagicManifest {
		a.failJob(protocol.CodeBadMessage, fmt.Sprintf("manifest of %d bytes is not a manifest", len(p)))
		return
	}
	if keychain.ManifestDigest(p) != j.km.ManifestDigest {
		a.failJob(protocol.CodeBadManifest, "the manifest's digest differs from the key message's manifest_digest")
		return
	}
	// [SC-5.3] The manifest names the release key that signs it.
	switch ks, _ := keychain.ManifestKeySeq(p); {
	case ks < a.st.KeySeq:
		a.failJob(protocol.CodeBadManifest, fmt.Sprintf("the manifest is signed by release key %d, which key statement %d retired", ks, a.st.KeySeq))
		return
	case ks > a.st.KeySeq:
		// Signed by a key this device has not learned yet: wait for the key statements
		// (it is subscribed to the next one) within the manifest's timeout.
		a.log.Info().Uint32("manifest_key", ks).Uint32("device_key", a.st.KeySeq).Msg("manifest signed by a newer release key; waiting for its key statement")
		j.waiting = p
		return
	}
	m, err := keychain.ParseManifest(p, a.st.ReleasePublicKey)
	if err != nil {
		a.failJob(protocol.CodeBadManifest, "manifest rejected: "+err.Error())
		return
	}
	if m.Release != j.km.ID {
		a.failJob(protocol.CodeBadManifest, fmt.Sprintf("manifest is for release %s, the key message for %s", m.Release, j.km.ID))
		return
	}
	j.m = m
	if m.Version <= a.st.Version {
		a.failJob(protocol.CodeRollback, fmt.Sprintf("release version %d is not newer than the installed version %d", m.Version, a.st.Version))
		return
	}
	if m.ChunkSize > a.opts.MaxChunkSize {
		a.failJob(protocol.CodeUnsupported, fmt.Sprintf("chunk size %d is larger than this device's %d", m.ChunkSize, a.opts.MaxChunkSize))
		return
	}
	inst, err := a.opts.Installer.Begin(m)
	if err != nil {
		a.failJob(protocol.CodeInstallFailed, "the installer refused to begin: "+err.Error())
		return
	}
	j.inst = inst
	j.dec = keychain.NewImageDecryptor(j.ck.PayloadKey(j.km.ID), m)
	j.prefix = strings.TrimSuffix(protocol.ChunkTopic(j.km.ID, 0), "0")
	j.plain = make([]byte, 0, m.ChunkSize)
	j.buf, j.subbed = map[uint32][]byte{}, map[uint32]bool{}
	j.tries, j.bad = map[uint32]int{}, map[uint32]int{}
	j.phase = phaseChunks
	now := time.Now()
	a.log.Info().Uint64("version", m.Version).Uint32("chunks", m.ChunkCount).Uint64("size", m.ImageSize).Msg("manifest verified; downloading")
	a.doc.ChunkCount = m.ChunkCount
	a.publishState()
	j.lastPr = now
	j.fill(now)
	a.process()
}

// process opens, in order, every chunk that arrived, and finishes the install after the
// last one [SC-4.2].
func (a *Agent) process() {
	j := a.job
	for a.job == j && a.fatal == nil {
		ct, ok := j.buf[j.next]
		if !ok {
			break
		}
		i := j.next
		delete(j.buf, i)
		now := time.Now()
		pt, err := j.dec.Open(j.plain[:0], i, ct)
		if err != nil {
			a.c.chunksBad.Add(1)
			j.bad[i]++
			a.log.Warn().Err(err).Uint32("chunk", i).Int("failures", j.bad[i]).Msg("chunk failed to open")
			a.emit(Event{Kind: EventChunkBad, Release: j.km.ID, Index: i, Err: err})
			if j.bad[i] >= a.opts.FetchTries {
				a.failJob(protocol.CodeChunkCorrupt, fmt.Sprintf("chunk %d failed to open %d times", i, j.bad[i]))
				return
			}
			j.fetch(i, now)
			return
		}
		if _, err := j.inst.Write(pt); err != nil {
			a.failJob(protocol.CodeInstallFailed, fmt.Sprintf("writing chunk %d to the installer: %v", i, err))
			return
		}
		j.next++
		delete(j.tries, i)
		delete(j.bad, i)
		delete(j.subbed, i)
		a.c.chunksDone.Add(1)
		a.emit(Event{Kind: EventChunkDone, Release: j.km.ID, Index: i})
		j.deadline = now.Add(a.opts.ChunkTimeout)
		if j.next == j.m.ChunkCount {
			a.finish()
			return
		}
		j.fill(now)
		if f := a.opts.Faults.DropAfterChunk; f != nil && f(i) {
			a.dropConnection()
		}
		if a.crashAt(CrashDownloading, j.km.ID, i) {
			a.crash()
			return
		}
		if now.Sub(j.lastPr) >= a.opts.ProgressInterval {
			j.lastPr = now
			a.doc.ChunksDone = j.next
			a.publishState()
		}
	}
}

// finish checks the hashes, commits, persists and acks [SC-10.1 steps 4-6].
func (a *Agent) finish() {
	j := a.job
	if err := j.dec.Finish(); err != nil {
		a.failJob(protocol.CodeImageCorrupt, "every chunk opened but a manifest hash differs")
		return
	}
	a.doc.State, a.doc.ChunksDone = protocol.AgentInstalling, j.next
	a.publishState()
	if err := j.inst.Commit(); err != nil {
		a.failJob(protocol.CodeInstallFailed, err.Error())
		return
	}
	j.inst = nil
	a.job = nil
	if a.opts.Prefetch != nil {
		if err := a.opts.Prefetch.Drop(j.km.ID); err != nil {
			a.log.Warn().Err(err).Msg("dropping the prefetched chunks")
		}
	}
	ti, trial := a.opts.Installer.(TrialInstaller)
	if !trial {
		a.c.installs.Add(1)
		a.emit(Event{Kind: EventCommitted, Release: j.km.ID, Version: j.m.Version})
	}
	if a.opts.Faults.CrashAfterInstall || a.crashAt(CrashInstalled, j.km.ID, 0) {
		a.crash()
		return
	}
	if trial {
		a.beginTrial(ti, j.km, j.m.Version) // the image is staged, not running yet
		return
	}
	n := j.km.Seq
	ack := keychain.Ack{Kind: keychain.AckInstalled, Epoch: j.km.Epoch, Seq: n, ID: j.km.ID, Version: j.m.Version, DeviceSeq: n - 1}
	raw, err := ack.Seal(j.key, a.serial)
	if err != nil {
		a.fatal = fmt.Errorf("device: sealing the ack: %w", err)
		return
	}
	ns := a.st.Clone()
	ns.Seq, ns.Version = n-1, j.m.Version // [SC-10.1 step 5], atomically with the ack
	ns.LastAck, ns.LastAckConfirmed, ns.LastAckKey = raw, false, j.key
	if !a.persist(ns, &ack) {
		return
	}
	a.log.Info().Uint64("version", ns.Version).Uint32("seq", ns.Seq).Msg("installed")
	id := j.km.ID
	a.doc = protocol.DeviceState{State: protocol.AgentInstalled, Release: &id, ChunksDone: j.m.ChunkCount, ChunkCount: j.m.ChunkCount}
	a.newAck()
}

// onKeyStatement learns the next release key from its statement, signed by the current
// one, persists it, and follows the chain [SC-5.3]. A statement that does not verify is
// ignored: only the holder of the current key can make the next.
func (a *Agent) onKeyStatement(p []byte) {
	if len(p) == 0 {
		return
	}
	s, err := keychain.ParseKeyStatement(p, a.st.ReleasePublicKey)
	if err != nil || s.Seq != a.st.KeySeq+1 {
		a.log.Warn().Err(err).Int("bytes", len(p)).Msg("ignoring a key statement that the current release key did not sign")
		return
	}
	ns := a.st.Clone()
	ns.ReleasePublicKey, ns.KeySeq = s.Key, s.Seq
	if err := a.opts.Vault.Save(ns); err != nil {
		a.fatal = fmt.Errorf("device: cannot persist release key %d: %w", s.Seq, err)
		return
	}
	a.unsubscribe(protocol.KeyStatementTopic(s.Seq))
	a.st = ns
	a.log.Info().Uint32("key_seq", s.Seq).Msg("release key rotated")
	a.emit(Event{Kind: EventKeyRotated, Index: s.Seq})
	a.subscribe(protocol.KeyStatementTopic(s.Seq + 1))
	if j := a.job; j != nil && j.waiting != nil {
		p, j.waiting = j.waiting, nil
		a.onManifest(p)
	}
}
