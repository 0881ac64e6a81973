package updater

import (
	"bytes"
	"context"
	"math"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// ackBatch is the most acks one worker handles per store round trip.
const ackBatch = 256

// ackWorker drains the ack queue in batches until ctx is done.
func (u *Updater) ackWorker(ctx context.Context) {
	batch := make([]inbound, 0, ackBatch)
	for {
		select {
		case <-ctx.Done():
			return
		case in := <-u.acks:
			batch = append(batch[:0], in)
		}
	fill:
		for len(batch) < ackBatch {
			select {
			case in := <-u.acks:
				batch = append(batch, in)
			default:
				break fill
			}
		}
		u.processAcks(ctx, batch)
	}
}

// verdict is what one ack does.
type verdict struct {
	in      inbound
	ack     keychain.Ack
	dev     *Device
	key     keychain.ChainKey // K_seq of the ack
	advance *Advance          // set for an ack that moves the counter
	receipt []byte
	reoffer bool // a stale_key report about index C+1: publish the key message for C again
}

// processAcks applies [SC-10.2] to a batch: read the devices, verify, compare-and-set the
// counters of the valid acks in one store call, then publish receipts and what comes next.
func (u *Updater) processAcks(ctx context.Context, batch []inbound) {
	serials := make([]string, len(batch))
	for i, in := range batch {
		serials[i] = in.serial
	}
	devs, err := u.o.Store.Devices(ctx, serials)
	if err != nil {
		// The store is down: the acks are not lost, the devices re-send them.
		if ctx.Err() == nil {
			u.log.Error().Err(err).Int("acks", len(batch)).Msg("reading devices for acks; devices will re-send")
		}
		return
	}
	var (
		vs       []*verdict
		adv      []Advance
		msgs     []protocol.Message // receipts
		statuses []protocol.Message
		notes    []Note
		reports  = map[keychain.ReleaseID][]Result{}
		dups     []*verdict // duplicates of installed acks, answered once their result is recorded
		reoffer  []*Device  // devices sent an outdated key message: send the current one again
	)
	now := u.o.Now()
	for i, in := range batch {
		v := u.judge(in, devs[i], now)
		if v == nil {
			continue
		}
		switch {
		case v.reoffer:
			reoffer = append(reoffer, v.dev)
		case v.advance != nil:
			vs = append(vs, v)
			adv = append(adv, *v.advance)
		case v.ack.Kind == keychain.AckFailed:
			if id, r, ok := u.report(v); ok {
				reports[id] = append(reports[id], r)
			}
			statuses = append(statuses, deviceStatusMessage(v.dev, protocol.DeviceFailed, protocol.Code(v.ack.Code).String(), now))
			msgs = append(msgs, protocol.Message{Topic: protocol.ReceiptTopic(in.serial), Payload: v.receipt, Retain: true})
			notes = append(notes, Note{Serial: in.serial, State: protocol.DeviceFailed, LastResult: protocol.Code(v.ack.Code).String(), At: now})
		case v.ack.Kind == keychain.AckInstalled && u.isRelease(v.ack.ID):
			dups = append(dups, v)
		default: // a duplicate: answer again
			msgs = append(msgs, protocol.Message{Topic: protocol.ReceiptTopic(in.serial), Payload: v.receipt, Retain: true})
		}
	}
	u.recordResults(ctx, reports, "recording failures")
	if len(reoffer) > 0 {
		if err := u.nextForAll(ctx, reoffer); err != nil && ctx.Err() == nil {
			u.log.Error().Err(err).Int("devices", len(reoffer)).Msg("publishing current key messages again")
		}
	}
	// A duplicate of an installed ack records its result again (installed is final, so
	// this counts nothing twice): the process that accepted it may have died, or lost the
	// store, between moving the counter and recording the result. Its receipt goes out
	// only once the result is recorded, so the device keeps re-sending until it is.
	msgs = append(msgs, u.recordInstalled(ctx, dups)...)
	if len(adv) > 0 {
		ok, err := u.o.Store.Advance(ctx, adv)
		if err != nil {
			u.log.Error().Err(err).Int("acks", len(adv)).Msg("advancing counters; devices will re-send")
			return
		}
		var installed, moved []*verdict
		for i, v := range vs {
			if !ok[i] {
				// Another worker or updater moved this device first: this was a
				// duplicate. Its receipt is the one already published.
				u.stats.dup.Add(1)
				continue
			}
			if v.ack.Kind == keychain.AckFailed {
				u.stats.resyncs.Add(1)
			} else {
				u.stats.accepted.Add(1)
			}
			if v.ack.Kind == keychain.AckInstalled {
				installed = append(installed, v)
			} else {
				msgs = append(msgs, protocol.Message{Topic: protocol.ReceiptTopic(v.in.serial), Payload: v.receipt, Retain: true})
			}
			d := *v.dev
			a := v.advance
			d.Epoch, d.Seq, d.ChainLength, d.Chain, d.Version, d.Assigned = a.To.Epoch, a.To.Seq, a.ChainLength, a.Chain, a.Version, nil
			v.dev = &d
			moved = append(moved, v)
		}
		msgs = append(msgs, u.recordInstalled(ctx, installed)...)
		u.publishReceipts(ctx, msgs)
		msgs = nil
		// What each moved device sees next, and its status: one store call, one publish.
		next := make([]*Device, len(moved))
		for i, v := range moved {
			next[i] = v.dev
			statuses = append(statuses, deviceStatusMessage(v.dev, v.advance.State, v.advance.LastResult, now))
		}
		if err := u.nextForAll(ctx, next, statuses...); err != nil && ctx.Err() == nil {
			u.log.Error().Err(err).Int("devices", len(next)).Msg("publishing the next keys")
		}
		statuses = nil
	}
	u.publishReceipts(ctx, msgs)
	if len(statuses) > 0 {
		if err := u.o.Bus.Publish(ctx, statuses...); err != nil && ctx.Err() == nil {
			u.log.Warn().Err(err).Msg("publishing device statuses")
		}
	}
	if len(notes) > 0 {
		if err := u.o.Store.Note(ctx, notes); err != nil {
			u.log.Warn().Err(err).Msg("noting device reports")
		}
	}
}

// recordInstalled records the installed result of each ack and returns the receipts of
// those recorded: a receipt before the result would stop the device from re-sending an
// ack whose result could then be lost.
func (u *Updater) recordInstalled(ctx context.Context, vs []*verdict) []protocol.Message {
	byRelease := map[keychain.ReleaseID][]*verdict{}
	for _, v := range vs {
		byRelease[v.ack.ID] = append(byRelease[v.ack.ID], v)
	}
	var msgs []protocol.Message
	for id, group := range byRelease {
		rs := make([]Result, len(group))
		for i, v := range group {
			rs[i] = Result{Serial: v.in.serial, Result: ResultInstalled}
		}
		if err := u.o.Store.RecordResults(ctx, id, rs); err != nil {
			if ctx.Err() == nil {
				u.log.Error().Err(err).Str("release", id.String()).Int("devices", len(rs)).Msg("recording results; receipts withheld, devices will re-send")
			}
			continue
		}
		u.markDirty(id)
		for _, v := range group {
			msgs = append(msgs, protocol.Message{Topic: protocol.ReceiptTopic(v.in.serial), Payload: v.receipt, Retain: true})
		}
	}
	return msgs
}

// judge decides what an ack does, without side effects. It returns nil for an ack that
// is rejected (and counts why).
func (u *Updater) judge(in inbound, d *Device, now time.Time) *verdict {
	a, err := keychain.ParseAck(in.payload)
	if err != nil {
		u.reject(in.serial, "malformed", err)
		return nil
	}
	if d == nil {
		u.reject(in.serial, "unknown_device", nil)
		return nil
	}
	v := &verdict{in: in, ack: a, dev: d}
	// A repeat of the last accepted ack: answer with the same receipt ([SC-10.2] 3).
	if d.LastAck != nil && bytes.Equal(in.payload, d.LastAck) {
		u.stats.dup.Add(1)
		v.receipt = d.LastReceipt
		return v
	}
	// A stale_key report about the index just above the counter, from a device at the
	// counter: a key message for the index the device has just used reached it after
	// the one for its current index (a fan-out that raced with its ack, and published
	// last). [SC-10.2] 4: publish what is due at C again.
	staleAbove := a.Kind == keychain.AckFailed && protocol.Code(a.Code) == protocol.CodeStaleKey &&
		a.Epoch == d.Epoch && d.Seq < math.MaxUint32 && a.Seq == d.Seq+1 && a.DeviceSeq == d.Seq
	if (a.Epoch != d.Epoch || a.Seq != d.Seq) && !staleAbove {
		// Replays of older acks, acks from a previous epoch, or invented positions.
		u.reject(in.serial, "stale", nil)
		return nil
	}
	tr, err := u.sealer.Open(d.Serial, d.Epoch, d.Chain)
	if err != nil || tr.Pos() != d.Seq {
		u.log.Error().Err(err).Str("serial", d.Serial).Msg("device chain state unreadable")
		u.reject(in.serial, "internal", nil)
		return nil
	}
	v.key = tr.Current()
	// Counted once the verdict is known: every path below ends with the traversal.
	defer func() { u.stats.chainSteps.Add(int64(tr.Steps())) }()
	if staleAbove {
		if keychain.VerifyAck(in.payload, keychain.Step(v.key), d.Serial) != nil { // K_{C+1}
			u.reject(in.serial, "forged", nil)
			return nil
		}
		u.stats.reoffers.Add(1)
		v.reoffer = true
		return v
	}
	if keychain.VerifyAck(in.payload, v.key, d.Serial) != nil {
		u.reject(in.serial, "forged", nil)
		return nil
	}
	if a.Kind == keychain.AckFailed {
		rc, _ := keychain.ReceiptFor(a, keychain.ReceiptRecorded).Seal(v.key, d.Serial)
		v.receipt = rc
		if protocol.Code(a.Code) == protocol.CodeStaleKey && a.DeviceSeq >= 1 && a.DeviceSeq < d.Seq {
			// The device is ahead of us: our store lost writes, or the device's vault was
			// restored. Its MAC proves it holds the chain; moving down reuses nothing.
			// [SC-10.2] 4
			for tr.Pos() > a.DeviceSeq {
				if err := tr.Advance(); err != nil {
					u.reject(in.serial, "internal", err)
					return nil
				}
			}
			sealed, err := u.sealer.Seal(d.Serial, d.Epoch, tr)
			if err != nil {
				u.reject(in.serial, "internal", err)
				return nil
			}
			v.advance = &Advance{
				Serial: d.Serial, From: d.Pos(), To: Position{d.Epoch, a.DeviceSeq}, ChainLength: d.ChainLength,
				Chain: sealed, Version: max(d.Version, a.Version), LastAck: d.LastAck, LastReceipt: d.LastReceipt,
				State: protocol.DeviceIdle, LastResult: protocol.CodeStaleKey.String(), At: now,
			}
			u.log.Warn().Str("serial", d.Serial).Uint32("from", d.Seq).Uint32("to", a.DeviceSeq).Msg("device is ahead of the store; moving its counter down to meet it")
		}
		return v
	}
	if !assigned(d, a.ID) {
		u.reject(in.serial, "unassigned", nil)
		return nil
	}
	rc, _ := keychain.ReceiptFor(a, keychain.ReceiptAccepted).Seal(v.key, d.Serial)
	v.receipt = rc
	adv := &Advance{
		Serial: d.Serial, From: d.Pos(), ChainLength: d.ChainLength, Version: d.Version,
		LastAck: in.payload, LastReceipt: rc, At: now, LastResult: "ok",
	}
	switch a.Kind {
	case keychain.AckInstalled:
		if a.ID == u.rekeyID(d.Serial, d.Epoch) || d.Seq < 2 {
			u.reject(in.serial, "unassigned", nil)
			return nil
		}
		if err := tr.Advance(); err != nil {
			u.reject(in.serial, "internal", err)
			return nil
		}
		adv.To = Position{d.Epoch, d.Seq - 1}
		adv.Version = max(d.Version, a.Version)
		adv.State = protocol.DeviceInstalled
	case keychain.AckRekeyed:
		if a.ID != u.rekeyID(d.Serial, d.Epoch) || d.Seq != 1 || !keychain.ValidChainLength(a.DeviceSeq) {
			u.reject(in.serial, "unassigned", nil)
			return nil
		}
		next, err := keychain.DeriveUnitData(u.o.Root, d.Serial, d.Epoch+1)
		if err == nil {
			tr, err = keychain.NewTraversal(next, a.DeviceSeq)
		}
		if err != nil {
			u.reject(in.serial, "internal", err)
			return nil
		}
		adv.To = Position{d.Epoch + 1, a.DeviceSeq}
		adv.ChainLength = a.DeviceSeq
		adv.State = protocol.DeviceIdle
	}
	sealed, err := u.sealer.Seal(d.Serial, adv.To.Epoch, tr)
	if err != nil {
		u.reject(in.serial, "internal", err)
		return nil
	}
	adv.Chain = sealed
	v.advance = adv
	return v
}

func assigned(d *Device, id keychain.ReleaseID) bool {
	for _, x := range d.Assigned {
		if x == id {
			return true
		}
	}
	return false
}

func (u *Updater) reject(serial, reason string, err error) {
	u.stats.reject(reason)
	ev := u.log.Warn()
	if err != nil {
		ev = ev.Err(err)
	}
	ev.Str("serial", serial).Str("reason", reason).Msg("ack rejected; nothing changed")
}

// report logs a device's failure report and returns the result to record against its
// release, if the release is one of ours ([SC-10.2] 4).
func (u *Updater) report(v *verdict) (keychain.ReleaseID, Result, bool) {
	u.stats.reports.Add(1)
	code := protocol.Code(v.ack.Code)
	u.log.Info().Str("serial", v.in.serial).Str("code", code.String()).Str("release", v.ack.ID.String()).Msg("device reported a failure")
	if !u.isRelease(v.ack.ID) {
		return keychain.ReleaseID{}, Result{}, false
	}
	return v.ack.ID, Result{Serial: v.in.serial, Result: ResultFailed + ":" + code.String()}, true
}

// recordResults stores results, one store call per release, and marks the releases for
// a status update.
func (u *Updater) recordResults(ctx context.Context, results map[keychain.ReleaseID][]Result, what string) {
	for id, rs := range results {
		if err := u.o.Store.RecordResults(ctx, id, rs); err != nil {
			u.log.Error().Err(err).Str("release", id.String()).Msg(what)
		}
		u.markDirty(id)
	}
}

// publishReceipts publishes receipts and counts those the broker acknowledged.
func (u *Updater) publishReceipts(ctx context.Context, msgs []protocol.Message) {
	if len(msgs) == 0 {
		return
	}
	if err := u.o.Bus.Publish(ctx, msgs...); err != nil {
		if ctx.Err() == nil {
			u.log.Error().Err(err).Msg("publishing receipts; devices will re-send their acks")
		}
		return
	}
	u.stats.receipts.Add(int64(len(msgs)))
}

func (u *Updater) isRelease(id keychain.ReleaseID) bool {
	u.mu.Lock()
	_, ok := u.runs[id]
	u.mu.Unlock()
	return ok
}

func (u *Updater) markDirty(id keychain.ReleaseID) {
	u.mu.Lock()
	u.dirty[id] = true
	u.mu.Unlock()
}
