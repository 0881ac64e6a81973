package keychain

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
)

// AckKind says what an ack or report confirms.
type AckKind byte

const (
	// AckInstalled confirms a release was installed: the device moved to Seq-1.
	AckInstalled AckKind = 0x01
	// AckRekeyed confirms a re-key: the device moved to the next epoch.
	AckRekeyed AckKind = 0x02
	// AckFailed reports a failure; the device's sequence number did not move.
	AckFailed AckKind = 0x03
)

func (k AckKind) String() string {
	switch k {
	case AckInstalled:
		return "installed"
	case AckRekeyed:
		return "rekeyed"
	case AckFailed:
		return "failed"
	}
	return fmt.Sprintf("AckKind(%d)", byte(k))
}

// Sizes of acks and receipts (PROTOCOL.md 7, 8).
const (
	AckSize     = 75
	ReceiptSize = 62
)

// Ack is a device's ack (AckInstalled, AckRekeyed) or report (AckFailed) about the key
// message at (Epoch, Seq, ID), authenticated with the ack key of K_Seq (PROTOCOL.md 7).
type Ack struct {
	Kind      AckKind
	Epoch     uint32
	Seq       uint32
	ID        ReleaseID
	Version   uint64
	DeviceSeq uint32
	Code      uint16
}

func (a *Ack) check() error {
	switch a.Kind {
	case AckInstalled, AckRekeyed:
		if a.Code != 0 {
			return fmt.Errorf("%w: %s ack with error code %d", ErrMalformed, a.Kind, a.Code)
		}
	case AckFailed:
		if a.Code == 0 {
			return fmt.Errorf("%w: failure report without an error code", ErrMalformed)
		}
	default:
		return fmt.Errorf("%w: unknown ack kind %d", ErrMalformed, byte(a.Kind))
	}
	if a.Seq == 0 {
		return fmt.Errorf("%w: ack for index 0", ErrMalformed)
	}
	return nil
}

func macOf(key [Size]byte, body []byte, serial string) [Size]byte {
	m := hmac.New(sha256.New, key[:])
	m.Write(body)
	m.Write([]byte(serial))
	var out [Size]byte
	m.Sum(out[:0])
	return out
}

// Seal encodes the ack and appends its MAC under the ack key of k for serial.
func (a Ack) Seal(k ChainKey, serial string) ([]byte, error) {
	if err := CheckSerial(serial); err != nil {
		return nil, err
	}
	if err := a.check(); err != nil {
		return nil, err
	}
	b := make([]byte, 0, AckSize)
	b = append(b, MagicAck...)
	b = append(b, byte(a.Kind))
	b = binary.BigEndian.AppendUint32(b, a.Epoch)
	b = binary.BigEndian.AppendUint32(b, a.Seq)
	b = append(b, a.ID[:]...)
	b = binary.BigEndian.AppendUint64(b, a.Version)
	b = binary.BigEndian.AppendUint32(b, a.DeviceSeq)
	b = binary.BigEndian.AppendUint16(b, a.Code)
	mac := macOf(k.AckKey(), b, serial)
	return append(b, mac[:]...), nil
}

// ParseAck decodes an ack without checking its MAC ([SC-7.1]): the server reads Epoch and
// Seq to find the key, then calls VerifyAck.
func ParseAck(b []byte) (Ack, error) {
	var a Ack
	if len(b) != AckSize || string(b[:4]) != MagicAck {
		return a, fmt.Errorf("%w: ack must be %d bytes starting %q", ErrMalformed, AckSize, MagicAck)
	}
	a.Kind = AckKind(b[4])
	a.Epoch = binary.BigEndian.Uint32(b[5:])
	a.Seq = binary.BigEndian.Uint32(b[9:])
	copy(a.ID[:], b[13:29])
	a.Version = binary.BigEndian.Uint64(b[29:])
	a.DeviceSeq = binary.BigEndian.Uint32(b[37:])
	a.Code = binary.BigEndian.Uint16(b[41:])
	return a, a.check()
}

