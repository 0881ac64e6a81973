// Independent second implementation of the Sealcast v2 protocol (docs/PROTOCOL.md), written
// from the document alone, checked against keychain/testdata/vectors.json (section 11).
// Run from the repository root:  node --test scripts/interop/check-vectors.mjs
// Node 20, standard library only.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';

const V = JSON.parse(fs.readFileSync(new URL('../../keychain/testdata/vectors.json', import.meta.url), 'utf8'));

// ---- 2. Notation -------------------------------------------------------------------------
const hex = (b) => Buffer.from(b).toString('hex');
const unhex = (s) => Buffer.from(s, 'hex');
const cat = (...parts) => Buffer.concat(parts.map((p) => Buffer.from(p)));
const ascii = (s) => Buffer.from(s, 'ascii');
const be16 = (x) => { const b = Buffer.alloc(2); b.writeUInt16BE(x); return b; };
const be32 = (x) => { const b = Buffer.alloc(4); b.writeUInt32BE(x); return b; };
const be64 = (x) => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(x)); return b; };
const be88 = (x) => cat(Buffer.alloc(3), be64(x)); // 11 bytes; indices fit in 64 bits
const sha256 = (...m) => crypto.createHash('sha256').update(cat(...m)).digest();
const hmac = (k, ...m) => crypto.createHmac('sha256', k).update(cat(...m)).digest();

function gcmSeal(key, nonce, pt, ad) { // ciphertext || 16-byte tag
  const c = crypto.createCipheriv('aes-256-gcm', key, nonce, { authTagLength: 16 });
  c.setAAD(ad);
  return cat(c.update(pt), c.final(), c.getAuthTag());
}
function gcmOpen(key, nonce, sealed, ad) { // throws on any authentication failure
  if (sealed.length < 16) throw new Error('sealed too short');
  const d = crypto.createDecipheriv('aes-256-gcm', key, nonce, { authTagLength: 16 });
  d.setAAD(ad);
  d.setAuthTag(sealed.subarray(sealed.length - 16));
  return cat(d.update(sealed.subarray(0, sealed.length - 16)), d.final());
}

// 2.1 Labels
const L = {
  unitData: ascii('sealcast/v1 unit-data'), chainStep: ascii('sealcast/v1 chain-step'),
  wrap: ascii('sealcast/v1 wrap'), ack: ascii('sealcast/v1 ack'), receipt: ascii('sealcast/v1 receipt'),
  payload: ascii('sealcast/v1 payload'), manifest: ascii('sealcast/v1 manifest'),
  keyStatement: ascii('sealcast/v2 key-statement'),
  brokerAuth: ascii('sealcast/v1 broker-auth'), mqttPassword: ascii('sealcast/v1 mqtt-password'),
  rekey: ascii('sealcast/v2 rekey'), prefetch: ascii('sealcast/v2 prefetch'),
};

// [SC-2.1] serial syntax
const serialOK = (s) => /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(s);

// ---- 3. Key derivation ---------------------------------------------------------------------
// 3.2: U_0 from R; U_e = HMAC(U_{e-1}, "sealcast/v2 rekey" || T_e), T_e the re-key secret.
const rekeySecret = (R, e, S) => hmac(R, L.unitData, [0], be32(e), ascii(S));
const nextUnitData = (U, T) => hmac(U, L.rekey, T);
function unitData(R, e, S) {
  let U = rekeySecret(R, 0, S);
  for (let i = 1; i <= e; i++) U = nextUnitData(U, rekeySecret(R, i, S));
  return U;
}
function chainKey(U, n) {                                                            // 3.3
  let k = Buffer.from(U);
  for (let i = 0; i < n; i++) k = sha256(L.chainStep, k);
  return k;
}
const subkeys = (K) => ({ wk: hmac(K, L.wrap), ak: hmac(K, L.ack), rk: hmac(K, L.receipt), pk: hmac(K, L.prefetch) }); // 3.4
const brokerAuthKey = (R) => hmac(R, L.brokerAuth);                                  // 3.5
const mqttPassword = (A, S) => hmac(A, L.mqttPassword, [0], ascii(S)).toString('base64url'); // no padding

