package keychain

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"time"
)

// ManifestSize is the length of an encoded, signed manifest (PROTOCOL.md 5).
const ManifestSize = 184

const manifestBodySize = 120

// Manifest describes a release's encrypted image; it is signed with the release-signing
// key (Ed25519) whose public half every device holds.
type Manifest struct {
	Release     ReleaseID
	Version     uint64 // monotonic, >= 1; devices install only newer versions
	Created     time.Time
	ImageSize   uint64
	ChunkSize   uint32
	ChunkCount  uint32
	ImageSHA256 [32]byte // of the plaintext
	ChunksRoot  [32]byte // of the chunk tree (PROTOCOL.md 4.3)
	// KeySeq is the sequence number of the release key that signs the manifest (5.1):
	// 0 for the key devices are provisioned with, n for the key of key statement n.
	KeySeq uint32
}

// NewManifest returns the manifest of a release whose image EncryptChunks summarised.
func NewManifest(id ReleaseID, version uint64, created time.Time, s Summary) *Manifest {
	return &Manifest{
		Release: id, Version: version, Created: created.UTC().Truncate(time.Second),
		ImageSize: s.ImageSize, ChunkSize: s.ChunkSize, ChunkCount: s.ChunkCount,
		ImageSHA256: s.ImageSHA256, ChunksRoot: s.ChunksRoot,
	}
}

// check enforces the field rules of [SC-5.2] that do not need the signature.
func (m *Manifest) check() error {
	if m.Version == 0 {
		return fmt.Errorf("%w: manifest version must be >= 1", ErrMalformed)
	}
	count, err := ChunkCount(m.ImageSize, m.ChunkSize)
	if err != nil {
		return err
	}
	if count != m.ChunkCount {
		return fmt.Errorf("%w: manifest says %d chunks, but %d bytes in chunks of %d make %d",
			ErrMalformed, m.ChunkCount, m.ImageSize, m.ChunkSize, count)
	}
	if m.Created.Unix() < 0 {
		return fmt.Errorf("%w: manifest creation time before 1970", ErrMalformed)
	}
	return nil
}

func (m *Manifest) body() []byte {
	b := make([]byte, 0, ManifestSize)
	b = append(b, MagicManifest...)
	b = append(b, m.Release[:]...)
	b = binary.BigEndian.AppendUint64(b, m.Version)
	b = binary.BigEndian.AppendUint64(b, uint64(m.Created.Unix()))
	b = binary.BigEndian.AppendUint64(b, m.ImageSize)
	b = binary.BigEndian.AppendUint32(b, m.ChunkSize)
	b = binary.BigEndian.AppendUint32(b, m.ChunkCount)
	b = append(b, m.ImageSHA256[:]...)
	b = append(b, m.ChunksRoot[:]...)
	b = binary.BigEndian.AppendUint32(b, m.KeySeq)
	return b
}

func signedMessage(body []byte) []byte {
	msg := make([]byte, 0, len(LabelManifest)+len(body))
	msg = append(msg, LabelManifest...)
	return append(msg, body...)
}

// Sign encodes and signs the manifest, returning its 184 bytes. key must be the release
// key of sequence number m.KeySeq.
func (m *Manifest) Sign(key ed25519.PrivateKey) ([]byte, error) {
	if len(key) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("keychain: release-signing key is %d bytes, want %d", len(key), ed25519.PrivateKeySize)
	}
	if err := m.check(); err != nil {
		return nil, err
	}
	body := m.body()
	return append(body, ed25519.Sign(key, signedMessage(body))...), nil
}

// ParseManifest verifies b under the release public key and decodes it ([SC-5.1], [SC-5.2]).
// A bad signature is ErrAuth; a malformed manifest is ErrMalformed. Anti-rollback is the
// caller's check: compare Version with the installed version.
func ParseManifest(b []byte, pub ed25519.PublicKey) (*Manifest, error) {
	if len(b) != ManifestSize || string(b[:4]) != MagicManifest {
		return nil, fmt.Errorf("%w: manifest must be %d bytes starting %q", ErrMalformed, ManifestSize, MagicManifest)
	}
	if len(pub) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("keychain: release public key is %d bytes, want %d", len(pub), ed25519.PublicKeySize)
	}
	if !ed25519.Verify(pub, signedMessage(b[:manifestBodySize]), b[manifestBodySize:]) {
		return nil, ErrAuth
	}
	m := &Manifest{}
	copy(m.Release[:], b[4:20])
	m.Version = binary.BigEndian.Uint64(b[20:])
	created := binary.BigEndian.Uint64(b[28:])
	if created > 1<<62 {
		return nil, fmt.Errorf("%w: manifest creation time out of range", ErrMalformed)
	}
	m.Created = time.Unix(int64(created), 0).UTC()
	m.ImageSize = binary.BigEndian.Uint64(b[36:])
	m.ChunkSize = binary.BigEndian.Uint32(b[44:])
	m.ChunkCount = binary.BigEndian.Uint32(b[48:])
	copy(m.ImageSHA256[:], b[52:84])
	copy(m.ChunksRoot[:], b[84:116])
	m.KeySeq = binary.BigEndian.Uint32(b[116:])
	if err := m.check(); err != nil {
		return nil, err
	}
	return m, nil
}

// ManifestKeySeq returns the key_seq field of an encoded manifest, before its signature is
// verified: which release key a device needs to verify it (5.1). ok is false for bytes
// that are not a manifest.
func ManifestKeySeq(b []byte) (seq uint32, ok bool) {
	if len(b) != ManifestSize || string(b[:4]) != MagicManifest {
		return 0, false
	}
	return binary.BigEndian.Uint32(b[116:]), true
}

// ManifestDigest returns SHA256 of an encoded manifest, which key messages bind.
func ManifestDigest(b []byte) [32]byte { return sha256.Sum256(b) }