// VerifyAck checks the MAC of an encoded ack under the ack key of k for serial, in
// constant time. A mismatch is ErrAuth.
func VerifyAck(b []byte, k ChainKey, serial string) error {
	if len(b) != AckSize {
		return fmt.Errorf("%w: ack must be %d bytes", ErrMalformed, AckSize)
	}
	want := macOf(k.AckKey(), b[:AckSize-Size], serial)
	if !hmac.Equal(want[:], b[AckSize-Size:]) {
		return ErrAuth
	}
	return nil
}

// ReceiptStatus is the server's verdict on an ack or report.
type ReceiptStatus byte

const (
	// ReceiptAccepted: the server's counter has moved for this ack.
	ReceiptAccepted ReceiptStatus = 0x00
	// ReceiptRecorded: the report was stored; the counter did not move.
	ReceiptRecorded ReceiptStatus = 0x01
)

// Receipt is the server's authenticated answer to an ack or report (PROTOCOL.md 8).
type Receipt struct {
	Kind   AckKind
	Epoch  uint32
	Seq    uint32
	ID     ReleaseID
	Status ReceiptStatus
}

// ReceiptFor returns the receipt that answers a.
func ReceiptFor(a Ack, status ReceiptStatus) Receipt {
	return Receipt{Kind: a.Kind, Epoch: a.Epoch, Seq: a.Seq, ID: a.ID, Status: status}
}

// Answers reports whether r is the receipt for a (same kind, epoch, seq and id).
func (r Receipt) Answers(a Ack) bool {
	return r.Kind == a.Kind && r.Epoch == a.Epoch && r.Seq == a.Seq && r.ID == a.ID
}

// Seal encodes the receipt and appends its MAC under the receipt key of k for serial.
func (r Receipt) Seal(k ChainKey, serial string) ([]byte, error) {
	if err := CheckSerial(serial); err != nil {
		return nil, err
	}
	b := make([]byte, 0, ReceiptSize)
	b = append(b, MagicReceipt...)
	b = append(b, byte(r.Kind))
	b = binary.BigEndian.AppendUint32(b, r.Epoch)
	b = binary.BigEndian.AppendUint32(b, r.Seq)
	b = append(b, r.ID[:]...)
	b = append(b, byte(r.Status))
	mac := macOf(k.ReceiptKey(), b, serial)
	return append(b, mac[:]...), nil
}

// ParseReceipt decodes a receipt without checking its MAC ([SC-8.1]).
func ParseReceipt(b []byte) (Receipt, error) {
	var r Receipt
	if len(b) != ReceiptSize || string(b[:4]) != MagicReceipt {
		return r, fmt.Errorf("%w: receipt must be %d bytes starting %q", ErrMalformed, ReceiptSize, MagicReceipt)
	}
	r.Kind = AckKind(b[4])
	r.Epoch = binary.BigEndian.Uint32(b[5:])
	r.Seq = binary.BigEndian.Uint32(b[9:])
	copy(r.ID[:], b[13:29])
	r.Status = ReceiptStatus(b[29])
	if r.Kind < AckInstalled || r.Kind > AckFailed || r.Status > ReceiptRecorded {
		return r, fmt.Errorf("%w: receipt kind %d status %d", ErrMalformed, r.Kind, r.Status)
	}
	return r, nil
}

// VerifyReceipt checks the MAC of an encoded receipt under the receipt key of k for serial.
func VerifyReceipt(b []byte, k ChainKey, serial string) error {
	if len(b) != ReceiptSize {
		return fmt.Errorf("%w: receipt must be %d bytes", ErrMalformed, ReceiptSize)
	}
	want := macOf(k.ReceiptKey(), b[:ReceiptSize-Size], serial)
	if !hmac.Equal(want[:], b[ReceiptSize-Size:]) {
		return ErrAuth
	}
	return nil
}
