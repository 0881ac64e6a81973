// Package boltstore is an embedded, durable [updater.Store] in one bbolt file, for a single
// updater process that needs no Redis.
//
// # Durability
//
// Every method is one bbolt read-write transaction (batch methods included: a batch of
// Advances is one transaction and one fsync), and bbolt fsyncs the file before a commit
// returns (NoSync stays false). A counter that Advance reports as moved is therefore on
// disk; a crash loses at most the transaction in flight, which returned no result.
//
// # Sharing
//
// bbolt holds an exclusive lock on the file while it is open, so one process at a time:
// two updater processes cannot share a boltstore (use redisstore for that). Open waits
// [Options.LockTimeout] for the lock and then fails with an error wrapping [ErrLocked].
// Within the process every method is safe for concurrent use; write transactions are
// serialised.
//
// # Layout
//
// Buckets: "devices" (serial -> device record), "releases" (16-byte release id -> release
// record), "targets" and "results" (one sub-bucket per release id, serial -> empty value
// or result string). bbolt keeps keys sorted, so Serials and Targets are plain cursor
// walks. Records are JSON (see deviceRecord and releaseRecord): byte fields are base64,
// times RFC 3339 in UTC with nanoseconds, release ids hex. JSON costs a little space and
// speed over a binary encoding but keeps the file readable with `bbolt get` and lets a
// field be added without a migration.
package boltstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater"
)

// ErrLocked is wrapped by the error of Open when another process holds the file.
var ErrLocked = errors.New("database file is locked by another process")

// Options configure Open.
type Options struct {
	// LockTimeout is how long Open waits for another process to release the file before
	// failing with ErrLocked. Zero means one second.
	LockTimeout time.Duration
}

// Store is an updater.Store in a bbolt file. Its methods are safe for concurrent use.
type Store struct {
	db *bolt.DB
}

var _ updater.Store = (*Store)(nil)

var (
	bucketDevices  = []byte("devices")
	bucketReleases = []byte("releases")
	bucketTargets  = []byte("targets")
	bucketResults  = []byte("results")
)

// Open opens or creates the store at path (mode 0600: it holds sealed key material).
func Open(path string, opts Options) (*Store, error) {
	timeout := opts.LockTimeout
	if timeout <= 0 {
		timeout = time.Second
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: timeout})
	if errors.Is(err, bolt.ErrTimeout) {
		return nil, fmt.Errorf("boltstore: open %s: waited %v: %w (stop the other updater, or give this one its own file): %w", path, timeout, ErrLocked, err)
	}
	if err != nil {
		return nil, fmt.Errorf("boltstore: open %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketDevices, bucketReleases, bucketTargets, bucketResults} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("boltstore: initialise %s: %w", path, err)
	}
	return &Store{db: db}, nil
}

// Close closes the file, waiting for transactions in flight.
func (s *Store) Close() error { return s.db.Close() }

// Ping checks that the database is open and readable, for health checks.
func (s *Store) Ping(context.Context) error {
	if err := s.db.View(func(*bolt.Tx) error { return nil }); err != nil {
		return fmt.Errorf("boltstore: %w", err)
	}
	return nil
}

// deviceRecord is the stored form of a device; the serial is the key.
type deviceRecord struct {
	Epoch       uint32                     `json:"epoch"`
	Seq         uint32                     `json:"seq"`
	ChainLength uint32                     `json:"chain_length"`
	Version     uint64                     `json:"version"`
	Chain       []byte                     `json:"chain,omitempty"`
	Assigned    []keychain.ReleaseID       `json:"assigned,omitempty"`
	LastAck     []byte                     `json:"last_ack,omitempty"`
	LastReceipt []byte                     `json:"last_receipt,omitempty"`
	State       protocol.DeviceStatusState `json:"state,omitempty"`
	LastResult  string                     `json:"last_result,omitempty"`
	LastSeen    time.Time                  `json:"last_seen"`
	Provisioned time.Time                  `json:"provisioned"`
	Tags        map[string]string          `json:"tags,omitempty"`
}