// ---- 4. Image encryption (STREAM) -------------------------------------------------------
const payloadKey = (CK, rid) => hmac(CK, L.payload, rid);
const chunkNonce = (i, last) => cat(be88(i), [last ? 1 : 0]);
const chunkCount = (size, cs) => Math.max(1, Math.ceil(size / cs));

function encryptImage(PK, image, cs) { // the ciphertexts C_i
  const n = chunkCount(image.length, cs), out = [];
  for (let i = 0; i < n; i++) {
    out.push(gcmSeal(PK, chunkNonce(i, i === n - 1), image.subarray(i * cs, (i + 1) * cs), Buffer.alloc(0)));
  }
  return out;
}

// 4.3 chunk tree: leaves bind index and ciphertext, padded to a power of two.
const treeDepth = (n) => { let d = 0; while ((1 << d) < n) d++; return d; };
const leafHash = (i, c) => sha256([0], be32(i), c);
const nodeHash = (l, r) => sha256([1], l, r);
const PAD = sha256([2]);
function chunkTree(cts) { // levels, leaves first
  const d = treeDepth(cts.length);
  let level = [];
  for (let i = 0; i < (1 << d); i++) level.push(i < cts.length ? leafHash(i, cts[i]) : PAD);
  const levels = [level];
  while (level.length > 1) {
    const up = [];
    for (let i = 0; i < level.length; i += 2) up.push(nodeHash(level[i], level[i + 1]));
    levels.push(up);
    level = up;
  }
  return levels;
}
const chunksRoot = (cts) => { const l = chunkTree(cts); return l[l.length - 1][0]; };
function chunkPayloads(cts) { // C_i || proof_i, as chunk topics carry them
  const levels = chunkTree(cts);
  return cts.map((c, i) => cat(c, ...levels.slice(0, -1).map((lv, k) => lv[(i >> k) ^ 1])));
}
// [SC-4.3] check payload i against the signed root before decrypting; returns C_i.
function verifyChunk(root, count, i, payload) {
  const d = treeDepth(count), n = payload.length - 32 * d;
  if (n < 16) throw new Error(`chunk ${i}: too short for a tag and a proof`);
  let h = leafHash(i, payload.subarray(0, n));
  for (let k = 0; k < d; k++) {
    const s = payload.subarray(n + 32 * k, n + 32 * (k + 1));
    h = ((i >> k) & 1) === 0 ? nodeHash(h, s) : nodeHash(s, h);
  }
  if (!h.equals(root)) throw new Error(`chunk ${i}: not in the chunk tree`);
  return payload.subarray(0, n);
}

// [SC-4.2] decryptor: chunk_count comes from the (signed) manifest, never from the chunks.
function decryptImage(PK, payloads, cs, count, root) {
  const parts = [];
  for (let i = 0; i < count; i++) {
    const last = i === count - 1;
    if (!payloads[i]) throw new Error(`chunk ${i}: missing`);
    const c = verifyChunk(root, count, i, payloads[i]);
    if (c.length > cs + 16) throw new Error(`chunk ${i}: bad length`);
    const p = gcmOpen(PK, chunkNonce(i, last), c, Buffer.alloc(0));
    if (!last && p.length !== cs) throw new Error(`chunk ${i}: short non-last chunk`);
    if (last && count > 1 && p.length === 0) throw new Error(`chunk ${i}: empty last chunk`);
    parts.push(p);
  }
  if (payloads.length !== count) throw new Error('extra chunks');
  return cat(...parts);
}

