// Package datadir creates and opens a Sealcast server's data directory: the fleet root
// secret, the release-signing key, and the broker's accounts. These files are the server's
// identity; losing root.key strands every device, so back the directory up.
//
//	root.key        32 bytes, the fleet root secret (mode 0600)
//	release.key     32-byte Ed25519 seed, the release-signing key (mode 0600)
//	release.pub     the current release public key, hex (what devices are provisioned with)
//	keys/           the release keys that rotations made (PROTOCOL.md 5.1): release-N.key,
//	                the Ed25519 seed of key N (mode 0600), and statement-N.bin, its key
//	                statement signed by key N-1; release.key is key 0
//	accounts.json   operator, monitor and updater accounts, bcrypt-hashed (mode 0600)
package datadir

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/sealcast/sealcast/internal/atomicfile"
	"github.com/sealcast/sealcast/keychain"
)

// Dir is an opened data directory.
type Dir struct {
	Path string
	Root keychain.RootSecret
	// SigningKey is the current release key, KeySeq its sequence number (0 until the
	// first rotation) and Statements the key statements 1..KeySeq.
	SigningKey ed25519.PrivateKey
	KeySeq     uint32
	Statements [][]byte
	// Created is true when this Open created the directory's keys.
	Created bool
}

// Open opens the data directory at path, creating it and its keys on first use.
func Open(path string) (*Dir, error) {
	if err := os.MkdirAll(path, 0o700); err != nil {
		return nil, fmt.Errorf("creating data directory %s: %w", path, err)
	}
	d := &Dir{Path: path}
	rootPath, keyPath := d.File("root.key"), d.File("release.key")
	root, rerr := os.ReadFile(rootPath)
	seed, kerr := os.ReadFile(keyPath)
	switch {
	case errors.Is(rerr, os.ErrNotExist) && errors.Is(kerr, os.ErrNotExist):
		r, err := keychain.NewRootSecret()
		if err != nil {
			return nil, err
		}
		s := make([]byte, ed25519.SeedSize)
		if _, err := rand.Read(s); err != nil {
			return nil, err
		}
		if err := writeNew(rootPath, r[:]); err != nil {
			return nil, err
		}
		if err := writeNew(keyPath, s); err != nil {
			return nil, err
		}
		root, seed, d.Created = r[:], s, true
	case rerr != nil:
		return nil, fmt.Errorf("reading the root secret %s: %w (restore it from backup; without it no device can update)", rootPath, rerr)
	case kerr != nil:
		return nil, fmt.Errorf("reading the release-signing key %s: %w (restore it from backup)", keyPath, kerr)
	}
	if len(root) != keychain.Size || len(seed) != ed25519.SeedSize {
		return nil, fmt.Errorf("%s or %s has the wrong size: the data directory is damaged", rootPath, keyPath)
	}
	copy(d.Root[:], root)
	d.SigningKey = ed25519.NewKeyFromSeed(seed)
	if err := d.loadRotations(); err != nil {
		return nil, err
	}
	if err := d.writePub(); err != nil {
		return nil, err
	}
	return d, nil
}

func (d *Dir) writePub() error {
	pub := hex.EncodeToString(d.SigningKey.Public().(ed25519.PublicKey)) + "\n"
	if err := os.WriteFile(d.File("release.pub"), []byte(pub), 0o644); err != nil {
		return fmt.Errorf("writing release.pub: %w", err)
	}
	return nil
}

func (d *Dir) keyFiles(seq uint32) (key, statement string) {
	return d.File(filepath.Join("keys", fmt.Sprintf("release-%d.key", seq))), d.File(filepath.Join("keys", fmt.Sprintf("statement-%d.bin", seq)))
}

// loadRotations reads the rotated keys in order and checks that each statement is
// signed by the key before and names the key beside it. A key without its statement (a
// rotation that stopped half way) ends the chain.
func (d *Dir) loadRotations() error {
	for seq := uint32(1); ; seq++ {
		keyPath, stPath := d.keyFiles(seq)
		st, err := os.ReadFile(stPath)
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		seed, kerr := os.ReadFile(keyPath)
		if err != nil || kerr != nil || len(seed) != ed25519.SeedSize {
			return fmt.Errorf("reading release key %d (%s): %v %v: the data directory is damaged; restore keys/ from backup", seq, keyPath, err, kerr)
		}
		key := ed25519.NewKeyFromSeed(seed)
		s, err := keychain.ParseKeyStatement(st, d.SigningKey.Public().(ed25519.PublicKey))
		if err != nil || s.Seq != seq || !s.Key.Equal(key.Public()) {
			return fmt.Errorf("key statement %d (%s) is not signed by key %d or does not name %s (%v): the data directory is damaged; restore keys/ from backup", seq, stPath, seq-1, keyPath, err)
		}
		d.SigningKey, d.KeySeq, d.Statements = key, seq, append(d.Statements, st)
	}
}

// AddKey keeps release key seq and its statement (updater.KeyStore): the key first, then
// the statement, whose presence completes the rotation, both durably; then it is the
// current key.
func (d *Dir) AddKey(seq uint32, key ed25519.PrivateKey, statement []byte) error {
	if seq != d.KeySeq+1 {
		return fmt.Errorf("datadir: release key %d follows key %d, not %d", seq, seq-1, d.KeySeq)
	}
	if err := os.MkdirAll(d.File("keys"), 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", d.File("keys"), err)
	}
	keyPath, stPath := d.keyFiles(seq)
	if err := atomicfile.Write(keyPath, key.Seed(), 0o600); err != nil {
		return err
	}
	if err := atomicfile.WriteNew(stPath, statement, 0o600); err != nil {
		return err
	}
	d.SigningKey, d.KeySeq, d.Statements = key, seq, append(d.Statements, statement)
	return d.writePub()
}

// File returns the path of a file in the directory.
func (d *Dir) File(name string) string { return filepath.Join(d.Path, name) }

// writeNew writes a secret file that must not exist yet, durably.
func writeNew(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("creating %s: %w", path, err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("syncing %s: %w", path, err)
	}
	return f.Close()
}
