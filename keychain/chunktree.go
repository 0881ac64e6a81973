package keychain

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math/bits"
)

// The chunk tree (PROTOCOL.md 4.3): a Merkle tree over an encrypted image's chunks whose
// root the signed manifest carries, so that a device authenticates each chunk by the
// release key on arrival, before it decrypts a byte, with memory for one chunk and its
// proof.
//
//	depth  = ceil(log2(chunk_count))                  (0 for one chunk)
//	leaf_i = SHA256(0x00 || be32(i) || C_i)            for i <  chunk_count
//	leaf_i = SHA256(0x02)                              for chunk_count <= i < 2^depth
//	node   = SHA256(0x01 || left || right)
//
// A chunk topic carries C_i || proof_i, proof_i being the depth sibling hashes from the
// leaf level up.

// ChunkTreeDepth returns the depth of the chunk tree of count chunks: ceil(log2(count)).
func ChunkTreeDepth(count uint32) int {
	if count <= 1 {
		return 0
	}
	return bits.Len32(count - 1)
}

func chunkLeaf(index uint32, c []byte) [Size]byte {
	h := sha256.New()
	var b [5]byte
	binary.BigEndian.PutUint32(b[1:], index)
	h.Write(b[:]) // 0x00 || be32(i)
	h.Write(c)
	var out [Size]byte
	h.Sum(out[:0])
	return out
}

var padLeaf = sha256.Sum256([]byte{0x02})

func chunkNode(l, r [Size]byte) [Size]byte {
	var b [1 + 2*Size]byte
	b[0] = 0x01
	copy(b[1:], l[:])
	copy(b[1+Size:], r[:])
	return sha256.Sum256(b[:])
}

// chunkTree holds every level of the tree, leaves (padded to 2^depth) first.
type chunkTree struct{ levels [][][Size]byte }

func newChunkTree(leaves [][Size]byte) *chunkTree {
	depth := ChunkTreeDepth(uint32(len(leaves)))
	level := make([][Size]byte, 1<<depth)
	copy(level, leaves)
	for i := len(leaves); i < len(level); i++ {
		level[i] = padLeaf
	}
	t := &chunkTree{levels: [][][Size]byte{level}}
	for len(level) > 1 {
		up := make([][Size]byte, len(level)/2)
		for i := range up {
			up[i] = chunkNode(level[2*i], level[2*i+1])
		}
		t.levels = append(t.levels, up)
		level = up
	}
	return t
}

func (t *chunkTree) root() [Size]byte { return t.levels[len(t.levels)-1][0] }

// appendProof appends the proof of chunk index: its sibling at each level, leaves first.
func (t *chunkTree) appendProof(dst []byte, index uint32) []byte {
	for _, level := range t.levels[:len(t.levels)-1] {
		s := level[index^1]
		dst = append(dst, s[:]...)
		index >>= 1
	}
	return dst
}

// VerifyChunk checks that payload, as published on chunk topic index of an image of
// count chunks, is C_index followed by its proof under root, and returns C_index. It
// fails with ErrAuth for a chunk the release key did not authenticate and ErrMalformed
// for a payload too short to hold a proof and a tag ([SC-4.3]).
func VerifyChunk(root [Size]byte, count, index uint32, payload []byte) ([]byte, error) {
	if index >= count {
		return nil, fmt.Errorf("%w: chunk %d of %d", ErrMalformed, index, count)
	}
	depth := ChunkTreeDepth(count)
	n := len(payload) - depth*Size
	if n < TagSize {
		return nil, fmt.Errorf("%w: chunk %d is %d bytes, less than a tag and a proof of %d hashes", ErrMalformed, index, len(payload), depth)
	}
	c, proof := payload[:n], payload[n:]
	h := chunkLeaf(index, c)
	for i := range depth {
		var s [Size]byte
		copy(s[:], proof[i*Size:])
		if index>>i&1 == 0 {
			h = chunkNode(h, s)
		} else {
			h = chunkNode(s, h)
		}
	}
	if h != root {
		return nil, ErrAuth
	}
	return c, nil
}