// ---- 5. Manifest --------------------------------------------------------------------------
function manifestBody(m) { // bytes[0:120]
  const b = cat(ascii('SCM2'), m.releaseId, be64(m.version), be64(m.created), be64(m.imageSize),
    be32(m.chunkSize), be32(m.chunkCount), m.imageSha256, m.chunksRoot, be32(m.keySeq));
  assert.equal(b.length, 120);
  return b;
}
function parseManifest(b) {
  if (b.length !== 184 || b.subarray(0, 4).toString('ascii') !== 'SCM2') throw new Error('bad manifest');
  return {
    releaseId: b.subarray(4, 20), version: b.readBigUInt64BE(20), created: b.readBigUInt64BE(28),
    imageSize: b.readBigUInt64BE(36), chunkSize: b.readUInt32BE(44), chunkCount: b.readUInt32BE(48),
    imageSha256: b.subarray(52, 84), chunksRoot: b.subarray(84, 116), keySeq: b.readUInt32BE(116),
    signature: b.subarray(120, 184),
  };
}
// Ed25519 keys from raw bytes via fixed DER prefixes (RFC 8410).
const SPKI_PREFIX = unhex('302a300506032b6570032100');
const PKCS8_PREFIX = unhex('302e020100300506032b657004220420');
const edPublic = (raw) => crypto.createPublicKey({ key: cat(SPKI_PREFIX, raw), format: 'der', type: 'spki' });
const edPrivate = (seed) => crypto.createPrivateKey({ key: cat(PKCS8_PREFIX, seed), format: 'der', type: 'pkcs8' });
const edRawPublic = (key) => crypto.createPublicKey(key).export({ format: 'der', type: 'spki' }).subarray(12);
const signManifest = (seed, body) => crypto.sign(null, cat(L.manifest, body), edPrivate(seed));
const verifyManifest = (pub, b) => crypto.verify(null, cat(L.manifest, b.subarray(0, 120)), edPublic(pub), b.subarray(120));
// [SC-5.2] a device's manifest check (device at key_seq k): framing, key, signature, then
// the field rules of 4.
function acceptManifest(pub, b, k = 0) {
  const m = parseManifest(b); // throws on length or magic
  if (m.keySeq !== k) throw new Error(m.keySeq < k ? 'retired key' : 'key not learned yet');
  if (!verifyManifest(pub, b)) throw new Error('bad manifest signature');
  if (m.version < 1n) throw new Error('manifest version 0');
  if (m.chunkSize < 1024 || m.chunkSize > 1048576) throw new Error('manifest chunk_size');
  const count = Math.max(1, Math.ceil(Number(m.imageSize) / m.chunkSize));
  if (m.chunkCount !== count) throw new Error('manifest chunk_count');
  return m;
}

// [SC-5.3] key statement n, verified under release key n-1
function parseKeyStatement(b, prevPub, n) {
  if (b.length !== 104 || b.subarray(0, 4).toString('ascii') !== 'SCS2') throw new Error('bad key statement');
  if (b.readUInt32BE(4) !== n) throw new Error('key statement of another seq');
  if (!crypto.verify(null, cat(L.keyStatement, b.subarray(0, 40)), edPublic(prevPub), b.subarray(40))) throw new Error('bad key statement signature');
  return b.subarray(8, 40);
}

// ---- 6. Key message -----------------------------------------------------------------------
const KIND_RELEASE = 1, KIND_REKEY = 2;
const keyHeader = (kind, e, n, id) => cat(ascii('SCK2'), [kind], be32(e), be32(n), id); // 29 bytes

// 6.1 + 6.2 / 6.3: bytes before the nonce are the associated data, followed by the serial.
function buildKeyMessage({ kind, epoch, seq, id, manifestDigest, newLength, nonce, secret }, U, S) {
  const pre = kind === KIND_RELEASE
    ? cat(keyHeader(kind, epoch, seq, id), manifestDigest)
    : cat(keyHeader(kind, epoch, seq, id), be32(newLength));
  const { wk } = subkeys(chainKey(U, seq));
  return cat(pre, nonce, gcmSeal(wk, nonce, secret, cat(pre, ascii(S))));
}
// Device side [SC-6.1]: check framing, then open `sealed` before trusting any other field.
function openKeyMessage(msg, U, S) {
  if (msg.length === 0) return null; // cleared retained topic: ignore
  if (msg.subarray(0, 4).toString('ascii') !== 'SCK2') throw new Error('bad_message');
  const kind = msg[4];
  const nonceOff = { [KIND_RELEASE]: 61, [KIND_REKEY]: 33 }[kind];
  const size = { [KIND_RELEASE]: 121, [KIND_REKEY]: 93 }[kind];
  if (!nonceOff || msg.length !== size) throw new Error('bad_message');
  const epoch = msg.readUInt32BE(5), seq = msg.readUInt32BE(9), id = msg.subarray(13, 29);
  const { wk } = subkeys(chainKey(U, seq));
  const secret = gcmOpen(wk, msg.subarray(nonceOff, nonceOff + 12), msg.subarray(nonceOff + 12),
    cat(msg.subarray(0, nonceOff), ascii(S)));
  const out = { kind, epoch, seq, id, nonce: msg.subarray(nonceOff, nonceOff + 12), secret };
  if (kind === KIND_RELEASE) out.manifestDigest = msg.subarray(29, 61);
  else out.newLength = msg.readUInt32BE(29);
  return out;
}

