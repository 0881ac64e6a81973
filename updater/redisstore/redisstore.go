// Package redisstore is an [updater.Store] in Redis (one node, Sentinel or Cluster), which
// several updater processes can share.
//
// # Keys
//
// With the prefix P (Options.Prefix, default "sealcast"):
//
//	P:dev:{serial}              hash: one device (epoch, seq, chain_length, version, chain,
//	                            assigned, last_ack, last_receipt, state, last_result,
//	                            last_seen, provisioned)
//	P:serials                   set: every provisioned serial
//	P:rel:{rid}                 hash: meta (updater.MarshalReleaseMeta, JSON) and the counts
//	                            installed, failed (RecordResults)
//	P:rel:{rid}:targets         set: the release's target serials
//	P:rel:{rid}:results         hash: serial -> result
//	P:releases                  set: every release id (hex)
//
// The braces are Redis Cluster hash tags: every key of a device is in one slot, and every
// key of a release in one slot, so each Lua script touches a single slot. Numbers are
// decimal strings; byte fields are stored raw; Assigned is the concatenation of the 16-byte
// ids; times are RFC 3339 in UTC with nanoseconds.
//
// # Atomicity
//
// Assign, Advance, Note and each result of RecordResults are Lua scripts over one device
// (or one release), so each is atomic and two updater processes cannot both apply an
// Advance from the same position. [SC-10.2] Batch methods send their scripts in pipelines
// of up to 1,000 commands (EVALSHA, falling back to EVAL if Redis has lost the script
// cache); within a batch they run in order. A batch is not atomic as a whole: if a call
// fails part way (a network error), an unknown prefix of the batch may have been applied,
// and repeating it is safe because every script is a compare-and-set or idempotent.
// CreateDevices and DeleteDevice touch a device's hash and the serials set, which may be
// in different slots; they are ordered so that a retry repairs an interruption.
//
// # Durability
//
// Redis acknowledges a write when it is in memory. The counters need the append-only file:
//
//	appendonly yes
//	appendfsync always     # or everysec; see below
//
// With appendfsync always, a reply to a pipeline is sent only after its writes are
// fsynced (Redis fsyncs once per event-loop iteration, so a pipelined batch of Advances
// costs one fsync, not one per device), and nothing Advance reported is lost in a crash.
//
// With appendfsync everysec, a crash of Redis (or its host) can lose up to about one second
// of acknowledged writes. For counters this is a roll-back: a device whose Advance from
// (e, n) to (e, n-1) was lost is at (e, n) again in the store, with its old assignment,
// chain state and last ack. Safety holds: the device persisted D = n-1 before acking
// [SC-10.1] step 5, so it is one step ahead of the server, which is the normal state
// between an ack and its acceptance (PROTOCOL.md 10.4, "ack lost"); it will never again use
// K_n, so no index serves two confirmed updates, and a re-wrap at (e, n) uses a fresh random
// nonce (6.1). Liveness depends on whether the device had already received the receipt:
//
//   - Not yet confirmed (the receipt was published after the lost write reached memory,
//     but the device had not stored it): the device re-sends last_ack on reconnect and on
//     its timer (10.1 step 6). The ack is at (e, n) for an id in the restored assignment,
//     its MAC verifies with K_n, so the server accepts it again (10.2 step 2) and Advance
//     moves n -> n-1 once more. Converges.
//   - Already confirmed (the retained receipt reached the device within the lost second):
//     the device no longer re-sends on its timer, but it re-sends last_ack whenever a key
//     message at (e, n) for the same id arrives, confirmed or not (10.1 step 1), and the
//     server accepts it again. A key message for another id at (e, n) makes the device
//     report stale_key with device_seq n-1, and the server MUST move its counter down to
//     meet it (10.2 step 4). A lost re-key converges the same way: the server, back at
//     (e, 1), wraps the re-key again with the next release, and the device answers with
//     its last ack. The server publishes a key message at its position on the next
//     release or at a restart (the fan-out resumes), so it converges then, not at once.
//
// So everysec is safe and converges by the next release; appendfsync always avoids the
// window (and the stale installed version the server shows until then). Notes are
// documented as losable and need neither.
package redisstore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater"
)

