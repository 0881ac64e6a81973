package keychain

import (
	"bufio"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
)

// Chunk sizes (PROTOCOL.md 4).
const (
	MinChunkSize     = 1024
	MaxChunkSize     = 1 << 20
	DefaultChunkSize = 64 << 10
	// TagSize is the AES-GCM tag appended to every chunk.
	TagSize = 16
)

var (
	// ErrTruncated is returned when an encrypted stream ends before its last chunk.
	ErrTruncated = errors.New("keychain: encrypted image is truncated: the last chunk is missing")
	// ErrTrailingData is returned when data follows the last chunk of an encrypted stream.
	ErrTrailingData = errors.New("keychain: data after the last chunk of the encrypted image")
)

// ChunkCount returns max(1, ceil(size/chunkSize)), the number of chunks of an image
// ([SC-4.1]). It fails for a chunk size out of range or a count that does not fit 32 bits.
func ChunkCount(size uint64, chunkSize uint32) (uint32, error) {
	if chunkSize < MinChunkSize || chunkSize > MaxChunkSize {
		return 0, fmt.Errorf("%w: chunk size %d is outside %d..%d", ErrMalformed, chunkSize, MinChunkSize, MaxChunkSize)
	}
	n := size / uint64(chunkSize)
	if size%uint64(chunkSize) != 0 || size == 0 {
		n++
	}
	if n > 1<<32-1 {
		return 0, fmt.Errorf("%w: image of %d bytes needs more than 2^32-1 chunks of %d bytes", ErrMalformed, size, chunkSize)
	}
	return uint32(n), nil
}

func newGCM(key [Size]byte) cipher.AEAD {
	b, err := aes.NewCipher(key[:])
	if err != nil {
		panic("keychain: aes.NewCipher: " + err.Error()) // unreachable: the key is 32 bytes
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		panic("keychain: cipher.NewGCM: " + err.Error()) // unreachable for AES
	}
	return g
}

// chunkNonce is be88(index) || last ([SC-4.2]).
func chunkNonce(index uint32, last bool) [12]byte {
	var n [12]byte
	binary.BigEndian.PutUint32(n[7:11], index)
	if last {
		n[11] = 1
	}
	return n
}

// ChunkCipher seals and opens the chunks of one release's image under its payload key.
// It is safe for concurrent use.
type ChunkCipher struct {
	aead cipher.AEAD
}

// NewChunkCipher returns a ChunkCipher for the payload key pk (see ContentKey.PayloadKey).
func NewChunkCipher(pk [Size]byte) *ChunkCipher { return &ChunkCipher{aead: newGCM(pk)} }

// Seal appends the encryption of chunk index (last marks the final chunk) to dst.
func (c *ChunkCipher) Seal(dst []byte, index uint32, last bool, plaintext []byte) []byte {
	n := chunkNonce(index, last)
	return c.aead.Seal(dst, n[:], plaintext, nil)
}

// Open appends the plaintext of chunk index of an image of count chunks of chunkSize bytes
// to dst. It enforces the size rules of [SC-4.2] and fails with ErrAuth for a chunk that
// does not authenticate at this index and position. No plaintext is returned on failure.
func (c *ChunkCipher) Open(dst []byte, index, count, chunkSize uint32, ciphertext []byte) ([]byte, error) {
	if index >= count {
		return nil, fmt.Errorf("%w: chunk %d of an image of %d chunks", ErrMalformed, index, count)
	}
	last := index == count-1
	pl := len(ciphertext) - TagSize
	switch {
	case pl < 0 || pl > int(chunkSize):
		return nil, fmt.Errorf("%w: chunk %d is %d bytes; at most %d allowed", ErrMalformed, index, len(ciphertext), int(chunkSize)+TagSize)
	case !last && pl != int(chunkSize):
		return nil, fmt.Errorf("%w: chunk %d is not the last but holds %d bytes, not %d", ErrMalformed, index, pl, chunkSize)
	case last && pl == 0 && count > 1:
		return nil, fmt.Errorf("%w: last chunk %d is empty", ErrMalformed, index)
	}
	n := chunkNonce(index, last)
	out, err := c.aead.Open(dst, n[:], ciphertext, nil)
	if err != nil {
		return nil, ErrAuth
	}
	return out, nil
}