// ---- 7. Ack and report / 8. Receipt ---------------------------------------------------------
function buildAck({ kind, epoch, seq, id, version, deviceSeq, code }, U, S) {
  const body = cat(ascii('SCA2'), [kind], be32(epoch), be32(seq), id, be64(version), be32(deviceSeq), be16(code));
  return cat(body, hmac(subkeys(chainKey(U, seq)).ak, body, ascii(S)));
}
function parseAck(b, U, S) { // server side: MAC key from K_seq of the message's epoch (U = U_epoch)
  if (b.length !== 75 || b.subarray(0, 4).toString('ascii') !== 'SCA2') throw new Error('bad ack');
  const f = { kind: b[4], epoch: b.readUInt32BE(5), seq: b.readUInt32BE(9), id: b.subarray(13, 29),
    version: b.readBigUInt64BE(29), deviceSeq: b.readUInt32BE(37), code: b.readUInt16BE(41) };
  const mac = hmac(subkeys(chainKey(U, f.seq)).ak, b.subarray(0, 43), ascii(S));
  if (!crypto.timingSafeEqual(mac, b.subarray(43))) throw new Error('bad ack mac');
  return f;
}
function buildReceipt({ kind, epoch, seq, id, status }, U, S) {
  const body = cat(ascii('SCR2'), [kind], be32(epoch), be32(seq), id, [status]);
  return cat(body, hmac(subkeys(chainKey(U, seq)).rk, body, ascii(S)));
}
function parseReceipt(b, U, S) { // device side
  if (b.length !== 62 || b.subarray(0, 4).toString('ascii') !== 'SCR2') throw new Error('bad receipt');
  const f = { kind: b[4], epoch: b.readUInt32BE(5), seq: b.readUInt32BE(9), id: b.subarray(13, 29), status: b[29] };
  const mac = hmac(subkeys(chainKey(U, f.seq)).rk, b.subarray(0, 30), ascii(S));
  if (!crypto.timingSafeEqual(mac, b.subarray(30))) throw new Error('bad receipt mac');
  return f;
}

// ---- 6.4 Prefetch notice --------------------------------------------------------------------
function buildPrefetchNotice({ epoch, seq, id, manifestDigest, jitter }, U, S) {
  const body = cat(ascii('SCP2'), be32(epoch), be32(seq), id, manifestDigest, be32(jitter));
  return cat(body, hmac(subkeys(chainKey(U, seq)).pk, body, ascii(S)));
}
function parsePrefetchNotice(b, U, S) { // device side (9.3 step 1; the caller checks epoch and seq are its own)
  if (b.length !== 96 || b.subarray(0, 4).toString('ascii') !== 'SCP2') throw new Error('bad prefetch notice');
  const f = { epoch: b.readUInt32BE(4), seq: b.readUInt32BE(8), id: b.subarray(12, 28), manifestDigest: b.subarray(28, 60), jitter: b.readUInt32BE(60) };
  if (f.seq < 1) throw new Error('bad prefetch notice');
  const mac = hmac(subkeys(chainKey(U, f.seq)).pk, b.subarray(0, 64), ascii(S));
  if (!crypto.timingSafeEqual(mac, b.subarray(64))) throw new Error('bad prefetch notice mac');
  return f;
}

// ---- Vector inputs ---------------------------------------------------------------------------
const R = unhex(V.root_secret), S = V.serial;
const U0 = unitData(R, 0, S);
const rel = V.release;
const rid = unhex(rel.release_id), CK = unhex(rel.content_key), image = unhex(rel.image);
const chunks = rel.chunks.map(unhex), manifest = unhex(rel.manifest); // chunks: payloads with proofs
const ROOT = unhex(rel.chunks_root);
const AUTH = /unable to authenticate/; // node's AES-GCM tag-mismatch error
const flip = (b, i, bit = 1) => { const c = Buffer.from(b); c[i] ^= bit; return c; };