// releaseRecord is the stored form of a release; the id is the key.
type releaseRecord struct {
	Meta      json.RawMessage `json:"meta"` // updater.MarshalReleaseMeta
	Installed int             `json:"installed"`
	Failed    int             `json:"failed"`
	// InstallTimes is updater.Release.InstallTimes.
	InstallTimes []int `json:"install_times,omitempty"`
}

func getDevice(b *bolt.Bucket, serial string) (*deviceRecord, error) {
	v := b.Get([]byte(serial))
	if v == nil {
		return nil, nil
	}
	var r deviceRecord
	if err := json.Unmarshal(v, &r); err != nil {
		return nil, fmt.Errorf("device %q: corrupt record: %w", serial, err)
	}
	return &r, nil
}

func putDevice(b *bolt.Bucket, serial string, r *deviceRecord) error {
	r.LastSeen, r.Provisioned = r.LastSeen.UTC(), r.Provisioned.UTC()
	v, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return b.Put([]byte(serial), v)
}

func (r *deviceRecord) device(serial string) *updater.Device {
	return &updater.Device{
		Serial: serial, Epoch: r.Epoch, Seq: r.Seq, ChainLength: r.ChainLength, Version: r.Version,
		Chain: r.Chain, Assigned: r.Assigned, LastAck: r.LastAck, LastReceipt: r.LastReceipt,
		State: r.State, LastResult: r.LastResult, LastSeen: r.LastSeen, Provisioned: r.Provisioned,
		Tags: r.Tags,
	}
}

func (r *deviceRecord) at(p updater.Position) bool { return r.Epoch == p.Epoch && r.Seq == p.Seq }

// CreateDevices implements updater.Store in one transaction.
func (s *Store) CreateDevices(ctx context.Context, devs []*updater.Device) (existing []string, err error) {
	for _, d := range devs {
		if d.Serial == "" {
			return nil, errors.New("boltstore: create devices: empty serial")
		}
	}
	err = s.update(ctx, "create devices", func(tx *bolt.Tx) error {
		existing = nil
		b := tx.Bucket(bucketDevices)
		for _, d := range devs {
			if b.Get([]byte(d.Serial)) != nil {
				existing = append(existing, d.Serial)
				continue
			}
			err := putDevice(b, d.Serial, &deviceRecord{
				Epoch: d.Epoch, Seq: d.Seq, ChainLength: d.ChainLength, Version: d.Version,
				Chain: d.Chain, Assigned: d.Assigned, LastAck: d.LastAck, LastReceipt: d.LastReceipt,
				State: d.State, LastResult: d.LastResult, LastSeen: d.LastSeen, Provisioned: d.Provisioned,
				Tags: d.Tags,
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	return existing, err
}

// Devices implements updater.Store.
func (s *Store) Devices(ctx context.Context, serials []string) ([]*updater.Device, error) {
	out := make([]*updater.Device, len(serials))
	err := s.view(ctx, "devices", func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketDevices)
		for i, serial := range serials {
			r, err := getDevice(b, serial)
			if err != nil {
				return err
			}
			if r != nil {
				out[i] = r.device(serial)
			}
		}
		return nil
	})
	return out, err
}

// Serials implements updater.Store.
func (s *Store) Serials(ctx context.Context) ([]string, error) {
	var out []string
	err := s.view(ctx, "serials", func(tx *bolt.Tx) error {
		return tx.Bucket(bucketDevices).ForEach(func(k, _ []byte) error {
			out = append(out, string(k))
			return nil
		})
	})
	return out, err
}

// DeviceCount implements updater.Store.
func (s *Store) DeviceCount(ctx context.Context) (n int, err error) {
	err = s.view(ctx, "device count", func(tx *bolt.Tx) error {
		n = tx.Bucket(bucketDevices).Stats().KeyN
		return nil
	})
	return n, err
}

// DeleteDevice implements updater.Store.
// PutTags implements updater.Store in one transaction.
func (s *Store) PutTags(ctx context.Context, serial string, tags map[string]string) (existed bool, err error) {
	err = s.update(ctx, "put tags", func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketDevices)
		r, err := getDevice(b, serial)
		if err != nil || r == nil {
			return err
		}
		existed = true
		r.Tags = tags
		if len(tags) == 0 {
			r.Tags = nil
		}
		return putDevice(b, serial, r)
	})
	return existed, err
}

// DeleteDevice implements updater.Store.
func (s *Store) DeleteDevice(ctx context.Context, serial string) (existed bool, err error) {
	err = s.update(ctx, "delete device", func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketDevices)
		existed = b.Get([]byte(serial)) != nil
		if !existed {
			return nil
		}
		return b.Delete([]byte(serial))
	})
	return existed, err
}

