#!/usr/bin/env node
// One node of a clustered MQTT 3.1.1 broker for Sealcast: aedes, with its state in Redis.
//
// # The cluster model
//
// Any number of these processes, each listening on its own address, share one Redis:
//
//   - aedes-persistence-redis keeps, in Redis, the retained messages, the subscriptions of
//     persistent sessions (clean session = false), their QoS 1 queues of messages that
//     arrived while the client was offline, and the will of every connected client. A
//     device can therefore reconnect to any node and find its session there.
//   - mqemitter-redis routes every PUBLISH through Redis pub/sub, so that a message
//     published on one node reaches the subscribers connected to every node. Nodes also
//     tell each other, through it, of new subscriptions of persistent sessions and of
//     client ids that connect (the node holding an older connection with that client id
//     closes it: session takeover works across nodes).
//
// Nothing is kept only in one node's memory except live connections and clean sessions
// (their subscriptions and the messages in flight to them); a node that crashes loses
// only those, and its clients reconnect to another node (put the nodes behind a TCP load
// balancer, or give devices several broker addresses).
//
// Keys and pub/sub channels carry no prefix, and Redis pub/sub ignores the database
// number: give each cluster a Redis server of its own.
//
// # Running two nodes
//
//   npm ci --prefix deploy/aedes
//   node deploy/aedes/broker.js --id a --port 1883 --redis redis://127.0.0.1:6379/0 --users users.json &
//   node deploy/aedes/broker.js --id b --port 1884 --redis redis://127.0.0.1:6379/0 --users users.json &
//   sealcast serve ... -external-broker tcp://127.0.0.1:1883 -broker-user sealcast-updater ...
//
// Flags: --host (127.0.0.1), --port (1883), --redis URL (required), --id NAME (for logs;
// default node), --users FILE (no file: every client may connect and do anything, for
// load tests), --max-packet-size BYTES (1052672), --heartbeat-interval MS (60000; see
// "Wills" below). It prints "aedes <id> listening on <host>:<port>" on stdout once it
// listens, logs to stderr, re-reads FILE on SIGHUP and exits cleanly on SIGTERM/SIGINT.
//
// # Accounts and access rules (--users FILE)
//
// FILE is JSON: {"users": {"<name>": {"password_sha256": "<hex>", "role": "device|updater|
// admin|monitor"}}}, the hash being of the password alone (printf %s "$PW" | sha256sum).
// SHA-256 is fast and unsalted: right for device passwords (256 random bits, derived
// from the root secret, PROTOCOL.md 3.5), whose check runs at every reconnect of a
// fleet, and wrong for a password a person chose. Give every account a long random
// password (openssl rand -base64 24), and keep FILE as secret as the passwords.
// The rules are the embedded broker's (broker/acl.go, PROTOCOL.md 9.2)
// and deploy/mosquitto/sealcast.acl's:
//
//   device U  reads sealcast/releases/#, sealcast/keys/+, sealcast/devices/U/{key,receipt,
//             prefetch}; publishes only sealcast/devices/U/{ack,state,presence}. It must
//             connect with client id U. No other client may use U as its client id.
//   updater   reads and publishes everything under sealcast/#.
//   admin     publishes sealcast/admin/#; reads # (which, as in MQTT, does not match $SYS).
//   monitor   reads sealcast/status/#, sealcast/devices/+/state, sealcast/devices/+/presence.
//
// Reads work as in mosquitto: a SUBSCRIBE is granted when its filter can match some topic
// the client may read (else its SUBACK code is 0x80), and every delivery is checked
// (aedes's authorizeForward): a device subscribed to sealcast/devices/+/key receives its
// own key and nobody else's. A forbidden PUBLISH, or a retained one on a topic Sealcast
// never retains (sealcast/devices/+/ack, sealcast/admin/#), closes the connection: aedes
// has no other way to refuse one (MQTT 3.1.1 has no negative PUBACK; the embedded broker
// does the same at QoS 1, and drops at QoS 0). The will of a CONNECT is checked against
// the same rules: a will a client may not publish refuses the CONNECT (not authorized).
// A user removed from FILE (then SIGHUP) keeps its connection but may no longer publish
// or receive anything.
//
// Without FILE every client may do anything, except publish to $SYS/ topics or have a
// will there (nobody may: aedes nodes talk to each other on $SYS/ topics, for instance to
// close the connection of a client id that connected to another node).
//
// # What aedes (0.51) does not do, that Sealcast can use
//
//   - MQTT 5: aedes 0.51 speaks MQTT 3.1 and 3.1.1 only (a v5 CONNECT is refused with
//     "unacceptable protocol version"). Sealcast's devices and updater use 3.1.1.
//   - Shared subscriptions ($share/{group}/{filter}): not supported. aedes would take the
//     filter literally and deliver nothing, so this broker refuses them (SUBACK 0x80)
//     and `sealcast serve -ack-group` fails loudly at start. Run a single updater against
//     this cluster, or several without -ack-group (each then receives every ack; the
//     store's compare-and-set keeps that correct, at the cost of repeated work).
//   - A maximum packet size: neither aedes nor mqtt-packet has one (a client may announce
//     256 MiB and aedes buffers it). This file adds one (--max-packet-size): a PUBLISH whose
//     payload is larger, or any other packet whose remaining length is larger, closes the
//     connection as soon as its header is read, before it is buffered. The limit is on the
//     payload so that a payload of exactly 1 MiB + 4 KiB passes; mosquitto's and mochi's
//     max_packet_size count the topic and headers too, about 100 bytes more for Sealcast.
//   - Per-client queue limits: aedes has no max_inflight_messages/max_queued_messages;
//     the offline queue of a persistent session is bounded only by Redis memory, and at
//     most 1000 queued messages are sent at a reconnect (maxSessionDelivery).
//   - PUBACK after storing: aedes sends PUBACK before the message is stored (retained) or
//     queued for offline sessions; a node that crashes in between loses the message.
//   - Wills: the wills of the clients of a crashed node are published by another node
//     3 to 7 heartbeat intervals later (aedes's heartbeats, --heartbeat-interval: 3 to 7
//     minutes by default), by every surviving node that notices. And aedes publishes the
//     will of a connection whose session a new connection takes over, possibly after
//     the new connection has published its presence "online". So that a device that is
//     connected is not left reported "offline", this file skips a will when the session
//     has been taken over, or the client has connected again since, to any node (a Redis
//     hash, sealcast:aedes:connected, maps each connected client id to its node), as the
//     embedded broker does for takeovers (broker/takeover.go).