// ---- Tests ------------------------------------------------------------------------------------
test('2: serial syntax [SC-2.1]', () => {
  assert.ok(serialOK(S));
  for (const bad of ['', '-x', 'a b', 'a/b', 'a'.repeat(65), 'é']) assert.ok(!serialOK(bad), bad);
});

test('3.2: unit data per epoch', () => {
  for (const { epoch, unit_data } of V.unit_data) assert.equal(hex(unitData(R, epoch, S)), unit_data, `epoch ${epoch}`);
});

test('3.3: chain keys of epoch 0', () => {
  for (const { n, key } of V.chain_epoch0) assert.equal(hex(chainKey(U0, n)), key, `n=${n}`);
});

test('3.4: subkeys', () => {
  assert.equal(V.subkeys.epoch, 0);
  const k = subkeys(chainKey(U0, V.subkeys.n));
  assert.equal(hex(k.wk), V.subkeys.wrap_key);
  assert.equal(hex(k.ak), V.subkeys.ack_key);
  assert.equal(hex(k.rk), V.subkeys.receipt_key);
});

test('3.5: broker auth key and MQTT password', () => {
  const A = brokerAuthKey(R);
  assert.equal(hex(A), V.broker.broker_auth_key);
  const pw = mqttPassword(A, S);
  assert.equal(pw.length, 43);
  assert.equal(pw, V.broker.password);
});

test('4: payload key, chunk encryption, chunk tree and hashes', () => {
  const PK = payloadKey(CK, rid);
  assert.equal(hex(PK), rel.payload_key);
  const mine = encryptImage(PK, image, rel.chunk_size);
  assert.equal(mine.length, chunkCount(image.length, rel.chunk_size));
  assert.equal(hex(chunksRoot(mine)), rel.chunks_root);
  assert.deepEqual(chunkPayloads(mine).map(hex), rel.chunks);
  // 3 chunks: a tree of depth 2, so each payload is C_i and two hashes.
  for (let i = 0; i < mine.length; i++) assert.equal(chunks[i].length, mine[i].length + 64);
  assert.equal(hex(sha256(image)), rel.image_sha256);
  // [SC-4.2] decrypts back to the image
  assert.deepEqual(decryptImage(PK, chunks, rel.chunk_size, chunks.length, ROOT), image);
  // An empty image is one empty chunk of 16 bytes (tag only).
  const empty = encryptImage(PK, Buffer.alloc(0), rel.chunk_size);
  assert.equal(empty.length, 1);
  assert.equal(empty[0].length, 16);
  assert.equal(hex(empty[0]), rel.empty_image_chunk);
});

test('5: manifest body, signature, public key and digest', () => {
  const fields = {
    releaseId: rid, version: rel.version, created: rel.created, imageSize: image.length,
    chunkSize: rel.chunk_size, chunkCount: chunkCount(image.length, rel.chunk_size),
    imageSha256: unhex(rel.image_sha256), chunksRoot: unhex(rel.chunks_root), keySeq: 0,
  };
  const body = manifestBody(fields);
  assert.equal(manifest.length, 184);
  assert.equal(hex(manifest.subarray(0, 120)), hex(body));
  // parse round-trip
  const p = parseManifest(manifest);
  assert.equal(p.version, BigInt(rel.version));
  assert.equal(p.created, BigInt(rel.created));
  assert.equal(p.chunkCount, chunks.length);
  // public key from seed, signature verify, deterministic re-sign
  const seed = unhex(rel.signing_key_seed);
  const pub = edRawPublic(edPrivate(seed));
  assert.equal(hex(pub), rel.release_public_key);
  assert.ok(verifyManifest(unhex(rel.release_public_key), manifest));
  assert.equal(hex(signManifest(seed, body)), hex(manifest.subarray(120)));
  assert.ok(!verifyManifest(pub, flip(manifest, 20 + 7))); // tampered version
  assert.equal(hex(sha256(manifest)), rel.manifest_digest);
});