// Options configure New.
type Options struct {
	// Prefix starts every key; default "sealcast". Stores with different prefixes in one
	// Redis are independent. It must not contain '{' or '}'.
	Prefix string
}

// Store is an updater.Store in Redis. Its methods are safe for concurrent use, from one
// or several processes.
type Store struct {
	rdb   redis.UniversalClient
	keys  keyspace
	owned bool
}

var _ updater.Store = (*Store)(nil)

// batchSize is the number of commands per pipeline: large enough that a release to 100,000
// devices costs about a hundred round trips per batch method, small enough that one
// pipeline does not hold Redis for long.
const batchSize = 1000

// New returns a store using rdb, which may be a single-node, Sentinel or Cluster client
// (see Open). The caller keeps ownership of rdb: Close does not close it. New panics if
// the prefix contains a brace, which would break the hash tags.
func New(rdb redis.UniversalClient, opts Options) *Store {
	p := opts.Prefix
	if p == "" {
		p = "sealcast"
	}
	if strings.ContainsAny(p, "{}") {
		panic(fmt.Sprintf("redisstore: prefix %q contains a brace, which would break Redis Cluster hash tags", p))
	}
	return &Store{rdb: rdb, keys: keyspace(p)}
}

// Ping checks that Redis answers, for health checks.
func (s *Store) Ping(ctx context.Context) error {
	if err := s.rdb.Ping(ctx).Err(); err != nil {
		return fmt.Errorf("redisstore: %w", err)
	}
	return nil
}

// Close closes the client if Open created it.
func (s *Store) Close() error {
	if s.owned {
		return s.rdb.Close()
	}
	return nil
}

// keyspace names the store's keys under its prefix. A device's keys and a release's keys
// each share one hash tag, so that Redis Cluster keeps them on one slot.
type keyspace string

func (k keyspace) dev(serial string) string { return string(k) + ":dev:{" + serial + "}" }
func (k keyspace) serials() string          { return string(k) + ":serials" }
func (k keyspace) releases() string         { return string(k) + ":releases" }
func (k keyspace) rel(id keychain.ReleaseID) string {
	return string(k) + ":rel:{" + id.String() + "}"
}
func (k keyspace) targets(id keychain.ReleaseID) string { return k.rel(id) + ":targets" }
func (k keyspace) results(id keychain.ReleaseID) string { return k.rel(id) + ":results" }

func u64(v uint64) string { return strconv.FormatUint(v, 10) }
func u32(v uint32) string { return strconv.FormatUint(uint64(v), 10) }

func timeText(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }

func wrap(op string, err error) error { return fmt.Errorf("redisstore: %s: %w", op, err) }

// call is one script invocation.
type call struct {
	keys []string
	args []any
}

// runScript runs calls in order, batchSize per pipeline, and returns each call's integer
// reply. It sends EVALSHA; calls that fail with NOSCRIPT (the script cache was flushed,
// or this is a new node) are repeated with EVAL, which also caches the script.
func runScript(ctx context.Context, rdb redis.UniversalClient, sc *redis.Script, calls []call) ([]int64, error) {
	out := make([]int64, len(calls))
	for start := 0; start < len(calls); start += batchSize {
		chunk := calls[start:min(start+batchSize, len(calls))]
		cmds := make([]*redis.Cmd, len(chunk))
		pipe := rdb.Pipeline()
		for i, c := range chunk {
			cmds[i] = sc.EvalSha(ctx, pipe, c.keys, c.args...)
		}
		_, _ = pipe.Exec(ctx) // errors are read per command below
		var retry []int
		for i, cmd := range cmds {
			if err := cmd.Err(); redis.HasErrorPrefix(err, "NOSCRIPT") {
				retry = append(retry, i)
			}
		}
		if len(retry) > 0 {
			// Only after a SCRIPT FLUSH racing this pipeline could a later call of the
			// chunk have run before an earlier one retried here.
			pipe := rdb.Pipeline()
			for _, i := range retry {
				cmds[i] = sc.Eval(ctx, pipe, chunk[i].keys, chunk[i].args...)
			}
			_, _ = pipe.Exec(ctx)
		}
		for i, cmd := range cmds {
			v, err := cmd.Int64()
			if err != nil {
				return nil, err
			}
			out[start+i] = v
		}
	}
	return out, nil
}