// Assign implements updater.Store in one transaction. [SC-10.2]
func (s *Store) Assign(ctx context.Context, as []updater.Assignment) ([]bool, error) {
	ok := make([]bool, len(as))
	err := s.update(ctx, "assign", func(tx *bolt.Tx) error {
		clear(ok)
		b := tx.Bucket(bucketDevices)
		for i, a := range as {
			r, err := getDevice(b, a.Serial)
			if err != nil {
				return err
			}
			if r == nil || !r.at(a.From) {
				continue
			}
			if !slices.Contains(r.Assigned, a.ID) {
				r.Assigned = append(r.Assigned, a.ID)
			}
			r.State = a.State
			if err := putDevice(b, a.Serial, r); err != nil {
				return err
			}
			ok[i] = true
		}
		return nil
	})
	return ok, err
}

// Advance implements updater.Store: each advance is a compare-and-set on (epoch, seq)
// inside one write transaction, which bbolt serialises. [SC-10.2]
func (s *Store) Advance(ctx context.Context, as []updater.Advance) ([]bool, error) {
	ok := make([]bool, len(as))
	err := s.update(ctx, "advance", func(tx *bolt.Tx) error {
		clear(ok)
		b := tx.Bucket(bucketDevices)
		for i, a := range as {
			r, err := getDevice(b, a.Serial)
			if err != nil {
				return err
			}
			if r == nil || !r.at(a.From) {
				continue
			}
			r.Epoch, r.Seq, r.ChainLength, r.Version = a.To.Epoch, a.To.Seq, a.ChainLength, a.Version
			r.Chain, r.LastAck, r.LastReceipt = a.Chain, a.LastAck, a.LastReceipt
			r.State, r.LastResult, r.LastSeen = a.State, a.LastResult, a.At
			r.Assigned = nil // what was wrapped at the old position
			if err := putDevice(b, a.Serial, r); err != nil {
				return err
			}
			ok[i] = true
		}
		return nil
	})
	return ok, err
}

// Note implements updater.Store. Unknown serials are skipped.
func (s *Store) Note(ctx context.Context, notes []updater.Note) error {
	if len(notes) == 0 {
		return nil
	}
	return s.update(ctx, "note", func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketDevices)
		for _, n := range notes {
			r, err := getDevice(b, n.Serial)
			if err != nil {
				return err
			}
			if r == nil {
				continue
			}
			if n.State != "" {
				r.State = n.State
			}
			if n.LastResult != "" {
				r.LastResult = n.LastResult
			}
			r.LastSeen = n.At
			if err := putDevice(b, n.Serial, r); err != nil {
				return err
			}
		}
		return nil
	})
}

func getRelease(tx *bolt.Tx, id keychain.ReleaseID) (*releaseRecord, error) {
	v := tx.Bucket(bucketReleases).Get(id[:])
	if v == nil {
		return nil, fmt.Errorf("release %v: %w", id, updater.ErrNotFound)
	}
	var r releaseRecord
	if err := json.Unmarshal(v, &r); err != nil {
		return nil, fmt.Errorf("release %v: corrupt record: %w", id, err)
	}
	return &r, nil
}

