package updater

import (
	"bytes"
	"math"
	"slices"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// Reasons an ack is rejected (Stats.AcksRejected).
const (
	rejectMalformed  = "malformed"
	rejectUnknown    = "unknown_device"
	rejectForged     = "forged"     // bad MAC
	rejectStale      = "stale"      // not at the device's position
	rejectUnassigned = "unassigned" // an id never wrapped at that position
	rejectInternal   = "internal"   // the server's own state failed
)

// verdict is what judge decides one ack does. Exactly one of reject, dup, reoffer or
// advance says what; an accepted report of failure sets none of them.
type verdict struct {
	in      inbound
	ack     keychain.Ack
	dev     *Device
	reject  string // why the ack changes nothing; err may say more
	err     error
	dup     bool     // a repeat of the last accepted ack: answer with its receipt
	reoffer bool     // a stale_key report about index C+1: publish the key message for C again
	advance *Advance // set for an ack that moves the counter
	claims  int      // fields of the ack that differ from what the server knows (device_seq)
	receipt []byte
	steps   int // hash-chain steps spent
}

// moved is the device as it is once v's advance is applied.
func (v *verdict) moved() *Device {
	d := *v.dev
	a := v.advance
	d.Epoch, d.Seq, d.ChainLength, d.Chain, d.Version, d.Assigned = a.To.Epoch, a.To.Seq, a.ChainLength, a.Chain, a.Version, nil
	return &d
}

// judge decides what an ack from device d (nil if unknown) does ([SC-10.2]). It has no
// side effects: the caller counts, logs and applies the verdict. An advance keeps the
// device's recorded version: the version a device claims is never believed, and the
// caller sets the version the server knows ([SC-10.2] 2 and 4, versionsFor).
func judge(k *keys, in inbound, d *Device, now time.Time) verdict {
	a, err := keychain.ParseAck(in.payload)
	v := verdict{in: in, ack: a, dev: d}
	switch {
	case err != nil:
		return v.rejected(rejectMalformed, err)
	case d == nil:
		return v.rejected(rejectUnknown, nil)
	case d.LastAck != nil && bytes.Equal(in.payload, d.LastAck):
		// A repeat of the last accepted ack: answer with the same receipt ([SC-10.2] 3).
		v.dup, v.receipt = true, d.LastReceipt
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
		return v.rejected(rejectStale, nil)
	}
	tr, err := k.sealer.Open(d.Serial, d.Epoch, d.Chain)
	if err != nil || tr.Pos() != d.Seq {
		return v.rejected(rejectInternal, err)
	}
	key := tr.Current()
	switch {
	case staleAbove:
		if keychain.VerifyAck(in.payload, keychain.Step(key), d.Serial) != nil { // K_{C+1}
			v.reject = rejectForged
		} else {
			v.reoffer = true
		}
	case keychain.VerifyAck(in.payload, key, d.Serial) != nil:
		v.reject = rejectForged
	case a.Kind == keychain.AckFailed:
		v.judgeReport(k, tr, key, now)
	default:
		v.judgeConfirm(k, tr, key, now)
	}
	v.steps += tr.Steps()
	return v
}

func (v verdict) rejected(reason string, err error) verdict {
	v.reject, v.err = reason, err
	return v
}

// judgeReport decides a verified report of failure: it is recorded and answered, and a
// stale_key report from a device below the counter moves the counter down to it.
func (v *verdict) judgeReport(k *keys, tr *keychain.Traversal, key keychain.ChainKey, now time.Time) {
	a, d := v.ack, v.dev
	v.receipt, _ = keychain.ReceiptFor(a, keychain.ReceiptRecorded).Seal(key, d.Serial)
	if protocol.Code(a.Code) != protocol.CodeStaleKey || a.DeviceSeq < 1 || a.DeviceSeq >= d.Seq {
		return
	}
	// The device is ahead of us: our store lost writes, or the device's vault was
	// restored. Its MAC proves it holds the chain; moving down reuses nothing.
	// [SC-10.2] 4
	for tr.Pos() > a.DeviceSeq {
		if err := tr.Advance(); err != nil {
			*v = v.rejected(rejectInternal, err)
			return
		}
	}
	sealed, err := k.sealer.Seal(d.Serial, d.Epoch, tr)
	if err != nil {
		*v = v.rejected(rejectInternal, err)
		return
	}
	v.advance = &Advance{
		Serial: d.Serial, From: d.Pos(), To: Position{d.Epoch, a.DeviceSeq}, ChainLength: d.ChainLength,
		Chain: sealed, Version: d.Version, LastAck: d.LastAck, LastReceipt: d.LastReceipt,
		State: protocol.DeviceIdle, LastResult: protocol.CodeStaleKey.String(), At: now,
	}
}

// judgeConfirm decides a verified installed or rekeyed ack: if it confirms what was
// assigned at the device's position, the counter moves to the next key.
func (v *verdict) judgeConfirm(k *keys, tr *keychain.Traversal, key keychain.ChainKey, now time.Time) {
	a, d := v.ack, v.dev
	if !assigned(d, a.ID) {
		*v = v.rejected(rejectUnassigned, nil)
		return
	}
	rekey := k.rekeyID(d.Serial, d.Epoch)
	adv := &Advance{Serial: d.Serial, From: d.Pos(), ChainLength: d.ChainLength, Version: d.Version, LastAck: v.in.payload, At: now, LastResult: "ok"}
	var err error
	switch a.Kind {
	case keychain.AckInstalled:
		if a.ID == rekey || d.Seq < 2 {
			*v = v.rejected(rejectUnassigned, nil)
			return
		}
		err = tr.Advance()
		adv.To, adv.State = Position{d.Epoch, d.Seq - 1}, protocol.DeviceInstalled
		if a.DeviceSeq != d.Seq-1 {
			v.claims++
		}
	case keychain.AckRekeyed:
		if a.ID != rekey || d.Seq != 1 {
			*v = v.rejected(rejectUnassigned, nil)
			return
		}
		// L' is the device's chain length, which the re-key message carried ([SC-10.3]).
		length := rekeyLength(d, k)
		if a.DeviceSeq != length {
			v.claims++
		}
		var next keychain.UnitData
		if next, err = keychain.DeriveUnitData(k.root, d.Serial, d.Epoch+1); err == nil {
			v.steps += tr.Steps() // tr is replaced by the next chain's
			tr, err = keychain.NewTraversal(next, length)
		}
		adv.To, adv.ChainLength, adv.State = Position{d.Epoch + 1, length}, length, protocol.DeviceIdle
	}
	if err == nil {
		adv.Chain, err = k.sealer.Seal(d.Serial, adv.To.Epoch, tr)
	}
	if err != nil {
		*v = v.rejected(rejectInternal, err)
		return
	}
	v.receipt, _ = keychain.ReceiptFor(a, keychain.ReceiptAccepted).Seal(key, d.Serial)
	adv.LastReceipt = v.receipt
	v.advance = adv
}

func assigned(d *Device, id keychain.ReleaseID) bool { return slices.Contains(d.Assigned, id) }

// rekeyLength is L', the length of a device's next chain: its current length, so that a
// re-key changes no chain length ([SC-10.3]); the server's default for a record without
// a valid one.
func rekeyLength(d *Device, k *keys) uint32 {
	if keychain.ValidChainLength(d.ChainLength) {
		return d.ChainLength
	}
	return k.chainLength
}
