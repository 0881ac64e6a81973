package keychain

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
)

// SealSecret encrypts a 32-byte secret for storage under key (for example
// RootSecret.StateSealKey), bound to a context string such as "release <id>". Servers use
// it so that stores never hold content keys in the clear ([SC-3.1]).
func SealSecret(key [Size]byte, context string, secret [Size]byte) ([]byte, error) {
	var nonce [12]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return nil, fmt.Errorf("keychain: reading random nonce: %w", err)
	}
	return newGCM(key).Seal(nonce[:], nonce[:], secret[:], []byte(context)), nil
}

// OpenSecret decrypts what SealSecret sealed with the same key and context.
func OpenSecret(key [Size]byte, context string, sealed []byte) ([Size]byte, error) {
	var out [Size]byte
	if len(sealed) != 12+Size+TagSize {
		return out, fmt.Errorf("%w: sealed secret of %d bytes", ErrMalformed, len(sealed))
	}
	pt, err := newGCM(key).Open(nil, sealed[:12], sealed[12:], []byte(context))
	if err != nil {
		return out, ErrAuth
	}
	copy(out[:], pt)
	return out, nil
}

// RekeyIDKey returns HMAC(R, LabelRekeyID), the key that derives re-key ids: an HMAC key
// of its own, apart from the state-seal key, which is an AES-GCM key (3.6, 2.1).
func (r RootSecret) RekeyIDKey() [Size]byte { return hmacLabel(r[:], LabelRekeyID) }

// RekeyID returns the id of the re-key of serial out of epoch: the first 16 bytes of
// HMAC(key, serial || be32(epoch)), with key from RekeyIDKey. It is derived, so that a
// restarted server re-publishes the same re-key; devices treat it as opaque.
func RekeyID(key [Size]byte, serial string, epoch uint32) ReleaseID {
	var e [4]byte
	binary.BigEndian.PutUint32(e[:], epoch)
	sum := hmacLabel(key[:], "", []byte(serial), e[:])
	var id ReleaseID
	copy(id[:], sum[:])
	return id
}