// CreateDevices implements updater.Store.
func (s *Store) CreateDevices(ctx context.Context, devs []*updater.Device) ([]string, error) {
	calls := make([]call, len(devs))
	for i, d := range devs {
		if d.Serial == "" {
			return nil, wrap("create devices", errors.New("empty serial"))
		}
		assigned := make([]byte, 0, 16*len(d.Assigned))
		for _, id := range d.Assigned {
			assigned = append(assigned, id[:]...)
		}
		calls[i] = call{keys: []string{s.keys.dev(d.Serial)}, args: []any{
			"epoch", u32(d.Epoch), "seq", u32(d.Seq), "chain_length", u32(d.ChainLength),
			"version", u64(d.Version), "chain", d.Chain, "assigned", assigned,
			"last_ack", d.LastAck, "last_receipt", d.LastReceipt, "state", string(d.State),
			"last_result", d.LastResult, "last_seen", timeText(d.LastSeen),
			"provisioned", timeText(d.Provisioned), "tags", protocol.FormatTags(d.Tags),
		}}
	}
	created, err := runScript(ctx, s.rdb, createScript, calls)
	if err != nil {
		return nil, wrap("create devices", err)
	}
	var existing []string
	for i, c := range created {
		if c == 0 {
			existing = append(existing, devs[i].Serial)
		}
	}
	// Add every serial, existing ones included, so that a retry after a failure between
	// the two steps repairs the set.
	serials := make([]any, len(devs))
	for i, d := range devs {
		serials[i] = d.Serial
	}
	if err := addToSet(ctx, s.rdb, s.keys.serials(), serials); err != nil {
		return nil, wrap("create devices: add to serials", err)
	}
	return existing, nil
}

// addToSet adds members to a set, batchSize per SADD, in one pipeline.
func addToSet(ctx context.Context, rdb redis.UniversalClient, key string, members []any) error {
	if len(members) == 0 {
		return nil
	}
	_, err := rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for start := 0; start < len(members); start += batchSize {
			p.SAdd(ctx, key, members[start:min(start+batchSize, len(members))]...)
		}
		return nil
	})
	return err
}

// Devices implements updater.Store.
func (s *Store) Devices(ctx context.Context, serials []string) ([]*updater.Device, error) {
	out := make([]*updater.Device, len(serials))
	for start := 0; start < len(serials); start += batchSize {
		chunk := serials[start:min(start+batchSize, len(serials))]
		cmds := make([]*redis.MapStringStringCmd, len(chunk))
		_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, serial := range chunk {
				cmds[i] = p.HGetAll(ctx, s.keys.dev(serial))
			}
			return nil
		})
		if err != nil {
			return nil, wrap("devices", err)
		}
		for i, cmd := range cmds {
			h := cmd.Val()
			if len(h) == 0 {
				continue
			}
			d, err := parseDevice(chunk[i], h)
			if err != nil {
				return nil, wrap("devices", err)
			}
			out[start+i] = d
		}
	}
	return out, nil
}

// fields parses a hash's fields, remembering the first error.
type fields struct {
	h    map[string]string
	what string
	err  error
}

func (f *fields) fail(name string, err error) {
	if f.err == nil {
		f.err = fmt.Errorf("%s: field %s: %w (the key was written by something else, or is corrupt)", f.what, name, err)
	}
}

func (f *fields) uint(name string, bits int) uint64 {
	v, ok := f.h[name]
	if !ok || v == "" {
		return 0
	}
	n, err := strconv.ParseUint(v, 10, bits)
	if err != nil {
		f.fail(name, err)
	}
	return n
}

func (f *fields) int(name string) int {
	v, ok := f.h[name]
	if !ok || v == "" {
		return 0
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		f.fail(name, err)
	}
	return n
}

func (f *fields) time(name string) time.Time {
	v, ok := f.h[name]
	if !ok || v == "" {
		return time.Time{}
	}
	t, err := time.Parse(time.RFC3339Nano, v)
	if err != nil {
		f.fail(name, err)
	}
	return t.UTC()
}

func (f *fields) bytes(name string) []byte {
	v, ok := f.h[name]
	if !ok || v == "" {
		return nil
	}
	return []byte(v)
}

