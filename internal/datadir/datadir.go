// Package datadir creates and opens a Sealcast server's data directory: the fleet root
// secret, the release-signing key, and the broker's accounts. These files are the server's
// identity; losing root.key strands every device, so back the directory up.
//
//	root.key        32 bytes, the fleet root secret (mode 0600)
//	release.key     32-byte Ed25519 seed, the release-signing key (mode 0600)
//	release.pub     the release public key, hex (what devices are provisioned with)
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

	"github.com/sealcast/sealcast/keychain"
)

// Dir is an opened data directory.
type Dir struct {
	Path       string
	Root       keychain.RootSecret
	SigningKey ed25519.PrivateKey
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
	pub := hex.EncodeToString(d.SigningKey.Public().(ed25519.PublicKey)) + "\n"
	if err := os.WriteFile(d.File("release.pub"), []byte(pub), 0o644); err != nil {
		return nil, fmt.Errorf("writing release.pub: %w", err)
	}
	return d, nil
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