// Summary describes an encrypted image; it is what a Manifest records about it.
type Summary struct {
	ImageSize   uint64
	ChunkSize   uint32
	ChunkCount  uint32
	ImageSHA256 [32]byte
	// ChunksRoot is the root of the chunk tree (PROTOCOL.md 4.3).
	ChunksRoot [32]byte
}

// EncryptChunks encrypts the image of size bytes that r holds and calls emit with each
// chunk's payload as a chunk topic carries it, C_i followed by its proof (4.3), in order.
// The payload slice is reused after emit returns. It reads the image twice: once to build
// the chunk tree, whose root the manifest signs, and once to publish (the nonces are
// deterministic, so both reads seal the same ciphertext; an image that changed between
// them yields chunks every device refuses). Memory use is two chunks and 64 bytes a
// chunk for the tree. This is the server's encrypt-once path.
func EncryptChunks(r io.ReaderAt, size int64, pk [Size]byte, chunkSize uint32, emit func(index uint32, payload []byte) error) (Summary, error) {
	if size < 0 {
		return Summary{}, fmt.Errorf("%w: image size %d", ErrMalformed, size)
	}
	count, err := ChunkCount(uint64(size), chunkSize)
	if err != nil {
		return Summary{}, err
	}
	c := NewChunkCipher(pk)
	plain := make([]byte, chunkSize)
	out := make([]byte, 0, int(chunkSize)+TagSize+ChunkTreeDepth(count)*Size)
	// seal reads chunk i and appends its ciphertext to out[:0].
	seal := func(i uint32) ([]byte, []byte, error) {
		off := int64(i) * int64(chunkSize)
		n := min(int64(chunkSize), size-off)
		p := plain[:n]
		if k, err := r.ReadAt(p, off); k < len(p) {
			return nil, nil, fmt.Errorf("keychain: reading image chunk %d: %d of %d bytes: %w", i, k, len(p), err)
		}
		return p, c.Seal(out[:0], i, i == count-1, p), nil
	}
	leaves := make([][Size]byte, count)
	plainHash := sha256.New()
	for i := range count {
		p, ct, err := seal(i)
		if err != nil {
			return Summary{}, err
		}
		plainHash.Write(p)
		leaves[i] = chunkLeaf(i, ct)
	}
	tree := newChunkTree(leaves)
	for i := range count {
		_, ct, err := seal(i)
		if err != nil {
			return Summary{}, err
		}
		if err := emit(i, tree.appendProof(ct, i)); err != nil {
			return Summary{}, err
		}
	}
	s := Summary{ImageSize: uint64(size), ChunkSize: chunkSize, ChunkCount: count, ChunksRoot: tree.root()}
	plainHash.Sum(s.ImageSHA256[:0])
	return s, nil
}

// EncryptStream returns a writer that encrypts what is written to it and writes the
// concatenated chunks C_0 || C_1 || ... to w. Close must be called to write the last chunk;
// it does not close w. Memory use is one chunk.
func EncryptStream(w io.Writer, pk [Size]byte, chunkSize uint32) (io.WriteCloser, error) {
	if _, err := ChunkCount(0, chunkSize); err != nil {
		return nil, err
	}
	return &streamWriter{w: w, c: NewChunkCipher(pk), buf: make([]byte, 0, int(chunkSize)+TagSize), size: int(chunkSize)}, nil
}

type streamWriter struct {
	w      io.Writer
	c      *ChunkCipher
	buf    []byte // plaintext of the pending chunk; sealed in place
	size   int
	index  uint32
	err    error
	closed bool
}

