package updater

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// Store is the durable state of the updater: devices with their sequence counters, and
// releases with their per-device results. It never holds a key in the clear: chain state
// and content keys arrive sealed.
//
// Implementations live in subpackages (redisstore, boltstore) and all pass the contract
// suite in storetest. Every method is safe for concurrent use, including from several
// updater processes sharing one store. Batch methods exist so that a release to 100,000
// devices costs a few hundred round trips, not hundreds of thousands.
type Store interface {
	// CreateDevices stores the devices that do not exist yet and returns the serials of
	// those that already existed, which are left unchanged.
	CreateDevices(ctx context.Context, devs []*Device) (existing []string, err error)
	// Devices returns the devices in the order of serials, with nil for unknown serials.
	Devices(ctx context.Context, serials []string) ([]*Device, error)
	// Serials returns every provisioned serial, sorted.
	Serials(ctx context.Context) ([]string, error)
	// DeviceCount returns how many serials Serials would return, without reading them
	// (the fleet status counts the fleet every time it changes).
	DeviceCount(ctx context.Context) (int, error)
	// PutTags replaces a device's tags; it reports whether the device exists. It changes
	// nothing else of the device.
	PutTags(ctx context.Context, serial string, tags map[string]string) (bool, error)
	// DeleteDevice removes a device; it reports whether it existed.
	DeleteDevice(ctx context.Context, serial string) (bool, error)

	// Assign records, for each device still at the assignment's position (epoch and seq),
	// that ID has been wrapped there: ID is appended to Assigned if absent and State is
	// set. ok[i] is false where the device moved or is gone. [SC-10.2]
	Assign(ctx context.Context, as []Assignment) (ok []bool, err error)
	// Advance applies each advance atomically if, and only if, the device is still at
	// From (compare-and-set on epoch and seq); ok[i] says whether it was applied. This is
	// the one operation that moves a counter. [SC-10.2]
	Advance(ctx context.Context, as []Advance) (ok []bool, err error)
	// Note records what was last heard of devices (state, result, last seen). It does not
	// touch counters and may be lost in a crash.
	Note(ctx context.Context, notes []Note) error

	// PutRelease creates or replaces a release's metadata (not its results).
	PutRelease(ctx context.Context, r *Release) error
	// Release returns a release with its counts, or an error wrapping ErrNotFound.
	Release(ctx context.Context, id keychain.ReleaseID) (*Release, error)
	// Releases returns every release with its counts, oldest first.
	Releases(ctx context.Context) ([]*Release, error)
	// AddTargets adds serials to a release's targets.
	AddTargets(ctx context.Context, id keychain.ReleaseID, serials []string) error
	// Targets returns a release's targets, sorted.
	Targets(ctx context.Context, id keychain.ReleaseID) ([]string, error)
	// RemoveTarget removes serial from a release's targets, atomically with its result
	// and that result's share of the counts (a deprovisioned device), and reports whether
	// it was a target.
	RemoveTarget(ctx context.Context, id keychain.ReleaseID, serial string) (bool, error)
	// RecordResults stores each device's result for a release and keeps the release's
	// counts in step, atomically per result. ResultInstalled is final: a later failure
	// for the same device does not replace it.
	RecordResults(ctx context.Context, id keychain.ReleaseID, rs []Result) error
	// Results returns the recorded result of each serial (ResultNone where none).
	Results(ctx context.Context, id keychain.ReleaseID, serials []string) ([]string, error)

	Close() error
}

// ErrNotFound is wrapped by store errors for a missing release.
var ErrNotFound = errors.New("not found")

// Device is the server's record of one device ([SC-10.2]).
type Device struct {
	Serial      string
	Epoch       uint32
	Seq         uint32 // the counter C: the chain index of the next key
	ChainLength uint32
	Version     uint64 // installed version, as last confirmed
	// Chain is the sealed traversal state whose current key is K_Seq of Epoch
	// (keychain.SealTraversal).
	Chain []byte
	// Assigned lists the ids (releases, or a re-key) wrapped at (Epoch, Seq), oldest first.
	Assigned []keychain.ReleaseID
	// LastAck and LastReceipt are the last accepted ack and its receipt, kept to answer
	// a repeated ack.
	LastAck     []byte
	LastReceipt []byte

	State       protocol.DeviceStatusState
	LastResult  string // "ok" or a report code name
	LastSeen    time.Time
	Provisioned time.Time
	Tags        map[string]string // key=value labels (PROTOCOL.md 12.4); nil for none
}

// Position is a point on a device's chain.
type Position struct {
	Epoch uint32
	Seq   uint32
}

// Pos returns the device's current position.
func (d *Device) Pos() Position { return Position{d.Epoch, d.Seq} }

// Assignment says that ID was wrapped for Serial at From.
type Assignment struct {
	Serial string
	From   Position
	ID     keychain.ReleaseID
	State  protocol.DeviceStatusState
}

