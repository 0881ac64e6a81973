package keychain

import (
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"math/bits"
)

// Traversal walks a device's chain downwards, K_L, K_{L-1}, ..., K_1, for the server,
// storing log2(L) chain values and spending at most about log2(L)/2 hashes per step:
// the optimal binary pebbling of B. Schoenmakers, "Explicit Optimal Binary Pebbling for
// One-Way Hash Chain Reversal" (Financial Cryptography 2016). Without it, deriving K_n
// from the unit data costs n hashes per device per release.
//
// A Traversal holds key material: store it only sealed (Seal, OpenTraversal).
// It is not safe for concurrent use.
type Traversal struct {
	k   int    // log2 of the chain length
	pos uint32 // the chain index Current returns; 0 once exhausted
	// z[j] are the pebbles. Before the first step, z[j] = K_{1+L-2^(j+1)}; z[0] is
	// always the value one below the current output.
	z [][Size]byte
	// Pebbles still travelling to their next place: level q and steps g left at it.
	q []uint8
	g []uint32
	// hashes counts Step calls since the traversal was made or decoded (Steps).
	hashes int
}

// NewTraversal starts a traversal of the chain of unit data u with the given length (a
// power of two, see ValidChainLength). It costs length-1 hashes; Current is then K_length.
func NewTraversal(u UnitData, length uint32) (*Traversal, error) {
	if !ValidChainLength(length) {
		return nil, fmt.Errorf("%w: %d is not a power of two in %d..%d", ErrInvalidChainLength, length, MinChainLength, MaxChainLength)
	}
	k := bits.TrailingZeros32(length)
	t := &Traversal{k: k, pos: length, z: make([][Size]byte, k)}
	y := Step(ChainKey(u)) // K_1
	t.hashes++
	// Walk up from K_1, dropping a pebble at K_{1+L-2^(j+1)} for j = k-1 down to 0.
	for h := length; h >= 2; h-- {
		if h&(h-1) == 0 {
			t.z[bits.TrailingZeros32(h)-1] = y
		}
		if h > 2 {
			y = Step(y)
			t.hashes++
		}
	}
	return t, nil
}

// Len returns the chain length.
func (t *Traversal) Len() uint32 { return 1 << t.k }

// Pos returns the index n of the key Current returns, or 0 when the chain is used up.
func (t *Traversal) Pos() uint32 { return t.pos }

// Current returns K_Pos(). It panics if the chain is used up.
func (t *Traversal) Current() ChainKey {
	switch {
	case t.pos == 0:
		panic("keychain: Current on a used-up chain traversal")
	case t.pos == t.Len():
		// Only the first key is not held as a pebble: it is one step above z[0].
		t.hashes++
		return Step(t.z[0])
	}
	return t.z[0]
}

// Steps returns the chain steps (SHA-256 hashes) this value has computed since NewTraversal
// or UnmarshalBinary made it: what the server actually spends on the chain.
func (t *Traversal) Steps() int { return t.hashes }

// Advance moves to the next key down (Pos()-1), spending at most about k/2 hashes.
// It fails once the chain is used up.
func (t *Traversal) Advance() error {
	switch {
	case t.pos == 0:
		return fmt.Errorf("keychain: chain traversal is used up")
	case t.pos == t.Len():
		t.pos--
		return nil
	}
	if err := t.step(t.pos); err != nil {
		return err
	}
	t.pos--
	return nil
}

var errCorruptTraversal = fmt.Errorf("%w: chain traversal state is inconsistent", ErrMalformed)

// step does the work of output round r: shift the pebbles that round r uses up, then let
// the travelling pebbles take their share of hash steps (Schoenmakers, Algorithm 3).
//
// The bounds checks cannot fail for a state this package produced; they turn a corrupt
// decoded state into an error instead of a panic.
func (t *Traversal) step(r uint32) error {
	c := r
	i := 0
	for c&1 == 0 {
		if i+1 >= t.k {
			return errCorruptTraversal
		}
		t.z[i] = t.z[i+1]
		i++
		c >>= 1
	}
	i++
	c >>= 1
	if c&1 == 1 {
		if i >= t.k || len(t.q) >= t.k {
			return errCorruptTraversal
		}
		t.q = append(t.q, uint8(i))
		t.g = append(t.g, 0)
	}
	u := len(t.q)
	w := int(r&1) + i + 1
	for c != 0 {
		for c&1 == 0 {
			w++
			c >>= 1
		}
		u--
		if u < 0 {
			return errCorruptTraversal
		}
		q, g := int(t.q[u]), t.g[u]
		for s := 0; s < w/2; s++ {
			y := t.z[q]
			if g == 0 {
				if q == 0 {
					return errCorruptTraversal
				}
				q--
				g = 1 << q
			}
			t.z[q] = Step(y)
			t.hashes++
			g--
		}
		if q != 0 {
			t.q[u], t.g[u] = uint8(q), g
		} else {
			t.q, t.g = t.q[:len(t.q)-1], t.g[:len(t.g)-1]
		}
		w &= 1
		for c&1 == 1 {
			w++
			c >>= 1
		}
	}
	return nil
}