func putRelease(tx *bolt.Tx, id keychain.ReleaseID, r *releaseRecord) error {
	v, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return tx.Bucket(bucketReleases).Put(id[:], v)
}

func (r *releaseRecord) release(id keychain.ReleaseID) (*updater.Release, error) {
	rel, err := updater.UnmarshalReleaseMeta(id, r.Meta)
	if err != nil {
		return nil, err
	}
	rel.Installed, rel.Failed, rel.InstallTimes = r.Installed, r.Failed, r.InstallTimes
	return rel, nil
}

// PutRelease implements updater.Store; the counts of an existing release are kept.
func (s *Store) PutRelease(ctx context.Context, rel *updater.Release) error {
	return s.update(ctx, "put release", func(tx *bolt.Tx) error {
		meta, err := updater.MarshalReleaseMeta(rel)
		if err != nil {
			return err
		}
		r := &releaseRecord{Meta: meta}
		if old, err := getRelease(tx, rel.ID); err == nil {
			r.Installed, r.Failed, r.InstallTimes = old.Installed, old.Failed, old.InstallTimes
		} else if !errors.Is(err, updater.ErrNotFound) {
			return err
		}
		return putRelease(tx, rel.ID, r)
	})
}

// Release implements updater.Store.
func (s *Store) Release(ctx context.Context, id keychain.ReleaseID) (*updater.Release, error) {
	var out *updater.Release
	err := s.view(ctx, "release", func(tx *bolt.Tx) error {
		r, err := getRelease(tx, id)
		if err != nil {
			return err
		}
		out, err = r.release(id)
		return err
	})
	return out, err
}

// Releases implements updater.Store: oldest first, ties by id.
func (s *Store) Releases(ctx context.Context) ([]*updater.Release, error) {
	var out []*updater.Release
	err := s.view(ctx, "releases", func(tx *bolt.Tx) error {
		return tx.Bucket(bucketReleases).ForEach(func(k, v []byte) error {
			var id keychain.ReleaseID
			copy(id[:], k)
			var r releaseRecord
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("release %v: corrupt record: %w", id, err)
			}
			rel, err := r.release(id)
			if err != nil {
				return err
			}
			out = append(out, rel)
			return nil
		})
	})
	// ForEach walks in id order, so a stable sort leaves ties in id order.
	slices.SortStableFunc(out, func(a, b *updater.Release) int { return a.Created.Compare(b.Created) })
	return out, err
}

// AddTargets implements updater.Store in one transaction.
func (s *Store) AddTargets(ctx context.Context, id keychain.ReleaseID, serials []string) error {
	return s.update(ctx, "add targets", func(tx *bolt.Tx) error {
		if _, err := getRelease(tx, id); err != nil {
			return err
		}
		b, err := tx.Bucket(bucketTargets).CreateBucketIfNotExists(id[:])
		if err != nil {
			return err
		}
		for _, serial := range serials {
			if serial == "" {
				return errors.New("empty serial")
			}
			if err := b.Put([]byte(serial), nil); err != nil {
				return err
			}
		}
		return nil
	})
}

// Targets implements updater.Store.
func (s *Store) Targets(ctx context.Context, id keychain.ReleaseID) ([]string, error) {
	var out []string
	err := s.view(ctx, "targets", func(tx *bolt.Tx) error {
		if _, err := getRelease(tx, id); err != nil {
			return err
		}
		b := tx.Bucket(bucketTargets).Bucket(id[:])
		if b == nil {
			return nil
		}
		return b.ForEach(func(k, _ []byte) error {
			out = append(out, string(k))
			return nil
		})
	})
	return out, err
}