func parseDevice(serial string, h map[string]string) (*updater.Device, error) {
	f := &fields{h: h, what: "device " + strconv.Quote(serial)}
	d := &updater.Device{
		Serial:      serial,
		Epoch:       uint32(f.uint("epoch", 32)),
		Seq:         uint32(f.uint("seq", 32)),
		ChainLength: uint32(f.uint("chain_length", 32)),
		Version:     f.uint("version", 64),
		Chain:       f.bytes("chain"),
		LastAck:     f.bytes("last_ack"),
		LastReceipt: f.bytes("last_receipt"),
		State:       protocol.DeviceStatusState(h["state"]),
		LastResult:  h["last_result"],
		LastSeen:    f.time("last_seen"),
		Provisioned: f.time("provisioned"),
	}
	if t := h["tags"]; t != "" {
		tags, err := protocol.ParseTags(t)
		if err != nil {
			f.fail("tags", err)
		}
		d.Tags = tags
	}
	a := h["assigned"]
	if len(a)%16 != 0 {
		f.fail("assigned", fmt.Errorf("%d bytes, not a multiple of 16", len(a)))
	}
	for i := 0; i+16 <= len(a); i += 16 {
		var id keychain.ReleaseID
		copy(id[:], a[i:])
		d.Assigned = append(d.Assigned, id)
	}
	return d, f.err
}

// PutTags implements updater.Store: one script on the device's hash.
func (s *Store) PutTags(ctx context.Context, serial string, tags map[string]string) (bool, error) {
	vs, err := runScript(ctx, s.rdb, tagsScript, []call{{keys: []string{s.keys.dev(serial)}, args: []any{protocol.FormatTags(tags)}}})
	if err != nil {
		return false, wrap("put tags", err)
	}
	return vs[0] == 1, nil
}

// Serials implements updater.Store.
func (s *Store) Serials(ctx context.Context) ([]string, error) {
	ss, err := s.rdb.SMembers(ctx, s.keys.serials()).Result()
	if err != nil {
		return nil, wrap("serials", err)
	}
	slices.Sort(ss)
	return ss, nil
}

// DeviceCount implements updater.Store: the size of the set of serials (SCARD).
func (s *Store) DeviceCount(ctx context.Context) (int, error) {
	n, err := s.rdb.SCard(ctx, s.keys.serials()).Result()
	if err != nil {
		return 0, wrap("device count", err)
	}
	return int(n), nil
}

// DeleteDevice implements updater.Store. The device goes first, then its serial, so that
// an interrupted delete leaves at worst a serial without a device, which a retry removes.
func (s *Store) DeleteDevice(ctx context.Context, serial string) (bool, error) {
	n, err := s.rdb.Del(ctx, s.keys.dev(serial)).Result()
	if err != nil {
		return false, wrap("delete device", err)
	}
	if err := s.rdb.SRem(ctx, s.keys.serials(), serial).Err(); err != nil {
		return false, wrap("delete device", err)
	}
	return n == 1, nil
}

func oks(vs []int64) []bool {
	ok := make([]bool, len(vs))
	for i, v := range vs {
		ok[i] = v == 1
	}
	return ok
}

// Assign implements updater.Store. [SC-10.2]
func (s *Store) Assign(ctx context.Context, as []updater.Assignment) ([]bool, error) {
	calls := make([]call, len(as))
	for i, a := range as {
		calls[i] = call{keys: []string{s.keys.dev(a.Serial)}, args: []any{u32(a.From.Epoch), u32(a.From.Seq), a.ID[:], string(a.State)}}
	}
	vs, err := runScript(ctx, s.rdb, assignScript, calls)
	if err != nil {
		return nil, wrap("assign", err)
	}
	return oks(vs), nil
}

// Advance implements updater.Store. [SC-10.2]
func (s *Store) Advance(ctx context.Context, as []updater.Advance) ([]bool, error) {
	calls := make([]call, len(as))
	for i, a := range as {
		calls[i] = call{keys: []string{s.keys.dev(a.Serial)}, args: []any{
			u32(a.From.Epoch), u32(a.From.Seq), u32(a.To.Epoch), u32(a.To.Seq),
			u32(a.ChainLength), u64(a.Version), a.Chain, a.LastAck, a.LastReceipt,
			string(a.State), a.LastResult, timeText(a.At),
		}}
	}
	vs, err := runScript(ctx, s.rdb, advanceScript, calls)
	if err != nil {
		return nil, wrap("advance", err)
	}
	return oks(vs), nil
}