func (s *streamWriter) Write(p []byte) (int, error) {
	if s.closed {
		return 0, errors.New("keychain: write to a closed encrypting stream")
	}
	if s.err != nil {
		return 0, s.err
	}
	total := len(p)
	for len(p) > 0 {
		// A full buffer is flushed only when more data arrives: the last chunk must be
		// sealed with the last flag, and only Close knows which chunk is last.
		if len(s.buf) == s.size {
			if s.err = s.flush(false); s.err != nil {
				return total - len(p), s.err
			}
		}
		n := copy(s.buf[len(s.buf):s.size], p)
		s.buf = s.buf[:len(s.buf)+n]
		p = p[n:]
	}
	return total, nil
}

func (s *streamWriter) flush(last bool) error {
	if !last && s.index == 1<<32-2 {
		return fmt.Errorf("%w: image needs more than 2^32-1 chunks", ErrMalformed)
	}
	out := s.c.Seal(s.buf[:0], s.index, last, s.buf)
	if _, err := s.w.Write(out); err != nil {
		return fmt.Errorf("keychain: writing encrypted chunk %d: %w", s.index, err)
	}
	s.index++
	s.buf = s.buf[:0]
	return nil
}

func (s *streamWriter) Close() error {
	if s.closed {
		return s.err
	}
	s.closed = true
	if s.err != nil {
		return s.err
	}
	s.err = s.flush(true)
	return s.err
}

// DecryptStream returns a reader of the plaintext of the concatenated chunks read from r.
// Each chunk is authenticated before any of its bytes are returned; a truncated stream
// fails with ErrTruncated or ErrAuth, a reordered, substituted or modified chunk with
// ErrAuth, and data after the last chunk with ErrTrailingData. Memory use is one chunk.
func DecryptStream(r io.Reader, pk [Size]byte, chunkSize uint32) (io.Reader, error) {
	if _, err := ChunkCount(0, chunkSize); err != nil {
		return nil, err
	}
	return &streamReader{
		r:     bufio.NewReaderSize(r, 4096),
		c:     NewChunkCipher(pk),
		in:    make([]byte, int(chunkSize)+TagSize),
		plain: make([]byte, 0, int(chunkSize)),
		size:  int(chunkSize),
	}, nil
}

type streamReader struct {
	r     *bufio.Reader
	c     *ChunkCipher
	in    []byte
	plain []byte // plaintext buffer, separate from in so a failed open leaves in intact
	out   []byte // unread plaintext of the current chunk
	size  int
	index uint32
	done  bool
	err   error
}

func (s *streamReader) Read(p []byte) (int, error) {
	for len(s.out) == 0 {
		if s.err != nil {
			return 0, s.err
		}
		if s.done {
			return 0, io.EOF
		}
		s.err = s.next()
	}
	n := copy(p, s.out)
	s.out = s.out[n:]
	return n, nil
}

func (s *streamReader) next() error {
	n, err := io.ReadFull(s.r, s.in)
	switch {
	case err == io.EOF:
		// A stream ends only with a chunk sealed as last.
		return ErrTruncated
	case err != nil && err != io.ErrUnexpectedEOF:
		return fmt.Errorf("keychain: reading encrypted chunk %d: %w", s.index, err)
	}
	ct := s.in[:n]
	// The chunk is last if nothing follows it.
	last := n < len(s.in)
	if !last {
		if _, perr := s.r.Peek(1); perr == io.EOF {
			last = true
		} else if perr != nil {
			return fmt.Errorf("keychain: reading encrypted chunk %d: %w", s.index+1, perr)
		}
	}
	if n < TagSize {
		return ErrTruncated
	}
	if last && n == TagSize && s.index > 0 {
		return fmt.Errorf("%w: last chunk %d is empty", ErrMalformed, s.index)
	}
	nonce := chunkNonce(s.index, last)
	out, oerr := s.c.aead.Open(s.plain[:0], nonce[:], ct, nil)
	if oerr != nil {
		// A full chunk that opens as non-last at the end of the stream: chunks are missing.
		if last && n == len(s.in) {
			alt := chunkNonce(s.index, false)
			if _, again := s.c.aead.Open(s.plain[:0], alt[:], ct, nil); again == nil {
				return ErrTruncated
			}
		}
		return ErrAuth
	}
	s.out = out
	s.index++
	if last {
		s.done = true
	} else if s.index == 0 {
		return fmt.Errorf("%w: more than 2^32-1 chunks", ErrMalformed)
	}
	return nil
}

