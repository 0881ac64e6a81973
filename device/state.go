package device

import (
	"bytes"
	"crypto/ed25519"
	"errors"
	"fmt"
	"net/url"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// State is what the device keeps in protected memory [SC-10.1]. The agent loads it once
// at start and saves it, whole and atomically, at every step that must survive a power
// loss: after an install (D = n-1), after a re-key and when a receipt confirms the last
// ack.
type State struct {
	Serial           string
	UnitData         keychain.UnitData // U_e of the current epoch; older unit data is erased [SC-3.2]
	Epoch            uint32
	Seq              uint32 // D: the chain index the next update will use
	ChainLength      uint32
	Version          uint64 // installed version (anti-rollback) [SC-5.2]
	ReleasePublicKey ed25519.PublicKey
	// KeySeq is the sequence number of ReleasePublicKey; key statements move it up by
	// one at a time [SC-5.3].
	KeySeq uint32
	Broker protocol.BrokerConfig

	// LastAck is the encoded last ack (kind 1 or 2) the device sent, nil if none;
	// LastAckConfirmed is set once a receipt that answers it verified [SC-10.1 step 7].
	LastAck          []byte
	LastAckConfirmed bool
	// LastAckKey is the chain key K_n that authenticated LastAck. The device needs it to
	// verify the receipt, and after a re-key the unit data it came from is gone. It is a
	// spent key: it reveals only older keys of its chain [SC-3.3]. Zeroed once confirmed.
	LastAckKey keychain.ChainKey

	// Trial is the update on trial, or the last one that failed its trial, nil if none
	// [SC-10.5].
	Trial *Trial
}

// ErrInvalidState is wrapped by every validation error of a State or device file.
var ErrInvalidState = errors.New("device: invalid device state")

// Clone returns a deep copy of s.
func (s State) Clone() State {
	s.ReleasePublicKey = bytes.Clone(s.ReleasePublicKey)
	s.LastAck = bytes.Clone(s.LastAck)
	if s.Trial != nil {
		t := *s.Trial
		t.Report = bytes.Clone(t.Report)
		s.Trial = &t
	}
	return s
}

// Validate checks every field and says which one is wrong.
func (s *State) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalidState, fmt.Sprintf(format, args...))
	}
	if err := keychain.CheckSerial(s.Serial); err != nil {
		return bad("%v", err) // [SC-2.1]
	}
	if !keychain.ValidChainLength(s.ChainLength) {
		return bad("chain_length %d is not a power of two in %d..%d", s.ChainLength, keychain.MinChainLength, keychain.MaxChainLength)
	}
	if s.Seq > s.ChainLength {
		return bad("seq %d is above chain_length %d", s.Seq, s.ChainLength)
	}
	if s.UnitData == (keychain.UnitData{}) {
		return bad("unit_data is all zero: the device file was not provisioned")
	}
	if len(s.ReleasePublicKey) != ed25519.PublicKeySize {
		return bad("release_public_key is %d bytes, want %d", len(s.ReleasePublicKey), ed25519.PublicKeySize)
	}
	u, err := url.Parse(s.Broker.URL)
	if err != nil || u.Host == "" {
		return bad("broker url %q is not a URL like tcp://host:1883", s.Broker.URL)
	}
	switch u.Scheme {
	case "tcp", "mqtt", "ssl", "tls", "mqtts":
	default:
		return bad("broker url %q: scheme %q is not one of tcp, mqtt, ssl, tls, mqtts [SC-14.2]", s.Broker.URL, u.Scheme)
	}
	if (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return bad("broker url %q: give scheme://host[:port] only, without user, path or query [SC-14.2]", s.Broker.URL)
	}
	if s.Broker.Username != "" && s.Broker.Username != s.Serial {
		return bad("broker username %q differs from the serial %q; the protocol uses the serial [SC-9.3]", s.Broker.Username, s.Serial)
	}
	if s.LastAck != nil {
		if len(s.LastAck) != keychain.AckSize {
			return bad("last_ack is %d bytes, want %d", len(s.LastAck), keychain.AckSize)
		}
		if _, err := keychain.ParseAck(s.LastAck); err != nil {
			return bad("last_ack: %v", err)
		}
	}
	if t := s.Trial; t != nil {
		if t.Epoch != s.Epoch || t.Seq < 1 || t.Seq > s.Seq {
			return bad("trial at epoch %d index %d, but the device is at epoch %d index %d", t.Epoch, t.Seq, s.Epoch, s.Seq)
		}
		if t.Report != nil && len(t.Report) != keychain.AckSize {
			return bad("trial report is %d bytes, want %d", len(t.Report), keychain.AckSize)
		}
	}
	return nil
}

// StateFromDeviceFile turns a provisioning device file [SC-14.1] into the initial State,
// checking every field.
func StateFromDeviceFile(f protocol.DeviceFile) (State, error) {
	s := State{
		Serial: f.Serial, Epoch: f.Epoch, Seq: f.Seq, ChainLength: f.ChainLength,
		Version: f.Version, Broker: f.Broker, KeySeq: f.KeySeq,
	}
	if len(f.UnitData) != keychain.Size {
		return State{}, fmt.Errorf("%w: device file for %q: unit_data is %d bytes, want %d", ErrInvalidState, f.Serial, len(f.UnitData), keychain.Size)
	}
	copy(s.UnitData[:], f.UnitData)
	s.ReleasePublicKey = bytes.Clone(f.ReleasePublicKey)
	if s.Broker.Username == "" {
		s.Broker.Username = s.Serial
	}
	if f.Seq < 1 {
		return State{}, fmt.Errorf("%w: device file for %q: seq %d: a device needs at least index 1 left", ErrInvalidState, f.Serial, f.Seq)
	}
	if err := s.Validate(); err != nil {
		return State{}, fmt.Errorf("device file for %q: %w", f.Serial, err)
	}
	return s, nil
}