test('6.1/6.2: release key message', () => {
  const km = V.key_message_release;
  const fields = { kind: KIND_RELEASE, epoch: km.epoch, seq: km.seq, id: rid,
    manifestDigest: unhex(rel.manifest_digest), nonce: unhex(km.nonce), secret: CK };
  const U = unitData(R, km.epoch, S);
  const mine = buildKeyMessage(fields, U, S);
  assert.equal(mine.length, 121);
  assert.equal(hex(mine), km.message);
  const o = openKeyMessage(unhex(km.message), U, S);
  assert.equal(o.kind, KIND_RELEASE);
  assert.equal(o.epoch, km.epoch);
  assert.equal(o.seq, km.seq);
  assert.equal(hex(o.id), rel.release_id);
  assert.equal(hex(o.manifestDigest), rel.manifest_digest);
  assert.equal(hex(o.secret), rel.content_key);
  assert.equal(hex(payloadKey(o.secret, o.id)), rel.payload_key);
});

test('6.3: re-key message yields the re-key secret, and with U_0 the unit data of epoch 1', () => {
  const km = V.key_message_rekey;
  const U = unitData(R, km.epoch, S), T1 = rekeySecret(R, km.epoch + 1, S);
  assert.equal(hex(T1), km.secret);
  const fields = { kind: KIND_REKEY, epoch: km.epoch, seq: km.seq, id: unhex(km.rekey_id),
    newLength: km.new_length, nonce: unhex(km.nonce), secret: T1 };
  const mine = buildKeyMessage(fields, U, S);
  assert.equal(mine.length, 93);
  assert.equal(hex(mine), km.message);
  const o = openKeyMessage(unhex(km.message), U, S);
  assert.equal(o.kind, KIND_REKEY);
  assert.equal(o.seq, 1);
  assert.equal(o.newLength, km.new_length);
  assert.equal(hex(o.secret), km.secret);
  const U1 = nextUnitData(U, o.secret);
  assert.equal(hex(U1), km.next_unit_data);
  assert.equal(hex(U1), V.unit_data.find((x) => x.epoch === km.epoch + 1).unit_data);
  // Forward secrecy across the re-key: the secret carried is not the next unit data.
  assert.notEqual(hex(o.secret), km.next_unit_data);
});

// Each ack vector lists its expected fields and MAC key next to its bytes (11).
function checkAckVector(v, U) {
  const b = unhex(v.message);
  const ack = parseAck(b, U, S);
  assert.deepEqual({ ...ack, id: hex(ack.id) }, { kind: v.kind, epoch: v.epoch, seq: v.seq, id: v.id,
    version: BigInt(v.version), deviceSeq: v.device_seq, code: v.code });
  assert.equal(hex(subkeys(chainKey(U, v.seq)).ak), v.mac_key);
  assert.equal(hex(buildAck(ack, U, S)), v.message);
  return ack;
}

test('7: acks (installed, rekeyed) and reports (failed, stale_key, unhealthy): fields, MAC key, rebuild', () => {
  const km = V.key_message_release;
  const U = unitData(R, km.epoch, S);
  const ack = checkAckVector(V.ack_installed, U);
  assert.deepEqual([ack.kind, ack.seq, hex(ack.id), ack.deviceSeq], [1, km.seq, rel.release_id, km.seq - 1]);
  const rep = checkAckVector(V.report_failed, U);
  assert.equal(rep.kind, 3);
  assert.equal(rep.deviceSeq, km.seq); // unchanged
  assert.ok(rep.code >= 1 && rep.code <= 11, `code ${rep.code} is a 15.1 report code`);
  const st = checkAckVector(V.report_stale_key, U);
  // 10.1 step 2: a stale_key report (code 8) carries the device's own sequence number.
  assert.deepEqual([st.kind, st.code, st.seq, st.deviceSeq], [3, 8, km.seq, km.seq - 3]);
  const uh = checkAckVector(V.report_unhealthy, U);
  // 10.5 step 5: an unhealthy report (code 11) keeps D and carries the version the device
  // runs again, below the release's.
  assert.deepEqual([uh.kind, uh.code, uh.seq, uh.deviceSeq], [3, 11, km.seq, km.seq]);
  assert.ok(uh.version < ack.version, 'the unhealthy report carries the version the device went back to');
  const rk = checkAckVector(V.ack_rekeyed, U);
  // 10.1 step 5: a re-key ack answers the re-key message and carries the new length.
  assert.deepEqual([rk.kind, rk.seq, hex(rk.id), rk.deviceSeq],
    [2, V.key_message_rekey.seq, V.key_message_rekey.rekey_id, V.key_message_rekey.new_length]);
});

