// Package keychain implements the cryptography of the Sealcast protocol: personalized
// unit data, the SHA-256 hash chain of one-time keys, the content-key envelope, the
// chunked streaming AEAD for images, the signed manifest, and the authenticated acks and
// receipts that move a device's sequence number.
//
// Every function here is pure: no I/O but the random source, and randomness only from
// crypto/rand. The byte layouts and labels are specified in docs/PROTOCOL.md; each exported
// label constant is spelled exactly as there, and the clause a check enforces is cited as
// [SC-x.y] next to it.
//
// # Keys
//
//   - [RootSecret] is the fleet secret; it never leaves the server.
//   - [DeriveUnitData] gives a device's [UnitData] for a chain epoch (claim 8).
//   - [Key] iterates the chain step n times to give the one-time [ChainKey] K_n (claims 4, 7);
//     the sequence number moves down after each confirmed update (claim 5).
//   - [Traversal] walks a chain downwards for the server at about log2(L)/2 hashes a step.
//
// # Messages
//
//   - [EncryptStream]/[DecryptStream] and [SealChunk]/[OpenChunk]: the image, encrypted once.
//   - [Manifest]: signed release metadata; [ParseManifest] verifies it.
//   - [KeyMessage]: the content key (or next unit data) sealed under a device's key.
//   - [Ack] and [Receipt]: the device's confirmation and the server's answer.
//
// All types are safe for concurrent use unless stated; [Traversal] is not.
package keychain