// ImageDecryptor opens the chunks of one image in order against its manifest, as a device
// fetching chunk topics does: each chunk is authenticated by the chunk tree whose root the
// manifest signs before it is decrypted, and the image hash is checked at the end. Its
// hash state can be saved with MarshalBinary so a restarted device resumes where it
// stopped. It is not safe for concurrent use.
type ImageDecryptor struct {
	c                 *ChunkCipher
	count, size, next uint32
	imageSize         uint64
	done              uint64
	plainHash         hash.Hash
	wantPlain, root   [32]byte
}

// NewImageDecryptor returns a decryptor for the image that m describes, under the payload
// key of the release's content key.
func NewImageDecryptor(pk [Size]byte, m *Manifest) *ImageDecryptor {
	return &ImageDecryptor{
		c: NewChunkCipher(pk), count: m.ChunkCount, size: m.ChunkSize, imageSize: m.ImageSize,
		plainHash: sha256.New(), wantPlain: m.ImageSHA256, root: m.ChunksRoot,
	}
}

// Next returns the index of the next chunk to open, or ChunkCount when all are open.
func (d *ImageDecryptor) Next() uint32 { return d.next }

// Open authenticates the payload of chunk index (C_i and its proof, 4.3), which must be
// Next(), by the chunk tree and then by AES-GCM, and appends its plaintext to dst. No
// plaintext comes out of a chunk that fails either.
func (d *ImageDecryptor) Open(dst []byte, index uint32, payload []byte) ([]byte, error) {
	if index != d.next {
		return nil, fmt.Errorf("keychain: chunk %d opened out of order: expected %d", index, d.next)
	}
	ciphertext, err := VerifyChunk(d.root, d.count, index, payload)
	if err != nil {
		return nil, err
	}
	start := len(dst)
	out, err := d.c.Open(dst, index, d.count, d.size, ciphertext)
	if err != nil {
		return nil, err
	}
	d.plainHash.Write(out[start:])
	d.done += uint64(len(out) - start)
	d.next++
	return out, nil
}

// Finish checks, after the last chunk, that the image size and hash match the manifest.
// A mismatch is ErrAuth: the image must not be installed.
func (d *ImageDecryptor) Finish() error {
	if d.next != d.count {
		return fmt.Errorf("%w: %d of %d chunks opened", ErrTruncated, d.next, d.count)
	}
	var p [32]byte
	d.plainHash.Sum(p[:0])
	if d.done != d.imageSize || p != d.wantPlain {
		return ErrAuth
	}
	return nil
}

// MarshalBinary saves the progress (next index, byte count and hash state).
func (d *ImageDecryptor) MarshalBinary() ([]byte, error) {
	ph, err := d.plainHash.(interface{ MarshalBinary() ([]byte, error) }).MarshalBinary()
	if err != nil {
		return nil, err
	}
	b := binary.BigEndian.AppendUint32(nil, d.next)
	b = binary.BigEndian.AppendUint64(b, d.done)
	return append(b, ph...), nil
}

// UnmarshalBinary restores progress saved by MarshalBinary for the same manifest.
func (d *ImageDecryptor) UnmarshalBinary(b []byte) error {
	if len(b) < 12 {
		return fmt.Errorf("%w: decryptor state of %d bytes", ErrMalformed, len(b))
	}
	next := binary.BigEndian.Uint32(b)
	done := binary.BigEndian.Uint64(b[4:])
	if next > d.count {
		return fmt.Errorf("%w: decryptor state", ErrMalformed)
	}
	ph := sha256.New()
	if err := ph.(interface{ UnmarshalBinary([]byte) error }).UnmarshalBinary(b[12:]); err != nil {
		return fmt.Errorf("%w: decryptor state: %v", ErrMalformed, err)
	}
	d.next, d.done, d.plainHash = next, done, ph
	return nil
}