const traversalVersion = 1

// MarshalBinary encodes the traversal state. The result is key material.
func (t *Traversal) MarshalBinary() ([]byte, error) {
	b := make([]byte, 0, 7+len(t.q)*5+len(t.z)*Size)
	b = append(b, traversalVersion, byte(t.k))
	b = binary.BigEndian.AppendUint32(b, t.pos)
	b = append(b, byte(len(t.q)))
	for j := range t.q {
		b = append(b, t.q[j])
		b = binary.BigEndian.AppendUint32(b, t.g[j])
	}
	for j := range t.z {
		b = append(b, t.z[j][:]...)
	}
	return b, nil
}

// UnmarshalBinary decodes a state written by MarshalBinary.
func (t *Traversal) UnmarshalBinary(b []byte) error {
	bad := func(why string) error { return fmt.Errorf("%w: chain traversal state: %s", ErrMalformed, why) }
	if len(b) < 7 || b[0] != traversalVersion {
		return bad("unknown version or too short")
	}
	k := int(b[1])
	if k < 4 || k > 20 {
		return bad("chain length out of range")
	}
	pos := binary.BigEndian.Uint32(b[2:])
	nq := int(b[6])
	if pos > 1<<k || nq > k || len(b) != 7+nq*5+k*Size {
		return bad("inconsistent sizes")
	}
	nt := Traversal{k: k, pos: pos, z: make([][Size]byte, k), q: make([]uint8, nq), g: make([]uint32, nq)}
	p := b[7:]
	for j := 0; j < nq; j++ {
		nt.q[j], nt.g[j] = p[0], binary.BigEndian.Uint32(p[1:])
		if nt.q[j] == 0 || int(nt.q[j]) >= k || nt.g[j] > 1<<nt.q[j] {
			return bad("pebble level out of range")
		}
		p = p[5:]
	}
	for j := 0; j < k; j++ {
		copy(nt.z[j][:], p[j*Size:])
	}
	*t = nt
	return nil
}

// SealTraversal encrypts a traversal's state for storage, bound to the device's serial and
// epoch, under the root secret's state-seal key (PROTOCOL.md 3.6).
func SealTraversal(root RootSecret, serial string, epoch uint32, t *Traversal) ([]byte, error) {
	return NewStateSealer(root).Seal(serial, epoch, t)
}

// OpenTraversal decrypts a state sealed by SealTraversal for the same serial and epoch.
func OpenTraversal(root RootSecret, serial string, epoch uint32, sealed []byte) (*Traversal, error) {
	return NewStateSealer(root).Open(serial, epoch, sealed)
}

// StateSealer does what SealTraversal and OpenTraversal do, with the state-seal key and
// its cipher derived once: a server that opens a state per device per release saves an
// HMAC and an AES key expansion each time. It is safe for concurrent use.
type StateSealer struct {
	aead cipher.AEAD
}

// NewStateSealer returns a StateSealer for root's state-seal key.
func NewStateSealer(root RootSecret) *StateSealer {
	return &StateSealer{aead: newGCM(root.StateSealKey())}
}

// Seal is SealTraversal.
func (s *StateSealer) Seal(serial string, epoch uint32, t *Traversal) ([]byte, error) {
	state, _ := t.MarshalBinary()
	var nonce [12]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return nil, fmt.Errorf("keychain: reading random nonce: %w", err)
	}
	return s.aead.Seal(nonce[:], nonce[:], state, stateAD(serial, epoch)), nil
}

// Open is OpenTraversal.
func (s *StateSealer) Open(serial string, epoch uint32, sealed []byte) (*Traversal, error) {
	if len(sealed) < 12+TagSize {
		return nil, fmt.Errorf("%w: sealed chain state of %d bytes", ErrMalformed, len(sealed))
	}
	state, err := s.aead.Open(nil, sealed[:12], sealed[12:], stateAD(serial, epoch))
	if err != nil {
		return nil, ErrAuth
	}
	t := &Traversal{}
	if err := t.UnmarshalBinary(state); err != nil {
		return nil, err
	}
	return t, nil
}

func stateAD(serial string, epoch uint32) []byte {
	ad := append([]byte(serial), 0)
	return binary.BigEndian.AppendUint32(ad, epoch)
}
