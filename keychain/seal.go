package keychain

import (
	"crypto/rand"
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

// LabeledMAC returns HMAC-SHA256(key, label || parts...), for server-side derivations
// that devices never see.
func LabeledMAC(key [Size]byte, label string, parts ...[]byte) [Size]byte {
	return hmacLabel(key[:], label, parts...)
}