// Advance moves Serial from From to To after a confirmed ack.
type Advance struct {
	Serial      string
	From        Position
	To          Position
	ChainLength uint32
	Chain       []byte // sealed traversal state for To
	Version     uint64
	LastAck     []byte
	LastReceipt []byte
	State       protocol.DeviceStatusState
	LastResult  string
	At          time.Time
}

// Note is non-critical news about a device.
type Note struct {
	Serial     string
	State      protocol.DeviceStatusState // empty: unchanged
	LastResult string                     // empty: unchanged
	At         time.Time
}

// Per-device results of a release.
const (
	ResultNone      = ""
	ResultInstalled = "installed"
	ResultFailed    = "failed" // followed by ":" and the report code name
)

// Result is one device's outcome for a release.
type Result struct {
	Serial string
	Result string // ResultInstalled, or ResultFailed+":"+code
	// Took is, for ResultInstalled, the time from the release's start (ReleaseStart) to
	// the install being accepted; the store counts the device's first install in the
	// bucket of Release.InstallTimes that Took falls in (InstallBucket). A negative Took
	// counts in none (the time is not known).
	Took time.Duration
}

// InstallBucket returns the index in Release.InstallTimes that an install d after its
// release's start counts in: that of the first bound of protocol.InstallTimeBounds not
// below d, or len(protocol.InstallTimeBounds) beyond the last; -1 for a negative d.
func InstallBucket(d time.Duration) int {
	if d < 0 {
		return -1
	}
	i, _ := slices.BinarySearchFunc(protocol.InstallTimeBounds, d, func(b, d time.Duration) int { return cmp.Compare(b, d) })
	return i
}

// ReleaseStart is the time an install's Took is counted from: the release's creation,
// or its start time if that is later (12.6).
func ReleaseStart(r *Release) time.Time {
	if r.StartAt.After(r.Created) {
		return r.StartAt
	}
	return r.Created
}

// Release is a release's metadata and counts.
type Release struct {
	ID      keychain.ReleaseID
	Version uint64
	Label   string
	State   protocol.ReleaseState
	All     bool // targets every device provisioned at creation
	// Select targets the devices whose tags include every pair; Follow makes devices
	// provisioned or tagged later that match (every device, with All) join the release
	// while it is in progress (PROTOCOL.md 12.4).
	Select map[string]string
	Follow bool
	// Waves, MaxFailures and Abort are the rollout plan (PROTOCOL.md 12.5); Wave is the
	// index of the wave open now, PauseReason why the release is paused, Tolerated how
	// many counted failures an operator's resume accepted over the release, and
	// ToleratedWaves how many waves from the first it exempted from their own threshold.
	Waves       []string
	Canary      []string // devices that form a first wave of their own
	MaxFailures string
	Abort       bool
	Wave        int
	PauseReason string
	Tolerated   int
	// ToleratedWaves is how many waves, from the first, an operator's resume exempted
	// from their own failure threshold.
	ToleratedWaves int
	// WaveLog is when each wave opened and closed, from the first; a wave not opened
	// yet has no entry.
	WaveLog []WaveRecord
	// MaxConcurrent bounds the targets holding an unsettled key (0: none); with
	// DefaultBound (the server's default) only targets online count. Admitted is how
	// many targets, in rollout order, have been offered the release under it.
	MaxConcurrent int
	DefaultBound  bool
	Admitted      int
	// Soak and Approve hold the next wave back once the open waves have closed;
	// Approved is how many waves an operator approved.
	Soak     time.Duration
	Approve  bool
	Approved int
	// StartAt and Window hold every key back until StartAt and outside Window.
	StartAt time.Time
	Window  string
	// DeviceTimeout counts a target that got its key and has not settled within it as
	// timed out.
	DeviceTimeout time.Duration
	// Prefetch announces the release to its targets before their keys, for them to
	// download it within PrefetchJitter (PROTOCOL.md 12.7).
	Prefetch       bool
	PrefetchJitter time.Duration
	Created        time.Time
	Manifest       []byte // the signed manifest
	// ContentKey is the content key sealed under the root secret (SealContentKey).
	ContentKey []byte
	ImageSize  uint64
	ChunkSize  uint32
	ChunkCount uint32

	// Counts maintained by RecordResults; read-only for PutRelease. InstallTimes counts
	// first installs by the bucket of their Took (InstallBucket), one more entry than
	// protocol.InstallTimeBounds at the most, nil while none was counted; it is not
	// lowered when a target is removed.
	Installed    int
	Failed       int
	InstallTimes []int
}

// WaveRecord is what a release keeps of one of its waves: when it opened (its first key
// was offered) and closed (every device of it settled), zero while it has not, and how
// its devices had settled when the release left the updater's memory (completed or
// cancelled; while the release is in progress the rollout loop counts them).
type WaveRecord struct {
	Opened    time.Time `json:"opened,omitzero"`
	Closed    time.Time `json:"closed,omitzero"`
	Installed int       `json:"installed,omitempty"`
	Failed    int       `json:"failed,omitempty"`
	TimedOut  int       `json:"timed_out,omitempty"`
}

