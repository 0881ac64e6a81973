package keychain

import (
	"crypto/hmac"
	"encoding/binary"
	"fmt"
)

// PrefetchNoticeSize is the size of a prefetch notice (PROTOCOL.md 6.4).
const PrefetchNoticeSize = 96

// PrefetchNotice tells a device at (Epoch, Seq) that release ID, whose signed manifest
// hashes to ManifestDigest, will be offered to it, so that it may download and keep the
// ciphertext before the key comes, starting at a random moment within Jitter seconds
// (PROTOCOL.md 6.4). It is authenticated with PK = HMAC(K_Seq, LabelPrefetch), so only
// the holder of the root secret can make a device download.
type PrefetchNotice struct {
	Epoch          uint32
	Seq            uint32
	ID             ReleaseID
	ManifestDigest [32]byte
	Jitter         uint32 // seconds
}

// PrefetchKey returns PK = HMAC(K_n, LabelPrefetch), the key that authenticates prefetch
// notices.
func (k ChainKey) PrefetchKey() [Size]byte { return hmacLabel(k[:], LabelPrefetch) }

// Seal encodes the notice and appends its MAC under the prefetch key of k for serial.
func (p PrefetchNotice) Seal(k ChainKey, serial string) ([]byte, error) {
	if err := CheckSerial(serial); err != nil {
		return nil, err
	}
	if p.Seq == 0 {
		return nil, fmt.Errorf("%w: prefetch notice for index 0", ErrMalformed)
	}
	b := make([]byte, 0, PrefetchNoticeSize)
	b = append(b, MagicPrefetch...)
	b = binary.BigEndian.AppendUint32(b, p.Epoch)
	b = binary.BigEndian.AppendUint32(b, p.Seq)
	b = append(b, p.ID[:]...)
	b = append(b, p.ManifestDigest[:]...)
	b = binary.BigEndian.AppendUint32(b, p.Jitter)
	mac := macOf(k.PrefetchKey(), b, serial)
	return append(b, mac[:]...), nil
}

// ParsePrefetchNotice decodes a notice without checking its MAC: the device reads Epoch
// and Seq, checks they are its own, then calls VerifyPrefetchNotice.
func ParsePrefetchNotice(b []byte) (PrefetchNotice, error) {
	var p PrefetchNotice
	if len(b) != PrefetchNoticeSize || string(b[:4]) != MagicPrefetch {
		return p, fmt.Errorf("%w: prefetch notice must be %d bytes starting %q", ErrMalformed, PrefetchNoticeSize, MagicPrefetch)
	}
	p.Epoch = binary.BigEndian.Uint32(b[4:])
	p.Seq = binary.BigEndian.Uint32(b[8:])
	copy(p.ID[:], b[12:28])
	copy(p.ManifestDigest[:], b[28:60])
	p.Jitter = binary.BigEndian.Uint32(b[60:])
	if p.Seq == 0 {
		return p, fmt.Errorf("%w: prefetch notice for index 0", ErrMalformed)
	}
	return p, nil
}

// VerifyPrefetchNotice checks the MAC of an encoded notice under the prefetch key of k
// for serial, in constant time. A mismatch is ErrAuth.
func VerifyPrefetchNotice(b []byte, k ChainKey, serial string) error {
	if len(b) != PrefetchNoticeSize {
		return fmt.Errorf("%w: prefetch notice must be %d bytes", ErrMalformed, PrefetchNoticeSize)
	}
	want := macOf(k.PrefetchKey(), b[:PrefetchNoticeSize-Size], serial)
	if !hmac.Equal(want[:], b[PrefetchNoticeSize-Size:]) {
		return ErrAuth
	}
	return nil
}