// Note implements updater.Store. Unknown serials are skipped.
func (s *Store) Note(ctx context.Context, notes []updater.Note) error {
	calls := make([]call, len(notes))
	for i, n := range notes {
		calls[i] = call{keys: []string{s.keys.dev(n.Serial)}, args: []any{string(n.State), n.LastResult, timeText(n.At)}}
	}
	if _, err := runScript(ctx, s.rdb, noteScript, calls); err != nil {
		return wrap("note", err)
	}
	return nil
}

// PutRelease implements updater.Store; it never writes the counts. The metadata goes
// first, then the id into the set of releases, so a retry repairs an interruption.
func (s *Store) PutRelease(ctx context.Context, r *updater.Release) error {
	meta, err := updater.MarshalReleaseMeta(r)
	if err != nil {
		return wrap("put release", err)
	}
	if err := s.rdb.HSet(ctx, s.keys.rel(r.ID), "meta", meta).Err(); err != nil {
		return wrap("put release", err)
	}
	if err := s.rdb.SAdd(ctx, s.keys.releases(), r.ID.String()).Err(); err != nil {
		return wrap("put release", err)
	}
	return nil
}

func parseRelease(id keychain.ReleaseID, h map[string]string) (*updater.Release, error) {
	r, err := updater.UnmarshalReleaseMeta(id, []byte(h["meta"]))
	if err != nil {
		return nil, err
	}
	f := &fields{h: h, what: "release " + id.String()}
	r.Installed, r.Failed = f.int("installed"), f.int("failed")
	for b := range len(protocol.InstallTimeBounds) + 1 {
		if _, ok := h[installField(b)]; ok {
			r.InstallTimes = append(r.InstallTimes, make([]int, b+1-len(r.InstallTimes))...)
			r.InstallTimes[b] = f.int(installField(b))
		}
	}
	return r, f.err
}

// installField is the field of a release's hash that counts the installs of bucket b
// (updater.InstallBucket).
func installField(b int) string { return "t" + strconv.Itoa(b) }

func notFound(op string, id keychain.ReleaseID) error {
	return fmt.Errorf("redisstore: %s: release %v: %w", op, id, updater.ErrNotFound)
}

// Release implements updater.Store.
func (s *Store) Release(ctx context.Context, id keychain.ReleaseID) (*updater.Release, error) {
	h, err := s.rdb.HGetAll(ctx, s.keys.rel(id)).Result()
	if err != nil {
		return nil, wrap("release", err)
	}
	if len(h) == 0 {
		return nil, notFound("release", id)
	}
	r, err := parseRelease(id, h)
	if err != nil {
		return nil, wrap("release", err)
	}
	return r, nil
}

// Releases implements updater.Store: oldest first, ties by id.
func (s *Store) Releases(ctx context.Context) ([]*updater.Release, error) {
	ids, err := s.rdb.SMembers(ctx, s.keys.releases()).Result()
	if err != nil {
		return nil, wrap("releases", err)
	}
	slices.Sort(ids)
	cmds := make([]*redis.MapStringStringCmd, len(ids))
	rids := make([]keychain.ReleaseID, len(ids))
	_, err = s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, hex := range ids {
			id, err := keychain.ParseReleaseID(hex)
			if err != nil {
				return fmt.Errorf("member %q of %s is not a release id: %w", hex, s.keys.releases(), err)
			}
			rids[i] = id
			cmds[i] = p.HGetAll(ctx, s.keys.rel(id))
		}
		return nil
	})
	if err != nil {
		return nil, wrap("releases", err)
	}
	var out []*updater.Release
	for i, cmd := range cmds {
		if len(cmd.Val()) == 0 {
			continue // an interrupted PutRelease never lists a release without metadata
		}
		r, err := parseRelease(rids[i], cmd.Val())
		if err != nil {
			return nil, wrap("releases", err)
		}
		out = append(out, r)
	}
	slices.SortStableFunc(out, func(a, b *updater.Release) int { return a.Created.Compare(b.Created) })
	return out, nil
}

