package redisstore

import "github.com/redis/go-redis/v9"

// Each script touches the keys of one device, or of one release, which share a hash tag and
// so one Cluster slot. Epoch and seq are stored as canonical decimal strings (strconv), so
// the compare-and-set is a string comparison. A missing hash reads as false and never
// compares equal: no script creates a device except createScript.

// createScript: KEYS[1] device; ARGV field, value, ... Returns 1 if created, 0 if it existed.
var createScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
`)

// assignScript: KEYS[1] device; ARGV epoch, seq, id (16 raw bytes), state.
// [SC-10.2] Records that id was wrapped at (epoch, seq) if the device is still there.
var assignScript = redis.NewScript(`
local p = redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'assigned')
if p[1] ~= ARGV[1] or p[2] ~= ARGV[2] then return 0 end
local a = p[3] or ''
for i = 1, #a, 16 do
  if string.sub(a, i, i + 15) == ARGV[3] then
    redis.call('HSET', KEYS[1], 'state', ARGV[4])
    return 1
  end
end
redis.call('HSET', KEYS[1], 'assigned', a .. ARGV[3], 'state', ARGV[4])
return 1
`)

// advanceScript: KEYS[1] device; ARGV from epoch, from seq, then the fields to set.
// [SC-10.2] The one compare-and-set that moves a counter; it clears the assignment, which
// belonged to the old position.
var advanceScript = redis.NewScript(`
local p = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
if p[1] ~= ARGV[1] or p[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'epoch', ARGV[3], 'seq', ARGV[4], 'chain_length', ARGV[5],
  'version', ARGV[6], 'chain', ARGV[7], 'last_ack', ARGV[8], 'last_receipt', ARGV[9],
  'state', ARGV[10], 'last_result', ARGV[11], 'last_seen', ARGV[12], 'assigned', '')
return 1
`)

// AdvanceScriptHash returns the SHA-1 of the script Advance runs, under which Redis caches
// it (EVALSHA), so that its raw rate can be measured with redis-benchmark on a server
// where Advance has run.
func AdvanceScriptHash() string { return advanceScript.Hash() }

// noteScript: KEYS[1] device; ARGV state, last result (empty: unchanged), last seen.
var noteScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'state', ARGV[1]) end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'last_result', ARGV[2]) end
redis.call('HSET', KEYS[1], 'last_seen', ARGV[3])
return 1
`)

// recordScript: KEYS[1] release, KEYS[2] its results; ARGV serial, result, and the
// install-time field to count an install in ("" for none). Returns -1 if the release
// does not exist, 0 if the device's result was already final, else 1. Installed is
// final; failed -> installed moves the count; a repeated failure counts once.
var recordScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old == 'installed' then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if ARGV[2] == 'installed' then
  redis.call('HINCRBY', KEYS[1], 'installed', 1)
  if ARGV[3] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[3], 1) end
  if old then redis.call('HINCRBY', KEYS[1], 'failed', -1) end
elseif not old then
  redis.call('HINCRBY', KEYS[1], 'failed', 1)
end
return 1
`)

// removeTargetScript removes a serial from a release's targets (KEYS[2]) with its result
// (KEYS[3]) and that result's share of the counts in the release hash (KEYS[1]). It
// returns -1 if the release does not exist, else whether the serial was a target.
var removeTargetScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local was = redis.call('SREM', KEYS[2], ARGV[1])
local old = redis.call('HGET', KEYS[3], ARGV[1])
if old then
  redis.call('HDEL', KEYS[3], ARGV[1])
  if old == 'installed' then
    redis.call('HINCRBY', KEYS[1], 'installed', -1)
  else
    redis.call('HINCRBY', KEYS[1], 'failed', -1)
  end
end
return was
`)

// tagsScript: KEYS[1] device; ARGV the tags, formatted. Returns 0 for a missing device.
var tagsScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'tags', ARGV[1])
return 1
`)
