package keychain

import (
	"crypto/ed25519"
	"encoding/binary"
	"fmt"
)

// KeyStatementSize is the length of an encoded key statement (PROTOCOL.md 5.1).
const KeyStatementSize = 104

// KeyStatement makes Key the release key of sequence number Seq (>= 1). It is signed by
// the release key of sequence number Seq-1, so a device that holds one key learns the
// next from the statement alone, and from then on refuses manifests signed by an older
// key ([SC-5.3]).
type KeyStatement struct {
	Seq uint32
	Key ed25519.PublicKey
}

func (s KeyStatement) body() []byte {
	b := make([]byte, 0, KeyStatementSize)
	b = append(b, MagicKeyStatement...)
	b = binary.BigEndian.AppendUint32(b, s.Seq)
	return append(b, s.Key...)
}

// Sign encodes the statement signed by prev, the release key of sequence number Seq-1.
func (s KeyStatement) Sign(prev ed25519.PrivateKey) ([]byte, error) {
	if s.Seq == 0 || len(s.Key) != ed25519.PublicKeySize || len(prev) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("%w: key statement %d with a %d-byte key", ErrMalformed, s.Seq, len(s.Key))
	}
	body := s.body()
	return append(body, ed25519.Sign(prev, append([]byte(LabelKeyStatement), body...))...), nil
}

// ParseKeyStatement decodes a key statement and verifies it under prev, the release key
// of sequence number Seq-1. A bad signature is ErrAuth; bad framing is ErrMalformed.
func ParseKeyStatement(b []byte, prev ed25519.PublicKey) (*KeyStatement, error) {
	if len(b) != KeyStatementSize || string(b[:4]) != MagicKeyStatement {
		return nil, fmt.Errorf("%w: key statement must be %d bytes starting %q", ErrMalformed, KeyStatementSize, MagicKeyStatement)
	}
	s := &KeyStatement{Seq: binary.BigEndian.Uint32(b[4:]), Key: ed25519.PublicKey(append([]byte(nil), b[8:40]...))}
	if s.Seq == 0 {
		return nil, fmt.Errorf("%w: key statement 0", ErrMalformed)
	}
	if len(prev) != ed25519.PublicKeySize || !ed25519.Verify(prev, append([]byte(LabelKeyStatement), b[:40]...), b[40:]) {
		return nil, ErrAuth
	}
	return s, nil
}