test('6.4: prefetch notice: fields, MAC key, rebuild', () => {
  const v = V.prefetch_notice, km = V.key_message_release;
  const U = unitData(R, v.epoch, S);
  const n = parsePrefetchNotice(unhex(v.message), U, S);
  assert.deepEqual([n.epoch, n.seq, hex(n.id), hex(n.manifestDigest), n.jitter], [v.epoch, v.seq, v.id, v.manifest_digest, v.jitter]);
  // At the position of the release's key message, naming the release and its signed manifest.
  assert.deepEqual([n.epoch, n.seq, hex(n.id)], [km.epoch, km.seq, rel.release_id]);
  assert.equal(hex(n.manifestDigest), hex(sha256(manifest)));
  assert.equal(hex(subkeys(chainKey(U, v.seq)).pk), v.mac_key);
  assert.equal(hex(buildPrefetchNotice(n, U, S)), v.message);
});

test('8: receipts (accepted, recorded): fields, MAC key, rebuild', () => {
  const U = unitData(R, V.key_message_release.epoch, S);
  for (const [v, answers, status] of [[V.receipt_accepted, V.ack_installed, 0], [V.receipt_recorded, V.report_failed, 1]]) {
    const rc = parseReceipt(unhex(v.message), U, S);
    // 10.1 step 7: kind, epoch, seq and id echo the ack
    assert.deepEqual([rc.kind, rc.epoch, rc.seq, hex(rc.id), rc.status], [answers.kind, answers.epoch, answers.seq, answers.id, status]);
    assert.deepEqual([v.kind, v.epoch, v.seq, v.id, v.status], [rc.kind, rc.epoch, rc.seq, hex(rc.id), rc.status]);
    assert.equal(hex(subkeys(chainKey(U, v.seq)).rk), v.mac_key);
    assert.equal(hex(buildReceipt(rc, U, S)), v.message);
  }
});

test('negative: tampering fails authentication', () => {
  const PK = payloadKey(CK, rid), cs = rel.chunk_size, n = chunks.length;
  const U = unitData(R, 0, S);
  const TREE = /not in the chunk tree/;
  const cts = encryptImage(PK, image, cs);
  // 4.3: a flipped bit in any chunk or proof, caught by the tree before decryption
  for (let i = 0; i < n; i++) {
    for (const off of [5, chunks[i].length - 1]) {
      const bad = chunks.map((c, j) => (j === i ? flip(c, off) : c));
      assert.throws(() => decryptImage(PK, bad, cs, n, ROOT), TREE, `chunk ${i} byte ${off}`);
    }
  }
  // 4.3: a co-target's forgery (valid AES-GCM under the payload key it knows) is refused
  const evil = gcmSeal(PK, chunkNonce(1, false), Buffer.alloc(cs, 0xee), Buffer.alloc(0));
  const forged = cat(evil, chunks[1].subarray(cts[1].length));
  assert.equal(gcmOpen(PK, chunkNonce(1, false), evil, Buffer.alloc(0)).length, cs); // GCM alone accepts it
  assert.throws(() => decryptImage(PK, [chunks[0], forged, chunks[2]], cs, n, ROOT), TREE);
  // 4: swapped chunk order, truncation, wrong last flag
  assert.throws(() => decryptImage(PK, [chunks[1], chunks[0], chunks[2]], cs, n, ROOT), TREE);
  assert.throws(() => decryptImage(PK, chunks.slice(0, 2), cs, 2, ROOT), TREE); // a tree of 2 has another shape
  // truncated, with a tree the attacker built over the first two: chunk 1 opened as last
  assert.throws(() => decryptImage(PK, chunkPayloads(cts.slice(0, 2)), cs, 2, chunksRoot(cts.slice(0, 2))), AUTH);
  assert.throws(() => gcmOpen(PK, chunkNonce(n - 1, false), cts[n - 1], Buffer.alloc(0)), AUTH);
  assert.throws(() => gcmOpen(PK, chunkNonce(0, true), cts[0], Buffer.alloc(0)), AUTH);
  // 6: a flipped bit anywhere in the key message (header, digest, nonce or sealed)
  const km = unhex(V.key_message_release.message);
  for (const off of [5, 12, 20, 40, 65, 80, 120]) assert.throws(() => openKeyMessage(flip(km, off), U, S), AUTH, `offset ${off}`);
  assert.throws(() => openKeyMessage(km, U, 'sensor-0002'), AUTH); // bound to the serial
  assert.throws(() => openKeyMessage(km.subarray(0, 120), U, S), /bad_message/);
  // [SC-1.1]: a message of protocol version 1 (magic "SCK1") is refused, whatever follows.
  assert.throws(() => openKeyMessage(cat(ascii('SCK1'), km.subarray(4)), U, S), /bad_message/);
  assert.equal(openKeyMessage(Buffer.alloc(0), U, S), null);
  // 7/8: flipped MAC bit, flipped field bit, other serial
  assert.throws(() => parseAck(flip(unhex(V.ack_installed.message), 60), U, S), /bad ack mac/);
  assert.throws(() => parseAck(flip(unhex(V.ack_installed.message), 40), U, S), /bad ack mac/);
  assert.throws(() => parseAck(unhex(V.ack_installed.message), U, 'sensor-0002'), /bad ack mac/);
  assert.throws(() => parseReceipt(flip(unhex(V.receipt_accepted.message), 29), U, S), /bad receipt mac/);
  assert.throws(() => parseReceipt(flip(unhex(V.receipt_accepted.message), 61), U, S), /bad receipt mac/);
});