'use strict'

const { parseArgs } = require('node:util')
const crypto = require('node:crypto')
const fs = require('node:fs')
const net = require('node:net')
const Redis = require('ioredis')
const aedesFactory = require('aedes')
const aedesPersistenceRedis = require('aedes-persistence-redis')
const mqemitterRedis = require('mqemitter-redis')

const DEFAULT_MAX_PACKET_SIZE = 1052672 // 1 MiB + 4 KiB, PROTOCOL.md 9
const ROLES = new Set(['device', 'updater', 'admin', 'monitor'])
// A Redis hash: client id -> id of the aedes node it is connected to (see "Wills").
const CONNECTED_KEY = 'sealcast:aedes:connected'

function log (...args) {
  console.error(new Date().toISOString(), `aedes ${opts.id}:`, ...args)
}

function fatal (msg) {
  console.error(`broker.js: ${msg}`)
  process.exit(2)
}

// ---- flags

let opts
{
  let values
  try {
    ({ values } = parseArgs({
      options: {
        host: { type: 'string', default: '127.0.0.1' },
        port: { type: 'string', default: '1883' },
        redis: { type: 'string' },
        id: { type: 'string', default: 'node' },
        users: { type: 'string' },
        'max-packet-size': { type: 'string', default: String(DEFAULT_MAX_PACKET_SIZE) },
        'heartbeat-interval': { type: 'string', default: '60000' }
      },
      strict: true,
      allowPositionals: false
    }))
  } catch (err) {
    fatal(err.message)
  }
  const int = (name, min, max) => {
    const s = values[name]
    const n = Number(s)
    if (!/^\d+$/.test(s) || n < min || n > max) fatal(`--${name} ${s}: want an integer in [${min}, ${max}]`)
    return n
  }
  if (!values.redis) fatal('--redis redis://host:port/db is required')
  if (!/^rediss?:\/\//.test(values.redis)) fatal(`--redis ${values.redis}: want a redis:// or rediss:// URL`)
  if (!/^[A-Za-z0-9._-]+$/.test(values.id)) fatal(`--id ${values.id}: use letters, digits, '.', '_' and '-'`)
  opts = {
    host: values.host,
    port: int('port', 0, 65535),
    redis: values.redis,
    id: values.id,
    users: values.users,
    maxPacketSize: int('max-packet-size', 1024, 268435455),
    heartbeatInterval: int('heartbeat-interval', 100, 3600000)
  }
}

// ---- accounts

// loadUsers reads FILE into a Map name -> {hash: Buffer, role}. It throws on any error.
function loadUsers (file) {
  const doc = JSON.parse(fs.readFileSync(file, 'utf8'))
  if (!doc || typeof doc.users !== 'object' || doc.users === null) throw new Error(`${file}: no "users" object`)
  const users = new Map()
  for (const [name, u] of Object.entries(doc.users)) {
    if (!u || !ROLES.has(u.role)) throw new Error(`${file}: user ${JSON.stringify(name)}: role must be one of ${[...ROLES].join(', ')}`)
    if (typeof u.password_sha256 !== 'string' || !/^[0-9a-fA-F]{64}$/.test(u.password_sha256)) {
      throw new Error(`${file}: user ${JSON.stringify(name)}: password_sha256 must be 64 hex digits`)
    }
    // A device's name is a topic level (sealcast/devices/{name}/...) and its client id.
    if (u.role === 'device' && (name === '' || /[/+#\0]/.test(name))) {
      throw new Error(`${file}: device ${JSON.stringify(name)}: a device name cannot be empty or contain / + #`)
    }
    users.set(name, { hash: Buffer.from(u.password_sha256, 'hex'), role: u.role })
  }
  return users
}

let users = null // null: no --users, everyone may do anything
if (opts.users) {
  try {
    users = loadUsers(opts.users)
  } catch (err) {
    fatal(`--users: ${err.message}`)
  }
}

// ---- topic matching (MQTT 3.1.1, 4.7)

// matches reports whether topic name t matches filter f. '#' also matches the parent
// level (a/# matches a); a topic starting with '$' matches no filter starting with a
// wildcard.
function matches (t, f) {
  const tl = t.split('/')
  const fl = f.split('/')
  if (t.startsWith('$') && (fl[0] === '+' || fl[0] === '#')) return false
  for (let i = 0; i < fl.length; i++) {
    if (fl[i] === '#') return true
    if (i >= tl.length) return false
    if (fl[i] !== '+' && fl[i] !== tl[i]) return false
  }
  return tl.length === fl.length
}

// intersects reports whether some topic name matches both filters a and b.
function intersects (a, b) {
  const al = a.split('/')
  const bl = b.split('/')
  for (let i = 0; ; i++) {
    if (i === al.length && i === bl.length) return true
    if (i === al.length) return bl[i] === '#' && i + 1 === bl.length
    if (i === bl.length) return al[i] === '#' && i + 1 === al.length
    const x = al[i]
    const y = bl[i]
    const xw = x === '+' || x === '#'
    const yw = y === '+' || y === '#'
    if (i === 0 && ((xw && y.startsWith('$')) || (yw && x.startsWith('$')))) return false
    if (x === '#' || y === '#') return true
    if (!xw && !yw && x !== y) return false
  }
}

// rules returns what a user of this role may read and publish: lists of filters.
function rules (name, role) {
  switch (role) {
    case 'device': {
      const own = `sealcast/devices/${name}/`
      return {
        read: ['sealcast/releases/#', 'sealcast/keys/+', own + 'key', own + 'receipt', own + 'prefetch'],
        write: [own + 'ack', own + 'state', own + 'presence']
      }
    }
    case 'updater':
      return { read: ['sealcast/#'], write: ['sealcast/#'] }
    case 'admin':
      return { read: ['#'], write: ['sealcast/admin/#'] }
    case 'monitor':
      return { read: ['sealcast/status/#', 'sealcast/devices/+/state', 'sealcast/devices/+/presence'], write: [] }
  }
  return { read: [], write: [] }
}

// rulesOf returns the rules of a connected client, from the users file as last read, so
// that a SIGHUP that removes a user or changes its role applies to its connection too.
function rulesOf (client) {
  const name = client && client.sealcastUser
  const u = name !== undefined && users.get(name)
  return u ? rules(name, u.role) : { read: [], write: [] }
}

// The topics on which PROTOCOL.md 9 retains nothing (broker.RetainAllowed).
function retainAllowed (topic) {
  return !matches(topic, 'sealcast/devices/+/ack') && !matches(topic, 'sealcast/admin/#')
}

// mayPublish returns null if client may publish packet (topic, retain), else a reason.
function mayPublish (client, packet) {
  if (packet.topic.startsWith('$SYS/')) return '$SYS/ topics are reserved for the broker nodes'
  if (!users) return null
  if (!rulesOf(client).write.some((f) => matches(packet.topic, f))) return 'topic not allowed'
  if (packet.retain && !retainAllowed(packet.topic)) return 'retained publish on a topic Sealcast never retains'
  return null
}

// ---- the broker

const brokerId = `${opts.id}-${crypto.randomBytes(4).toString('hex')}` // unique per process

function redisConn (name) {
  const conn = new Redis(opts.redis, {
    connectionName: `sealcast-aedes-${brokerId}-${name}`,
    maxRetriesPerRequest: null // wait for Redis to come back rather than fail commands
  })
  let last = 0
  conn.on('error', (err) => {
    if (Date.now() - last > 5000) { // at most one line per connection every 5 s
      last = Date.now()
      log(`redis (${name}): ${err.message}`)
    }
  })
  return conn
}

const db = redisConn('persistence')
const persistence = aedesPersistenceRedis({ conn: db })
// aedes 0.51 stores the subscriptions of a persistent session once per topic of a
// SUBSCRIBE, each time with all its topics; aedes-cached-persistence keeps one callback
// per client and first topic while it waits for its broadcast to come back, so with two
// or more topics in one SUBSCRIBE the second call replaced the first's callback and the
// SUBACK never came (a Sealcast device subscribes to its key, receipt and key statement
// topics in one SUBSCRIBE). Keep every callback.
persistence._waitFor = function (client, isSub, topic, cb) {
  const key = client.id + '-' + (isSub ? 'sub_' : 'unsub_') + (topic || '')
  const prev = this._waiting.get(key)
  this._waiting.set(key, prev ? (err) => { prev(err); cb(err) } : cb)
}
const mq = mqemitterRedis({
  subConn: redisConn('sub'),
  pubConn: redisConn('pub'),
  matchEmptyLevels: true // as aedes's own emitter: a/# matches a [MQTT-4.7.1-3]
})
mq.state.on('error', (err) => log(`redis pub/sub: ${err.message}`))

const broker = aedesFactory({
  id: brokerId,
  mq,
  persistence,
  heartbeatInterval: opts.heartbeatInterval,

  authenticate (client, username, password, callback) {
    const refuse = (code, reason) => {
      log(`refused client ${JSON.stringify(client.id)} user ${JSON.stringify(username)}: ${reason}`)
      const err = new Error(reason)
      err.returnCode = code // 4: bad user name or password; 5: not authorized
      callback(err, false)
    }
    if (!users) {
      const reason = client._will && mayPublish(client, client._will) // $SYS/
      return reason ? refuse(5, `will on ${JSON.stringify(client._will.topic)}: ${reason}`) : callback(null, true)
    }
    const u = typeof username === 'string' ? users.get(username) : undefined
    const got = crypto.createHash('sha256').update(password || Buffer.alloc(0)).digest()
    if (!u || !password || !crypto.timingSafeEqual(got, u.hash)) {
      return refuse(4, u ? 'wrong password' : 'unknown user')
    }
    if (u.role === 'device' && client.id !== username) {
      return refuse(5, 'a device must connect with its name as client id')
    }
    const owner = users.get(client.id)
    if (u.role !== 'device' && owner && owner.role === 'device') {
      return refuse(5, `client id is device ${JSON.stringify(client.id)}'s`)
    }
    client.sealcastUser = username
    if (client._will) { // the will of the CONNECT being handled
      const reason = mayPublish(client, client._will)
      if (reason) return refuse(5, `will on ${JSON.stringify(client._will.topic)}: ${reason}`)
    }
    callback(null, true)
  },

  authorizePublish (client, packet, callback) {
    // A will: of a client of a node that stopped sending heartbeats (client is null, or
    // a newer connection of the same client id to this node), or of a client of this
    // node whose connection just closed. See "Wills" above.
    const orphan = packet.brokerId && packet.brokerId !== brokerId && packet.clientId !== undefined
    const will = !orphan && client && client.closed && packet === client.will
    if (!orphan && !will) {
      const reason = mayPublish(client, packet)
      if (reason) {
        if (users) log(`refused publish by ${JSON.stringify(client && client.id)} to ${JSON.stringify(packet.topic)}: ${reason}`)
        return callback(new Error(reason))
      }
      return callback(null)
    }
    const id = orphan ? packet.clientId : client.id
    const skip = (why) => {
      log(`will of ${JSON.stringify(id)} on ${JSON.stringify(packet.topic)} not published: ${why}`)
      callback(new Error(why))
    }
    if (orphan && packet.topic.startsWith('$SYS/')) return skip('$SYS/ topics are reserved for the broker nodes')
    if (will) {
      if (client.sealcastSuperseded) return skip('a new connection took the session over')
      const reason = mayPublish(client, packet) // the rules may have changed (SIGHUP)
      if (reason) return skip(reason)
    }
    // Skip it if the client has connected again since, to another node.
    const owner = orphan ? packet.brokerId : brokerId
    db.hget(CONNECTED_KEY, id, (err, node) => {
      if (err) log(`redis: ${err.message}`)
      if (!err && node && node !== owner) return skip(`the client has connected again, to node ${node}`)
      callback(null)
    })
  },

  authorizeSubscribe (client, sub, callback) {
    if (sub.topic.startsWith('$share/')) {
      log(`refused subscription by ${JSON.stringify(client.id)} to ${JSON.stringify(sub.topic)}: aedes has no shared subscriptions`)
      return callback(null, null) // SUBACK 0x80
    }
    if (users && !rulesOf(client).read.some((f) => intersects(sub.topic, f))) {
      log(`refused subscription by ${JSON.stringify(client.id)} to ${JSON.stringify(sub.topic)}: no topic it may read`)
      return callback(null, null)
    }
    callback(null, sub)
  },

  authorizeForward (client, packet) {
    if (!users) return packet
    return rulesOf(client).read.some((f) => matches(packet.topic, f)) ? packet : null
  }
})

// A new connection about to take over the session of a connection to this node: mark
// the old one, whose will must not say the client went away.
const registerClient = broker.registerClient
broker.registerClient = function (client) {
  const old = this.clients[client.id]
  if (old && old !== client) old.sealcastSuperseded = true
  return registerClient.call(this, client)
}
broker.on('client', (client) => {
  db.hset(CONNECTED_KEY, client.id, brokerId, (err) => { if (err) log(`redis: ${err.message}`) })
})
// Deletes the entry only if it is still this node's.
db.defineCommand('sealcastForget', {
  numberOfKeys: 1,
  lua: "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0"
})
broker.on('clientDisconnect', (client) => {
  db.sealcastForget(CONNECTED_KEY, client.id, brokerId, (err) => { if (err) log(`redis: ${err.message}`) })
})
broker.on('clientError', (client, err) => {
  if (users || !/ECONNRESET|EPIPE|connection closed/.test(err.message)) {
    log(`client ${JSON.stringify(client.id)}: ${err.message}`)
  }
})
broker.on('connectionError', (client, err) => log(`connection error: ${err.message}`))
broker.on('error', (err) => log(`error: ${err.message}`))

// limitPacketSize makes a client's mqtt-packet parser refuse a packet larger than max as
// soon as the fixed header (and, for a PUBLISH, the topic length) is read: for a PUBLISH
// the payload is compared with max, for any other packet the remaining length.
function limitPacketSize (parser, max) {
  const parsePayload = parser._parsePayload
  parser._parsePayload = function () {
    if (this.packet.length > max) {
      let size = this.packet.length
      if (this.packet.cmd === 'publish') {
        if (this._list.length < 2) return false // wait for the topic length
        size -= 2 + this._list.readUInt16BE(0) + (this.packet.qos > 0 ? 2 : 0)
      }
      if (size > max) {
        this._emitError(new Error(`${this.packet.cmd} of ${size} bytes exceeds --max-packet-size ${max}`))
        return false
      }
    }
    return parsePayload.call(this)
  }
}

{
  // limitPacketSize depends on mqtt-packet's parser internals: check they are there.
  const path = require('node:path')
  const mqttPacket = require(require.resolve('mqtt-packet', { paths: [path.dirname(require.resolve('aedes'))] }))
  const p = mqttPacket.parser()
  if (typeof p._parsePayload !== 'function' || typeof p._emitError !== 'function' || !p._list || !p.packet) {
    fatal('this mqtt-packet has no _parsePayload/_emitError: --max-packet-size cannot be enforced')
  }
}

const server = net.createServer((conn) => {
  conn.setNoDelay(true)
  const client = broker.handle(conn)
  limitPacketSize(client._parser, opts.maxPacketSize)
})
server.on('error', (err) => {
  log(`listen on ${opts.host}:${opts.port}: ${err.message}`)
  process.exit(1)
})

// Listen once Redis answers and the persistence has loaded the sessions' subscriptions,
// so that the first clients find the cluster's state.
let ready = persistence.ready ? 1 : 0
function onReady () {
  if (++ready < 2) return
  server.listen(opts.port, opts.host, () => {
    const a = server.address()
    console.log(`aedes ${opts.id} listening on ${a.address}:${a.port}`)
  })
}
if (!persistence.ready) persistence.once('ready', onReady)
setTimeout(() => {
  if (!server.listening) {
    log(`Redis at ${opts.redis} not ready after 60 s; exiting`)
    process.exit(1)
  }
}, 60000).unref()
db.ping().then(onReady, (err) => { log(`redis: ${err.message}`); process.exit(1) })

// ---- signals

process.on('SIGHUP', () => {
  if (!opts.users) return
  try {
    users = loadUsers(opts.users)
    log(`re-read ${opts.users}: ${users.size} users`)
  } catch (err) {
    log(`SIGHUP: keeping the previous users: ${err.message}`)
  }
})

let stopping = false
function stop (signal) {
  if (stopping) return
  stopping = true
  setTimeout(() => { log('not stopped after 5 s; exiting'); process.exit(1) }, 5000).unref()
  server.close()
  broker.close(() => {
    // QUIT, unlike the persistence's destroy, sends the commands still queued first.
    db.quit().then(() => process.exit(0), () => process.exit(0))
  })
  log(`${signal}: stopping`)
}
process.on('SIGTERM', () => stop('SIGTERM'))
process.on('SIGINT', () => stop('SIGINT'))