// releaseMeta is the one mapping of release records that every store keeps: what
// PutRelease writes, that is everything but the id (the record's key) and the counts
// (RecordResults keeps those). A new release field is one line here and a storetest case.
type releaseMeta struct {
	Version    uint64                `json:"version"`
	Label      string                `json:"label,omitempty"`
	State      protocol.ReleaseState `json:"state"`
	All        bool                  `json:"all,omitempty"`
	Select     map[string]string     `json:"select,omitempty"`
	Follow     bool                  `json:"follow,omitempty"`
	Waves      []string              `json:"waves,omitempty"`
	Canary     []string              `json:"canary,omitempty"`
	MaxFail    string                `json:"max_failures,omitempty"`
	Abort      bool                  `json:"abort,omitempty"`
	Wave       int                   `json:"wave,omitempty"`
	Reason     string                `json:"pause_reason,omitempty"`
	Tolerated  int                   `json:"tolerated,omitempty"`
	TolWaves   int                   `json:"tolerated_waves,omitempty"`
	WaveLog    []WaveRecord          `json:"wave_log,omitempty"`
	MaxConc    int                   `json:"max_concurrent,omitempty"`
	DefBound   bool                  `json:"default_bound,omitempty"`
	Admitted   int                   `json:"admitted,omitempty"`
	Soak       time.Duration         `json:"soak,omitempty"`
	Approve    bool                  `json:"approve,omitempty"`
	Approved   int                   `json:"approved,omitempty"`
	StartAt    time.Time             `json:"start_at,omitzero"`
	Window     string                `json:"window,omitempty"`
	DevTimeout time.Duration         `json:"device_timeout,omitempty"`
	Prefetch   bool                  `json:"prefetch,omitempty"`
	PreJitter  time.Duration         `json:"prefetch_jitter,omitempty"`
	Created    time.Time             `json:"created"`
	Manifest   []byte                `json:"manifest,omitempty"`
	ContentKey []byte                `json:"content_key,omitempty"`
	ImageSize  uint64                `json:"image_size"`
	ChunkSize  uint32                `json:"chunk_size"`
	ChunkCount uint32                `json:"chunk_count"`
}

// MarshalReleaseMeta encodes what a store keeps of r besides its id and counts (JSON).
func MarshalReleaseMeta(r *Release) ([]byte, error) {
	return json.Marshal(releaseMeta{
		Version: r.Version, Label: r.Label, State: r.State, All: r.All, Select: r.Select, Follow: r.Follow, Created: r.Created.UTC(),
		Waves: r.Waves, Canary: r.Canary, MaxFail: r.MaxFailures, Abort: r.Abort, Wave: r.Wave, Reason: r.PauseReason, Tolerated: r.Tolerated,
		MaxConc: r.MaxConcurrent, DefBound: r.DefaultBound, Admitted: r.Admitted, Soak: r.Soak, Approve: r.Approve, Approved: r.Approved,
		TolWaves: r.ToleratedWaves, WaveLog: r.WaveLog,
		StartAt: r.StartAt.UTC(), Window: r.Window, DevTimeout: r.DeviceTimeout, Prefetch: r.Prefetch, PreJitter: r.PrefetchJitter,
		Manifest: r.Manifest, ContentKey: r.ContentKey, ImageSize: r.ImageSize,
		ChunkSize: r.ChunkSize, ChunkCount: r.ChunkCount,
	})
}

// UnmarshalReleaseMeta decodes what MarshalReleaseMeta encoded into the release id; the
// store adds the counts.
func UnmarshalReleaseMeta(id keychain.ReleaseID, b []byte) (*Release, error) {
	var m releaseMeta
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("release %v: corrupt record: %w", id, err)
	}
	return &Release{
		ID: id, Version: m.Version, Label: m.Label, State: m.State, All: m.All, Select: m.Select, Follow: m.Follow, Created: m.Created,
		Waves: m.Waves, Canary: m.Canary, MaxFailures: m.MaxFail, Abort: m.Abort, Wave: m.Wave, PauseReason: m.Reason, Tolerated: m.Tolerated,
		MaxConcurrent: m.MaxConc, DefaultBound: m.DefBound, Admitted: m.Admitted, Soak: m.Soak, Approve: m.Approve, Approved: m.Approved,
		ToleratedWaves: m.TolWaves, WaveLog: m.WaveLog,
		StartAt: m.StartAt, Window: m.Window, DeviceTimeout: m.DevTimeout, Prefetch: m.Prefetch, PrefetchJitter: m.PreJitter,
		Manifest: m.Manifest, ContentKey: m.ContentKey, ImageSize: m.ImageSize,
		ChunkSize: m.ChunkSize, ChunkCount: m.ChunkCount,
	}, nil
}
