package keychain

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math/bits"
)

// Size is the size of every symmetric key in the protocol.
const Size = 32

// Chain lengths a server may assign (PROTOCOL.md 3.3).
const (
	MinChainLength     = 16
	MaxChainLength     = 1 << 20
	DefaultChainLength = 1024
)

var (
	// ErrAuth is returned for every authentication failure: a MAC, AEAD tag or signature
	// that does not verify. It deliberately says nothing about which part was wrong.
	ErrAuth = errors.New("keychain: message authentication failed")

	// ErrMalformed is returned when a message has the wrong length, magic or field values.
	ErrMalformed = errors.New("keychain: malformed message")

	// ErrInvalidSerial is returned for a serial outside PROTOCOL.md 2 ([SC-2.1]).
	ErrInvalidSerial = errors.New("keychain: invalid serial")

	// ErrInvalidChainLength is returned for a chain length that is not a power of two
	// between MinChainLength and MaxChainLength.
	ErrInvalidChainLength = errors.New("keychain: invalid chain length")
)

// RootSecret is the fleet root secret R. It derives every device's unit data and the broker
// authentication key, and never leaves the server.
type RootSecret [Size]byte

// UnitData is a device's personalized unit data U_e: the seed K_0 of its current chain.
type UnitData [Size]byte

// ChainKey is a one-time key K_n.
type ChainKey [Size]byte

// BrokerAuthKey is the key A from which the broker recomputes device passwords.
type BrokerAuthKey [Size]byte

// NewRootSecret returns a fresh root secret from crypto/rand.
func NewRootSecret() (RootSecret, error) {
	var r RootSecret
	if _, err := rand.Read(r[:]); err != nil {
		return r, fmt.Errorf("keychain: reading random root secret: %w", err)
	}
	return r, nil
}

// String hides the secret so that it never reaches a log by accident.
func (RootSecret) String() string { return "RootSecret(redacted)" }

// String hides the secret so that it never reaches a log by accident.
func (UnitData) String() string { return "UnitData(redacted)" }

// String hides the secret so that it never reaches a log by accident.
func (ChainKey) String() string { return "ChainKey(redacted)" }

// ValidSerial reports whether s is a serial as PROTOCOL.md section 2 defines:
// 1 to 64 bytes of [A-Za-z0-9._-], starting with a letter or digit.
func ValidSerial(s string) bool {
	if len(s) == 0 || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case i > 0 && (c == '.' || c == '_' || c == '-'):
		default:
			return false
		}
	}
	return true
}

// CheckSerial returns an error wrapping ErrInvalidSerial if s is not a valid serial.
func CheckSerial(s string) error {
	if !ValidSerial(s) {
		return fmt.Errorf("%w %q: use 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit", ErrInvalidSerial, s)
	}
	return nil
}

// ValidChainLength reports whether l is a chain length a server may assign.
func ValidChainLength(l uint32) bool {
	return l >= MinChainLength && l <= MaxChainLength && bits.OnesCount32(l) == 1
}

// DeriveUnitData returns the unit data U_e of a device in chain epoch e (PROTOCOL.md 3.2,
// claim 8): U_0 = HMAC(R, LabelUnitData || 0x00 || be32(0) || serial), and for e >= 1
// U_e = NextUnitData(U_{e-1}, RekeySecret(R, serial, e)). It costs e+1 HMACs.
func DeriveUnitData(root RootSecret, serial string, epoch uint32) (UnitData, error) {
	if err := CheckSerial(serial); err != nil {
		return UnitData{}, err
	}
	u := UnitData(rootDerived(root, serial, 0))
	for e := uint32(1); e <= epoch && e != 0; e++ {
		u = NextUnitData(u, rootDerived(root, serial, e))
	}
	return u, nil
}

// RekeySecret returns T_e = HMAC(R, LabelUnitData || 0x00 || be32(e) || serial), the
// secret a re-key message into epoch e >= 1 carries (6.3). The device combines it with
// the unit data it holds (NextUnitData), so that T_e alone, which a leaked K_1 reveals
// from the recorded re-key message, does not give U_e.
func RekeySecret(root RootSecret, serial string, epoch uint32) ([Size]byte, error) {
	if err := CheckSerial(serial); err != nil {
		return [Size]byte{}, err
	}
	if epoch == 0 {
		return [Size]byte{}, errors.New("keychain: epoch 0 has no re-key secret")
	}
	return rootDerived(root, serial, epoch), nil
}

// NextUnitData returns U_{e+1} = HMAC(U_e, LabelRekey || T_{e+1}): the unit data of the
// next epoch, from the current one and the re-key secret (PROTOCOL.md 3.2, [SC-3.2a]).
func NextUnitData(u UnitData, secret [Size]byte) UnitData {
	return UnitData(hmacLabel(u[:], LabelRekey, secret[:]))
}

func rootDerived(root RootSecret, serial string, epoch uint32) [Size]byte {
	var b [5]byte
	binary.BigEndian.PutUint32(b[1:], epoch)
	return hmacLabel(root[:], LabelUnitData, b[:], []byte(serial))
}