func (s *Store) releaseExists(ctx context.Context, op string, id keychain.ReleaseID) error {
	n, err := s.rdb.Exists(ctx, s.keys.rel(id)).Result()
	if err != nil {
		return wrap(op, err)
	}
	if n == 0 {
		return notFound(op, id)
	}
	return nil
}

// AddTargets implements updater.Store.
func (s *Store) AddTargets(ctx context.Context, id keychain.ReleaseID, serials []string) error {
	if err := s.releaseExists(ctx, "add targets", id); err != nil {
		return err
	}
	members := make([]any, len(serials))
	for i, serial := range serials {
		members[i] = serial
	}
	if err := addToSet(ctx, s.rdb, s.keys.targets(id), members); err != nil {
		return wrap("add targets", err)
	}
	return nil
}

// Targets implements updater.Store.
func (s *Store) Targets(ctx context.Context, id keychain.ReleaseID) ([]string, error) {
	var exists *redis.IntCmd
	var members *redis.StringSliceCmd
	_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		exists = p.Exists(ctx, s.keys.rel(id))
		members = p.SMembers(ctx, s.keys.targets(id))
		return nil
	})
	if err != nil {
		return nil, wrap("targets", err)
	}
	if exists.Val() == 0 {
		return nil, notFound("targets", id)
	}
	ts := members.Val()
	slices.Sort(ts)
	return ts, nil
}

// RemoveTarget implements updater.Store: one script, atomic in the release's slot.
func (s *Store) RemoveTarget(ctx context.Context, id keychain.ReleaseID, serial string) (bool, error) {
	vs, err := runScript(ctx, s.rdb, removeTargetScript, []call{{
		keys: []string{s.keys.rel(id), s.keys.targets(id), s.keys.results(id)}, args: []any{serial},
	}})
	if err != nil {
		return false, wrap("remove target", err)
	}
	if vs[0] == -1 {
		return false, notFound("remove target", id)
	}
	return vs[0] == 1, nil
}

// validResult reports whether r is ResultInstalled or ResultFailed+":"+code.
func validResult(r string) bool {
	return r == updater.ResultInstalled || (strings.HasPrefix(r, updater.ResultFailed+":") && len(r) > len(updater.ResultFailed)+1)
}

// RecordResults implements updater.Store: one script per result, each atomic in the
// release's slot.
func (s *Store) RecordResults(ctx context.Context, id keychain.ReleaseID, rs []updater.Result) error {
	calls := make([]call, len(rs))
	keys := []string{s.keys.rel(id), s.keys.results(id)}
	for i, r := range rs {
		if !validResult(r.Result) {
			return fmt.Errorf("redisstore: record results of release %v: device %q: result %q is neither %q nor %q followed by a code; nothing recorded", id, r.Serial, r.Result, updater.ResultInstalled, updater.ResultFailed+":")
		}
		field := ""
		if b := updater.InstallBucket(r.Took); b >= 0 {
			field = installField(b)
		}
		calls[i] = call{keys: keys, args: []any{r.Serial, r.Result, field}}
	}
	vs, err := runScript(ctx, s.rdb, recordScript, calls)
	if err != nil {
		return wrap("record results", err)
	}
	if slices.Contains(vs, -1) { // the release is missing, so no script wrote anything
		return notFound("record results", id)
	}
	return nil
}

// Results implements updater.Store.
func (s *Store) Results(ctx context.Context, id keychain.ReleaseID, serials []string) ([]string, error) {
	out := make([]string, len(serials))
	var exists *redis.IntCmd
	cmds := make([]*redis.SliceCmd, 0, len(serials)/batchSize+1)
	_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		exists = p.Exists(ctx, s.keys.rel(id))
		for start := 0; start < len(serials); start += batchSize {
			cmds = append(cmds, p.HMGet(ctx, s.keys.results(id), serials[start:min(start+batchSize, len(serials))]...))
		}
		return nil
	})
	if err != nil {
		return nil, wrap("results", err)
	}
	if exists.Val() == 0 {
		return nil, notFound("results", id)
	}
	for c, cmd := range cmds {
		for i, v := range cmd.Val() {
			if v, ok := v.(string); ok {
				out[c*batchSize+i] = v
			}
		}
	}
	return out, nil
}