// 11: each negative vector is refused with the conclusion the file gives.
test('11: negative vectors', () => {
  const U = unitData(R, 0, S), pub = unhex(rel.release_public_key);
  const PK = payloadKey(CK, rid);
  const conclude = (n) => {
    const b = unhex(n.message);
    const fails = (f) => { try { f(); return false; } catch { return true; } };
    switch (n.kind) {
      case 'key_message': {
        let headerOK = true;
        try { openKeyMessage(b, U, S); return 'accepted'; } catch (e) { headerOK = e.message !== 'bad_message'; }
        return headerOK ? 'unwrap_failed' : 'bad_message';
      }
      case 'manifest': return fails(() => acceptManifest(pub, b)) ? 'bad_manifest' : 'accepted';
      case 'chunk': {
        const count = chunks.length;
        return fails(() => {
          const c = verifyChunk(ROOT, count, n.index, b);
          gcmOpen(PK, chunkNonce(n.index, n.index === count - 1), c, Buffer.alloc(0));
        }) ? 'chunk_corrupt' : 'accepted';
      }
      case 'ack':
        try { parseAck(b, U, S); return 'accepted'; } catch (e) { return e.message === 'bad ack mac' ? 'forged' : 'malformed'; }
      case 'receipt': return fails(() => parseReceipt(b, U, S)) ? 'ignored' : 'accepted';
      case 'key_statement': return fails(() => parseKeyStatement(b, pub, 1)) ? 'ignored' : 'accepted';
      case 'prefetch_notice': return fails(() => parsePrefetchNotice(b, U, S)) ? 'ignored' : 'accepted';
    }
    throw new Error(`unknown kind ${n.kind}`);
  };
  assert.ok(V.negative.length >= 15);
  for (const n of V.negative) assert.equal(conclude(n), n.error, n.name);
});

test('5.1: key statement 1 and a manifest signed by release key 1', () => {
  const ks = V.key_statement, pub0 = unhex(rel.release_public_key);
  assert.equal(hex(edRawPublic(edPrivate(unhex(ks.next_key_seed)))), ks.next_public_key);
  const key1 = parseKeyStatement(unhex(ks.message), pub0, 1);
  assert.equal(hex(key1), ks.next_public_key);
  // Rebuilt from its fields, deterministically signed by key 0.
  const body = cat(ascii('SCS2'), be32(1), key1);
  const sig = crypto.sign(null, cat(L.keyStatement, body), edPrivate(unhex(rel.signing_key_seed)));
  assert.equal(hex(cat(body, sig)), ks.message);
  const rotated = unhex(V.rotated_manifest);
  assert.equal(acceptManifest(key1, rotated, 1).keySeq, 1);
  assert.throws(() => acceptManifest(key1, rotated, 0), /not learned yet/); // the device waits
  assert.throws(() => acceptManifest(pub0, manifest, 1), /retired key/);    // key 0 retired
});