// Step is the key-generation step: SHA256(LabelChainStep || k) (PROTOCOL.md 3.3).
func Step(k ChainKey) ChainKey {
	var buf [len(LabelChainStep) + Size]byte
	copy(buf[:], LabelChainStep)
	copy(buf[len(LabelChainStep):], k[:])
	return sha256.Sum256(buf[:])
}

// Key returns K_n, the n-th iterate of Step starting from K_0 = u ([SC-3.3], claim 4).
// It costs n hashes; servers walking a chain should use a Traversal instead.
func Key(u UnitData, n uint32) ChainKey {
	// One buffer for the whole walk: the label prefix stays, the key part is overwritten.
	var buf [len(LabelChainStep) + Size]byte
	copy(buf[:], LabelChainStep)
	k := ChainKey(u)
	for i := uint32(0); i < n; i++ {
		copy(buf[len(LabelChainStep):], k[:])
		k = sha256.Sum256(buf[:])
	}
	return k
}

func hmacLabel(key []byte, label string, extra ...[]byte) [Size]byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(label))
	for _, e := range extra {
		m.Write(e)
	}
	var out [Size]byte
	m.Sum(out[:0])
	return out
}

// WrapKey returns WK = HMAC(K_n, LabelWrap), the key that seals a key message.
func (k ChainKey) WrapKey() [Size]byte { return hmacLabel(k[:], LabelWrap) }

// AckKey returns AK = HMAC(K_n, LabelAck), the key that authenticates acks and reports.
func (k ChainKey) AckKey() [Size]byte { return hmacLabel(k[:], LabelAck) }

// ReceiptKey returns RK = HMAC(K_n, LabelReceipt), the key that authenticates receipts.
func (k ChainKey) ReceiptKey() [Size]byte { return hmacLabel(k[:], LabelReceipt) }

// BrokerAuth returns A = HMAC(R, LabelBrokerAuth), which is all the broker needs to check
// device passwords (PROTOCOL.md 3.5).
func (r RootSecret) BrokerAuth() BrokerAuthKey {
	return BrokerAuthKey(hmacLabel(r[:], LabelBrokerAuth))
}

// StateSealKey returns HMAC(R, LabelStateSeal), the key that seals server-side chain state.
func (r RootSecret) StateSealKey() [Size]byte { return hmacLabel(r[:], LabelStateSeal) }

// DevicePassword returns the MQTT password of the device with the given serial:
// base64url-nopad(HMAC(A, LabelMQTTPassword || 0x00 || serial)).
func (a BrokerAuthKey) DevicePassword(serial string) (string, error) {
	if err := CheckSerial(serial); err != nil {
		return "", err
	}
	sum := hmacLabel(a[:], LabelMQTTPassword, []byte{0}, []byte(serial))
	return base64.RawURLEncoding.EncodeToString(sum[:]), nil
}

// CheckDevicePassword reports, in constant time, whether password is the device password
// for serial.
func (a BrokerAuthKey) CheckDevicePassword(serial string, password []byte) bool {
	want, err := a.DevicePassword(serial)
	if err != nil {
		return false
	}
	return hmac.Equal([]byte(want), password)
}

// ReleaseID identifies a release (or a re-key operation): 16 random bytes.
type ReleaseID [16]byte

// NewReleaseID returns a random release id.
func NewReleaseID() (ReleaseID, error) {
	var id ReleaseID
	if _, err := rand.Read(id[:]); err != nil {
		return id, fmt.Errorf("keychain: reading random release id: %w", err)
	}
	return id, nil
}

// String returns the id as 32 lowercase hex digits, its form in topics and JSON.
func (id ReleaseID) String() string { return hex.EncodeToString(id[:]) }

// ParseReleaseID parses the 32-hex-digit text form of a release id.
func ParseReleaseID(s string) (ReleaseID, error) {
	var id ReleaseID
	if len(s) != 32 {
		return id, fmt.Errorf("%w: release id %q must be 32 lowercase hex digits", ErrMalformed, s)
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return id, fmt.Errorf("%w: release id %q must be 32 lowercase hex digits", ErrMalformed, s)
		}
	}
	_, err := hex.Decode(id[:], []byte(s))
	return id, err
}

// MarshalText implements encoding.TextMarshaler.
func (id ReleaseID) MarshalText() ([]byte, error) { return []byte(id.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (id *ReleaseID) UnmarshalText(b []byte) error {
	v, err := ParseReleaseID(string(b))
	if err != nil {
		return err
	}
	*id = v
	return nil
}

// ContentKey is a release's content key CK.
type ContentKey [Size]byte

// String hides the secret so that it never reaches a log by accident.
func (ContentKey) String() string { return "ContentKey(redacted)" }

// NewContentKey returns a fresh content key from crypto/rand.
func NewContentKey() (ContentKey, error) {
	var k ContentKey
	if _, err := rand.Read(k[:]); err != nil {
		return k, fmt.Errorf("keychain: reading random content key: %w", err)
	}
	return k, nil
}

// PayloadKey returns PK = HMAC(CK, LabelPayload || release_id), the key of the image's
// chunks (PROTOCOL.md 4).
func (k ContentKey) PayloadKey(id ReleaseID) [Size]byte {
	return hmacLabel(k[:], LabelPayload, id[:])
}
