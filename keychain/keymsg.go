package keychain

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
)

// KeyKind says what a key message carries.
type KeyKind byte

const (
	// KindRelease carries a release's content key.
	KindRelease KeyKind = 0x01
	// KindRekey carries the unit data of the device's next chain epoch.
	KindRekey KeyKind = 0x02
)

func (k KeyKind) String() string {
	switch k {
	case KindRelease:
		return "release"
	case KindRekey:
		return "rekey"
	}
	return fmt.Sprintf("KeyKind(%d)", byte(k))
}

// Key message sizes (PROTOCOL.md 6).
const (
	KeyMessageReleaseSize = 121
	KeyMessageRekeySize   = 93
	keyHeaderSize         = 29
)

// KeyMessage is what the server publishes, retained, on a device's key topic: a secret
// sealed under the device's one-time key K_seq of chain Epoch (PROTOCOL.md 6).
type KeyMessage struct {
	Kind  KeyKind
	Epoch uint32
	Seq   uint32
	// ID is the release id (KindRelease) or a random re-key id (KindRekey).
	ID ReleaseID
	// ManifestDigest binds the release's manifest (KindRelease only).
	ManifestDigest [32]byte
	// NewLength is the length of the next chain (KindRekey only).
	NewLength uint32

	raw []byte // the encoded message, set by Seal and ParseKeyMessage
}

func (m *KeyMessage) nonceOffset() int {
	if m.Kind == KindRelease {
		return keyHeaderSize + 32
	}
	return keyHeaderSize + 4
}

func (m *KeyMessage) check() error {
	switch m.Kind {
	case KindRelease:
	case KindRekey:
		if !ValidChainLength(m.NewLength) {
			return fmt.Errorf("%w: re-key chain length %d", ErrInvalidChainLength, m.NewLength)
		}
	default:
		return fmt.Errorf("%w: unknown key message kind %d", ErrMalformed, byte(m.Kind))
	}
	if m.Seq == 0 {
		return fmt.Errorf("%w: key message for index 0", ErrMalformed)
	}
	return nil
}

// SealKeyMessage encodes m and seals secret (a ContentKey for KindRelease, the next
// UnitData for KindRekey) under the wrap key of k for the device serial ([SC-6.1]).
// The nonce is random.
func SealKeyMessage(m KeyMessage, k ChainKey, serial string, secret [Size]byte) ([]byte, error) {
	var nonce [12]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return nil, fmt.Errorf("keychain: reading random nonce: %w", err)
	}
	return sealKeyMessage(m, k, serial, secret, nonce)
}

func sealKeyMessage(m KeyMessage, k ChainKey, serial string, secret [Size]byte, nonce [12]byte) ([]byte, error) {
	if err := CheckSerial(serial); err != nil {
		return nil, err
	}
	if err := m.check(); err != nil {
		return nil, err
	}
	b := make([]byte, 0, KeyMessageReleaseSize)
	b = append(b, MagicKey...)
	b = append(b, byte(m.Kind))
	b = binary.BigEndian.AppendUint32(b, m.Epoch)
	b = binary.BigEndian.AppendUint32(b, m.Seq)
	b = append(b, m.ID[:]...)
	if m.Kind == KindRelease {
		b = append(b, m.ManifestDigest[:]...)
	} else {
		b = binary.BigEndian.AppendUint32(b, m.NewLength)
	}
	ad := append(append([]byte(nil), b...), serial...)
	b = append(b, nonce[:]...)
	wk := k.WrapKey()
	return newGCM(wk).Seal(b, nonce[:], secret[:], ad), nil
}

// ParseKeyMessage decodes the fields of a key message without opening it ([SC-6.1]).
// The fields are not authenticated until Open succeeds.
func ParseKeyMessage(b []byte) (*KeyMessage, error) {
	if len(b) < keyHeaderSize || string(b[:4]) != MagicKey {
		return nil, fmt.Errorf("%w: key message of %d bytes does not start with %q", ErrMalformed, len(b), MagicKey)
	}
	m := &KeyMessage{Kind: KeyKind(b[4])}
	want := 0
	switch m.Kind {
	case KindRelease:
		want = KeyMessageReleaseSize
	case KindRekey:
		want = KeyMessageRekeySize
	default:
		return nil, fmt.Errorf("%w: unknown key message kind %d", ErrMalformed, b[4])
	}
	if len(b) != want {
		return nil, fmt.Errorf("%w: %s key message is %d bytes, want %d", ErrMalformed, m.Kind, len(b), want)
	}
	m.Epoch = binary.BigEndian.Uint32(b[5:])
	m.Seq = binary.BigEndian.Uint32(b[9:])
	copy(m.ID[:], b[13:29])
	if m.Kind == KindRelease {
		copy(m.ManifestDigest[:], b[29:61])
	} else {
		m.NewLength = binary.BigEndian.Uint32(b[29:])
	}
	if err := m.check(); err != nil {
		return nil, err
	}
	m.raw = append([]byte(nil), b...)
	return m, nil
}

// Open returns the sealed secret, authenticating every field of the message and the
// serial it was sealed for. Any mismatch (wrong key, wrong device, edited field) is ErrAuth.
func (m *KeyMessage) Open(k ChainKey, serial string) ([Size]byte, error) {
	var out [Size]byte
	if m.raw == nil {
		return out, fmt.Errorf("keychain: Open on a key message that was not parsed")
	}
	off := m.nonceOffset()
	ad := append(append([]byte(nil), m.raw[:off]...), serial...)
	wk := k.WrapKey()
	pt, err := newGCM(wk).Open(nil, m.raw[off:off+12], m.raw[off+12:], ad)
	if err != nil || len(pt) != Size {
		return out, ErrAuth
	}
	copy(out[:], pt)
	return out, nil
}
