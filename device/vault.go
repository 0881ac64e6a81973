package device

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// ErrNoVault is returned by FileVault.Load when the vault file does not exist.
var ErrNoVault = errors.New("device: vault does not exist")

// vaultFile is the JSON form of a State on disk.
type vaultFile struct {
	Serial           string                `json:"serial"`
	UnitData         protocol.HexBytes     `json:"unit_data"`
	Epoch            uint32                `json:"epoch"`
	Seq              uint32                `json:"seq"`
	ChainLength      uint32                `json:"chain_length"`
	Version          uint64                `json:"version"`
	ReleasePublicKey protocol.HexBytes     `json:"release_public_key"`
	KeySeq           uint32                `json:"key_seq"`
	Broker           protocol.BrokerConfig `json:"broker"`
	LastAck          protocol.HexBytes     `json:"last_ack,omitempty"`
	LastAckConfirmed bool                  `json:"last_ack_confirmed,omitempty"`
	LastAckKey       protocol.HexBytes     `json:"last_ack_key,omitempty"`
	Trial            *trialFile            `json:"trial,omitempty"`
}

// trialFile is the JSON form of a Trial.
type trialFile struct {
	Epoch    uint32             `json:"epoch"`
	Seq      uint32             `json:"seq"`
	ID       keychain.ReleaseID `json:"id"`
	Version  uint64             `json:"version"`
	Switches uint32             `json:"switches"`
	Boots    uint32             `json:"boots"`
	Report   protocol.HexBytes  `json:"report,omitempty"`
}

func encodeState(s State) ([]byte, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	f := vaultFile{
		Serial: s.Serial, UnitData: s.UnitData[:], Epoch: s.Epoch, Seq: s.Seq,
		ChainLength: s.ChainLength, Version: s.Version, ReleasePublicKey: protocol.HexBytes(s.ReleasePublicKey), KeySeq: s.KeySeq,
		Broker: s.Broker, LastAck: s.LastAck, LastAckConfirmed: s.LastAckConfirmed,
	}
	if s.LastAck != nil {
		f.LastAckKey = s.LastAckKey[:]
	}
	if t := s.Trial; t != nil {
		f.Trial = &trialFile{Epoch: t.Epoch, Seq: t.Seq, ID: t.ID, Version: t.Version, Switches: t.Switches, Boots: t.Boots, Report: t.Report}
	}
	return json.MarshalIndent(f, "", "  ")
}

func decodeState(b []byte) (State, error) {
	var f vaultFile
	if err := json.Unmarshal(b, &f); err != nil {
		return State{}, fmt.Errorf("%w: %v", ErrInvalidState, err)
	}
	s := State{
		Serial: f.Serial, Epoch: f.Epoch, Seq: f.Seq, ChainLength: f.ChainLength, Version: f.Version,
		ReleasePublicKey: []byte(f.ReleasePublicKey), KeySeq: f.KeySeq, Broker: f.Broker,
		LastAck: []byte(f.LastAck), LastAckConfirmed: f.LastAckConfirmed,
	}
	if len(f.UnitData) != keychain.Size {
		return State{}, fmt.Errorf("%w: unit_data is %d bytes, want %d", ErrInvalidState, len(f.UnitData), keychain.Size)
	}
	copy(s.UnitData[:], f.UnitData)
	if t := f.Trial; t != nil {
		s.Trial = &Trial{Epoch: t.Epoch, Seq: t.Seq, ID: t.ID, Version: t.Version, Switches: t.Switches, Boots: t.Boots, Report: []byte(t.Report)}
	}
	if s.LastAck != nil {
		if len(f.LastAckKey) != keychain.Size {
			return State{}, fmt.Errorf("%w: last_ack_key is %d bytes, want %d", ErrInvalidState, len(f.LastAckKey), keychain.Size)
		}
		copy(s.LastAckKey[:], f.LastAckKey)
	}
	return s, s.Validate()
}

// FileVault keeps the State in one JSON file, mode 0600. Save is crash-safe: it writes a
// temporary file in the same directory, fsyncs it, renames it over the vault and fsyncs
// the directory, so after a power loss the vault is either the old or the new State,
// never a mix. A FileVault is safe for concurrent use.
//
// The file holds the unit data in the clear: put it on storage only the agent can read
// (or behind a secure element implementing [Vault]).
type FileVault struct {
	path string
	mu   sync.Mutex
}

// NewFileVault returns a vault stored at path. It does not touch the file system.
func NewFileVault(path string) *FileVault { return &FileVault{path: path} }

// CreateFileVault provisions a new vault at path from a device file. It refuses to
// overwrite an existing vault: that would throw away the device's sequence number.
func CreateFileVault(path string, f protocol.DeviceFile) (*FileVault, error) {
	s, err := StateFromDeviceFile(f)
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(path); err == nil {
		return nil, fmt.Errorf("device: vault %s already exists: remove it only if the device is re-provisioned, it holds the sequence number", path)
	}
	v := NewFileVault(path)
	if err := v.Save(s); err != nil {
		return nil, err
	}
	return v, nil
}

// Path returns the vault file's path.
func (v *FileVault) Path() string { return v.path }

// Load reads the vault. A missing file is ErrNoVault.
func (v *FileVault) Load() (State, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	b, err := os.ReadFile(v.path)
	if errors.Is(err, fs.ErrNotExist) {
		return State{}, fmt.Errorf("%w: %s: provision the device first (CreateFileVault with its device file)", ErrNoVault, v.path)
	}
	if err != nil {
		return State{}, fmt.Errorf("device: reading vault %s: %w", v.path, err)
	}
	s, err := decodeState(b)
	if err != nil {
		return State{}, fmt.Errorf("device: vault %s is damaged (%w); restore it from a backup or re-provision the device", v.path, err)
	}
	return s, nil
}

// Save replaces the vault with s atomically.
func (v *FileVault) Save(s State) error {
	b, err := encodeState(s)
	if err != nil {
		return fmt.Errorf("device: not saving vault %s: %w", v.path, err)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := writeFileAtomic(v.path, b, 0o600); err != nil {
		return fmt.Errorf("device: saving vault: %w; the previous state is intact, check the disk and permissions of %s", err, filepath.Dir(v.path))
	}
	return nil
}

// writeFileAtomic writes data to a temporary file next to path, fsyncs it, renames it to
// path and fsyncs the directory. The temporary file is removed on any failure.
func writeFileAtomic(path string, data []byte, mode os.FileMode) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err = f.Chmod(mode); err != nil {
		return err
	}
	if _, err = f.Write(data); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp, path); err != nil {
		return err
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// MemoryVault keeps the State in memory: for simulators and tests. It is safe for
// concurrent use, and it hands out copies, so a caller cannot change it by accident.
type MemoryVault struct {
	mu sync.Mutex
	s  State
	ok bool
}

// NewMemoryVault returns a vault holding s.
func NewMemoryVault(s State) *MemoryVault { return &MemoryVault{s: s.Clone(), ok: true} }

// Load returns a copy of the stored state.
func (v *MemoryVault) Load() (State, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.ok {
		return State{}, fmt.Errorf("%w: memory vault is empty", ErrNoVault)
	}
	return v.s.Clone(), nil
}

// Save stores a copy of s after validating it.
func (v *MemoryVault) Save(s State) error {
	if err := s.Validate(); err != nil {
		return fmt.Errorf("device: not saving memory vault: %w", err)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	v.s, v.ok = s.Clone(), true
	return nil
}