// RemoveTarget implements updater.Store in one transaction.
func (s *Store) RemoveTarget(ctx context.Context, id keychain.ReleaseID, serial string) (bool, error) {
	var was bool
	err := s.update(ctx, "remove target", func(tx *bolt.Tx) error {
		rel, err := getRelease(tx, id)
		if err != nil {
			return err
		}
		if b := tx.Bucket(bucketTargets).Bucket(id[:]); b != nil && b.Get([]byte(serial)) != nil {
			was = true
			if err := b.Delete([]byte(serial)); err != nil {
				return err
			}
		}
		b := tx.Bucket(bucketResults).Bucket(id[:])
		if b == nil {
			return nil
		}
		switch old := string(b.Get([]byte(serial))); old {
		case updater.ResultNone:
			return nil
		case updater.ResultInstalled:
			rel.Installed--
		default:
			rel.Failed--
		}
		if err := b.Delete([]byte(serial)); err != nil {
			return err
		}
		return putRelease(tx, id, rel)
	})
	return was, err
}

// validResult reports whether r is ResultInstalled or ResultFailed+":"+code.
func validResult(r string) bool {
	return r == updater.ResultInstalled || (strings.HasPrefix(r, updater.ResultFailed+":") && len(r) > len(updater.ResultFailed)+1)
}

// RecordResults implements updater.Store in one transaction.
func (s *Store) RecordResults(ctx context.Context, id keychain.ReleaseID, rs []updater.Result) error {
	for _, r := range rs {
		if !validResult(r.Result) {
			return fmt.Errorf("boltstore: record results of release %v: device %q: result %q is neither %q nor %q followed by a code; nothing recorded", id, r.Serial, r.Result, updater.ResultInstalled, updater.ResultFailed+":")
		}
		if r.Serial == "" {
			return fmt.Errorf("boltstore: record results of release %v: empty serial; nothing recorded", id)
		}
	}
	return s.update(ctx, "record results", func(tx *bolt.Tx) error {
		rel, err := getRelease(tx, id)
		if err != nil {
			return err
		}
		b, err := tx.Bucket(bucketResults).CreateBucketIfNotExists(id[:])
		if err != nil {
			return err
		}
		for _, r := range rs {
			old := string(b.Get([]byte(r.Serial)))
			if old == updater.ResultInstalled {
				continue // final
			}
			switch {
			case r.Result == updater.ResultInstalled:
				rel.Installed++
				if b := updater.InstallBucket(r.Took); b >= 0 {
					if len(rel.InstallTimes) <= b {
						rel.InstallTimes = append(rel.InstallTimes, make([]int, b+1-len(rel.InstallTimes))...)
					}
					rel.InstallTimes[b]++
				}
				if old != updater.ResultNone {
					rel.Failed--
				}
			case old == updater.ResultNone:
				rel.Failed++
			}
			if err := b.Put([]byte(r.Serial), []byte(r.Result)); err != nil {
				return err
			}
		}
		return putRelease(tx, id, rel)
	})
}

// Results implements updater.Store.
func (s *Store) Results(ctx context.Context, id keychain.ReleaseID, serials []string) ([]string, error) {
	out := make([]string, len(serials))
	err := s.view(ctx, "results", func(tx *bolt.Tx) error {
		if _, err := getRelease(tx, id); err != nil {
			return err
		}
		b := tx.Bucket(bucketResults).Bucket(id[:])
		if b == nil {
			return nil
		}
		for i, serial := range serials {
			out[i] = string(b.Get([]byte(serial)))
		}
		return nil
	})
	return out, err
}

// update runs fn in a read-write transaction, unless ctx is already done. (bbolt cannot
// abandon a transaction half way; a batch is short enough to finish.)
func (s *Store) update(ctx context.Context, op string, fn func(*bolt.Tx) error) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("boltstore: %s: %w", op, err)
	}
	if err := s.db.Update(fn); err != nil {
		return fmt.Errorf("boltstore: %s: %w", op, err)
	}
	return nil
}

func (s *Store) view(ctx context.Context, op string, fn func(*bolt.Tx) error) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("boltstore: %s: %w", op, err)
	}
	if err := s.db.View(fn); err != nil {
		return fmt.Errorf("boltstore: %s: %w", op, err)
	}
	return nil
}
