package updater

import (
	"context"
	"time"

	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// ackBatch is the most acks one worker handles per store round trip.
const ackBatch = 256

type inbound struct {
	serial  string
	payload []byte
	at      time.Time // when it arrived
}

// ackEngine applies [SC-10.2] to the acks devices send: it decodes and verifies them
// (judge, which decides without side effects), moves counters by compare-and-set, records
// results, and publishes receipts, device statuses and what each moved device sees next.
// It owns the ack queue and its workers.
type ackEngine struct {
	store  Store
	bus    Bus
	keys   *keys
	runs   *registry
	place  *placer
	status *statusPublisher
	stats  *counters
	log    zerolog.Logger
	now    func() time.Time
	obs    Observer // nil: none

	queue chan inbound
}

// onAck queues an ack for the workers. When the queue is full it waits, which holds up
// the bus (in-process, the device that sent the ack; over MQTT, the bus's connection):
// back-pressure, not loss. Only an ack that arrives once ctx has ended is dropped, and
// counted; the device re-sends it until it sees a receipt ([SC-10.1] step 6).
func (e *ackEngine) onAck(ctx context.Context, topic string, payload []byte) {
	serial, leaf, ok := protocol.DeviceOf(topic)
	if !ok || leaf != "ack" {
		return
	}
	select {
	case e.queue <- inbound{serial: serial, payload: append([]byte(nil), payload...), at: time.Now()}:
	case <-ctx.Done():
		e.stats.acksShed.Add(1)
	}
}

// worker drains the ack queue in batches until ctx is done.
func (e *ackEngine) worker(ctx context.Context) {
	batch := make([]inbound, 0, ackBatch)
	for {
		select {
		case <-ctx.Done():
			return
		case in := <-e.queue:
			batch = append(batch[:0], in)
		}
	fill:
		for len(batch) < ackBatch {
			select {
			case in := <-e.queue:
				batch = append(batch, in)
			default:
				break fill
			}
		}
		e.process(ctx, batch)
		if e.obs != nil {
			for _, in := range batch {
				e.obs.AckHandled(time.Since(in.at))
			}
		}
	}
}

// triage is a batch of verdicts sorted by what they need done.
type triage struct {
	advances []*verdict         // acks that move a counter
	receipts []protocol.Message // answers that can go out now
	statuses []protocol.Message
	notes    []Note
	reports  map[keychain.ReleaseID][]Result
	dups     []*verdict // duplicates of installed acks, answered once their result is recorded
	reoffer  []*Device  // devices sent an outdated key message: send the current one again
}

// process applies [SC-10.2] to a batch: read the devices, verify, compare-and-set the
// counters of the valid acks in one store call, then publish receipts and what comes next.
func (e *ackEngine) process(ctx context.Context, batch []inbound) {
	serials := make([]string, len(batch))
	for i, in := range batch {
		serials[i] = in.serial
	}
	devs, err := e.store.Devices(ctx, serials)
	if err != nil {
		// The store is down: the acks are not lost, the devices re-send them.
		if ctx.Err() == nil {
			e.log.Error().Err(err).Int("acks", len(batch)).Msg("reading devices for acks; devices will re-send")
		}
		return
	}
	now := e.now()
	t := triage{reports: map[keychain.ReleaseID][]Result{}}
	for i, in := range batch {
		v := judge(e.keys, in, devs[i], now)
		e.account(&v)
		if v.reject == "" {
			e.sort(&t, &v, now)
		}
	}
	e.recordResults(ctx, t.reports)
	if len(t.reoffer) > 0 {
		if err := e.place.nextForAll(ctx, t.reoffer); err != nil && ctx.Err() == nil {
			e.log.Error().Err(err).Int("devices", len(t.reoffer)).Msg("publishing current key messages again")
		}
	}
	// A duplicate of an installed ack records its result again (installed is final, so
	// this counts nothing twice): the process that accepted it may have died, or lost the
	// store, between moving the counter and recording the result. Its receipt goes out
	// only once the result is recorded, so the device keeps re-sending until it is.
	t.receipts = append(t.receipts, e.recordInstalled(ctx, t.dups, now)...)
	if len(t.advances) > 0 && !e.advance(ctx, &t, now) {
		return
	}
	e.publishReceipts(ctx, t.receipts)
	if len(t.statuses) > 0 {
		if err := e.bus.Publish(ctx, t.statuses...); err != nil && ctx.Err() == nil {
			e.log.Warn().Err(err).Msg("publishing device statuses")
		}
	}
	if len(t.notes) > 0 {
		if err := e.store.Note(ctx, t.notes); err != nil {
			e.log.Warn().Err(err).Msg("noting device reports")
		}
	}
}

// account counts and logs what judge decided.
func (e *ackEngine) account(v *verdict) {
	e.stats.chainSteps.Add(int64(v.steps))
	e.stats.claims.Add(int64(v.claims))
	switch {
	case v.reject != "":
		e.stats.reject(v.reject)
		ev := e.log.Warn()
		if v.reject == rejectInternal {
			ev = e.log.Error()
		}
		if v.err != nil {
			ev = ev.Err(v.err)
		}
		ev.Str("serial", v.in.serial).Str("reason", v.reject).Msg("ack rejected; nothing changed")
	case v.dup:
		e.stats.dup.Add(1)
	case v.reoffer:
		e.stats.reoffers.Add(1)
	case v.advance != nil && v.ack.Kind == keychain.AckFailed:
		e.log.Warn().Str("serial", v.dev.Serial).Uint32("from", v.dev.Seq).Uint32("to", v.advance.To.Seq).Msg("device is ahead of the store; moving its counter down to meet it")
	}
}

// sort files an accepted verdict under what it needs done.
func (e *ackEngine) sort(t *triage, v *verdict, now time.Time) {
	switch {
	case v.reoffer:
		t.reoffer = append(t.reoffer, v.dev)
	case v.advance != nil:
		t.advances = append(t.advances, v)
	case v.ack.Kind == keychain.AckFailed:
		code := protocol.Code(v.ack.Code)
		e.stats.reports.Add(1)
		e.log.Info().Str("serial", v.in.serial).Str("code", code.String()).Str("release", v.ack.ID.String()).Msg("device reported a failure")
		if e.runs.has(v.ack.ID) { // ([SC-10.2] 4) a report about a release of ours
			t.reports[v.ack.ID] = append(t.reports[v.ack.ID], Result{Serial: v.in.serial, Result: ResultFailed + ":" + code.String()})
		}
		t.statuses = append(t.statuses, deviceStatusMessage(v.dev, protocol.DeviceFailed, code.String(), now))
		t.receipts = append(t.receipts, receiptMessage(v))
		t.notes = append(t.notes, Note{Serial: v.in.serial, State: protocol.DeviceFailed, LastResult: code.String(), At: now})
	case v.ack.Kind == keychain.AckInstalled && e.runs.has(v.ack.ID):
		t.dups = append(t.dups, v)
	default: // a duplicate: answer again
		t.receipts = append(t.receipts, receiptMessage(v))
	}
}

// advance moves the counters of t.advances in one store call; then it publishes the
// receipts due so far, and each moved device's status and what it sees next. It returns
// false if the store failed (the devices re-send).
func (e *ackEngine) advance(ctx context.Context, t *triage, now time.Time) bool {
	mismatches, err := versionsFor(ctx, newVersionBook(e.store, e.runs), t.advances)
	if err != nil {
		e.log.Error().Err(err).Int("acks", len(t.advances)).Msg("devices will re-send")
		return false
	}
	e.stats.claims.Add(int64(mismatches))
	adv := make([]Advance, len(t.advances))
	for i, v := range t.advances {
		adv[i] = *v.advance
	}
	ok, err := e.store.Advance(ctx, adv)
	if err != nil {
		e.log.Error().Err(err).Int("acks", len(adv)).Msg("advancing counters; devices will re-send")
		return false
	}
	var installed []*verdict
	var next []*Device
	for i, v := range t.advances {
		if !ok[i] {
			// Another worker or updater moved this device first: this was a
			// duplicate. Its receipt is the one already published.
			e.stats.dup.Add(1)
			continue
		}
		switch v.ack.Kind {
		case keychain.AckFailed:
			e.stats.resyncs.Add(1)
		default:
			e.stats.accepted.Add(1)
		}
		if v.ack.Kind == keychain.AckInstalled {
			installed = append(installed, v)
			e.observeInstall(v, now)
		} else {
			t.receipts = append(t.receipts, receiptMessage(v))
		}
		d := v.moved()
		next = append(next, d)
		t.statuses = append(t.statuses, deviceStatusMessage(d, v.advance.State, v.advance.LastResult, now))
	}
	t.receipts = append(t.receipts, e.recordInstalled(ctx, installed, now)...)
	e.publishReceipts(ctx, t.receipts)
	t.receipts = nil
	// What each moved device sees next, and its status: one store call, one publish.
	if err := e.place.nextForAll(ctx, next, t.statuses...); err != nil && ctx.Err() == nil {
		e.log.Error().Err(err).Int("devices", len(next)).Msg("publishing the next keys")
	}
	t.statuses = nil
	return true
}

// observeInstall tells the observer how long after its wave opened (its release's
// creation, without waves) the device's install was accepted.
func (e *ackEngine) observeInstall(v *verdict, now time.Time) {
	if e.obs == nil {
		return
	}
	r := e.runs.get(v.ack.ID)
	if r == nil {
		return
	}
	rel := r.release()
	opened := rel.Created
	if r.sizes != nil {
		if rank, ok := r.rankOf(v.in.serial); ok {
			if w := r.waveOf(rank); w < len(rel.WaveLog) && !rel.WaveLog[w].Opened.IsZero() {
				opened = rel.WaveLog[w].Opened
			}
		}
	}
	if d := now.Sub(opened); d >= 0 {
		e.obs.Installed(d)
	}
}

func receiptMessage(v *verdict) protocol.Message {
	return protocol.Message{Topic: protocol.ReceiptTopic(v.in.serial), Payload: v.receipt, Retain: true}
}

// recordInstalled records the installed result of each ack, accepted at now, and returns
// the receipts of those recorded: a receipt before the result would stop the device from
// re-sending an ack whose result could then be lost.
func (e *ackEngine) recordInstalled(ctx context.Context, vs []*verdict, now time.Time) []protocol.Message {
	byRelease := map[keychain.ReleaseID][]*verdict{}
	for _, v := range vs {
		byRelease[v.ack.ID] = append(byRelease[v.ack.ID], v)
	}
	var msgs []protocol.Message
	for id, group := range byRelease {
		took := time.Duration(-1) // not known: the release is not held here
		if r := e.runs.get(id); r != nil {
			took = max(0, now.Sub(ReleaseStart(r.release())))
		}
		rs := make([]Result, len(group))
		for i, v := range group {
			rs[i] = Result{Serial: v.in.serial, Result: ResultInstalled, Took: took}
		}
		if err := e.store.RecordResults(ctx, id, rs); err != nil {
			if ctx.Err() == nil {
				e.log.Error().Err(err).Str("release", id.String()).Int("devices", len(rs)).Msg("recording results; receipts withheld, devices will re-send")
			}
			continue
		}
		e.status.releaseChanged(id)
		for _, v := range group {
			msgs = append(msgs, receiptMessage(v))
		}
	}
	return msgs
}

// recordResults stores failure results, one store call per release, and marks the
// releases for a status update.
func (e *ackEngine) recordResults(ctx context.Context, results map[keychain.ReleaseID][]Result) {
	for id, rs := range results {
		if err := e.store.RecordResults(ctx, id, rs); err != nil {
			e.log.Error().Err(err).Str("release", id.String()).Msg("recording failures")
		}
		e.status.releaseChanged(id)
	}
}

// publishReceipts publishes receipts and counts those the broker acknowledged.
func (e *ackEngine) publishReceipts(ctx context.Context, msgs []protocol.Message) {
	if len(msgs) == 0 {
		return
	}
	if err := e.bus.Publish(ctx, msgs...); err != nil {
		if ctx.Err() == nil {
			e.log.Error().Err(err).Msg("publishing receipts; devices will re-send their acks")
		}
		return
	}
	e.stats.receipts.Add(int64(len(msgs)))
}
