package protocol

import (
	"encoding/json"
	"time"

	"github.com/sealcast/sealcast/keychain"
)

// Request is an admin command (PROTOCOL.md 12).
type Request struct {
	ID   string          `json:"id"`
	Cmd  string          `json:"cmd"`
	Args json.RawMessage `json:"args,omitempty"`
}

// Reply answers a Request on ReplyTopic(ID).
type Reply struct {
	ID     string          `json:"id"`
	OK     bool            `json:"ok"`
	Result json.RawMessage `json:"result,omitempty"`
	Error  *Error          `json:"error,omitempty"`
}

// Admin commands (PROTOCOL.md 12.1).
const (
	CmdProvision      = "device.provision"
	CmdDeprovision    = "device.deprovision"
	CmdDeviceGet      = "device.get"
	CmdDeviceList     = "device.list"
	CmdDeviceTag      = "device.tag"
	CmdUploadBegin    = "upload.begin"
	CmdUploadFinish   = "upload.finish"
	CmdReleaseCreate  = "release.create"
	CmdReleasePause   = "release.pause"
	CmdReleaseResume  = "release.resume"
	CmdReleaseCancel  = "release.cancel"
	CmdReleaseRetire  = "release.retire"
	CmdReleaseApprove = "release.approve"
	CmdReleaseGet     = "release.get"
	CmdReleaseList    = "release.list"
	CmdFleetGet       = "fleet.get"
	CmdReleasePending = "release.pending"
	CmdKeysRotate     = "keys.rotate"
)

// ProvisionArgs are the arguments of device.provision: Serials, or Count devices named
// Prefix followed by a zero-padded number.
type ProvisionArgs struct {
	Serials     []string `json:"serials,omitempty"`
	Count       int      `json:"count,omitempty"`
	Prefix      string   `json:"prefix,omitempty"`
	ChainLength uint32   `json:"chain_length,omitempty"`
	// Tags are set on every device of the request (12.4).
	Tags map[string]string `json:"tags,omitempty"`
}

// DeviceListArgs are the arguments of device.list: the devices whose serials sort after
// After, at most Limit of them (1 to 1,000; 0 is 1,000).
type DeviceListArgs struct {
	After string `json:"after,omitempty"`
	Limit int    `json:"limit,omitempty"`
}

// DeviceListResult is the result of device.list: devices in serial order with their
// presence, Next to pass as After for the following page ("" after the last), and how
// many devices there are.
type DeviceListResult struct {
	Devices []DeviceStatus `json:"devices"`
	Next    string         `json:"next,omitempty"`
	Total   int            `json:"total"`
}

// ProvisionResult is the result of device.provision.
type ProvisionResult struct {
	Devices []DeviceFile `json:"devices"`
}

// SerialArgs names one device.
type SerialArgs struct {
	Serial string `json:"serial"`
}

// UploadBeginArgs are the arguments of upload.begin.
type UploadBeginArgs struct {
	Size   uint64 `json:"size"`
	SHA256 string `json:"sha256"`
}

// UploadBeginResult tells the operator where to publish the parts.
type UploadBeginResult struct {
	Upload   string `json:"upload"`
	PartSize int    `json:"part_size"`
	Topic    string `json:"topic"`
}

// UploadArgs names one upload.
type UploadArgs struct {
	Upload string `json:"upload"`
}

// UploadFinishResult is the result of upload.finish.
type UploadFinishResult struct {
	Size   uint64 `json:"size"`
	SHA256 string `json:"sha256"`
}

// ReleaseCreateArgs are the arguments of release.create.
type ReleaseCreateArgs struct {
	Upload    string   `json:"upload"`
	Version   uint64   `json:"version"`
	Devices   []string `json:"devices,omitempty"`
	All       bool     `json:"all,omitempty"`
	ChunkSize uint32   `json:"chunk_size,omitempty"`
	Label     string   `json:"label,omitempty"`
	// AllowJump lets Version be more than MaxVersionJump above the version floor.
	AllowJump bool `json:"allow_jump,omitempty"`
	// Select targets the devices whose tags include every pair (12.4), instead of
	// Devices or All. Follow, with Select or All, makes devices provisioned or tagged
	// later that match join the release while it is in progress.
	Select map[string]string `json:"select,omitempty"`
	Follow bool              `json:"follow,omitempty"`
	// Waves releases the keys wave by wave (12.5): cumulative "P%", counts, or "all".
	// MaxFailures ("P%" or a count) pauses the release when more targets than that
	// fail permanently, or cancels it with AbortOnFailure.
	Waves []string `json:"waves,omitempty"`
	// Canary names devices that form a first wave of their own (12.5).
	Canary         []string `json:"canary,omitempty"`
	MaxFailures    string   `json:"max_failures,omitempty"`
	AbortOnFailure bool     `json:"abort_on_failure,omitempty"`
	// MaxConcurrent bounds the targets holding a key they have not settled (12.5): 0 or
	// absent takes the server's default, NoBound (-1) sets none.
	MaxConcurrent int `json:"max_concurrent,omitempty"`
	// Soak is how long the open waves must have settled before the next opens (a Go
	// duration such as "10m"); with Approve, the next wave also waits for
	// release.approve.
	Soak    string `json:"soak,omitempty"`
	Approve bool   `json:"approve,omitempty"`
	// StartAt and Window hold every key back until StartAt and outside Window (12.6).
	StartAt *time.Time `json:"start_at,omitempty"`
	Window  string     `json:"window,omitempty"`
	// DeviceTimeout counts a target that got its key and has not settled within it as
	// timed out (12.5): a duration such as "30m".
	DeviceTimeout string `json:"device_timeout,omitempty"`
	// Prefetch announces the release to every target at once, before any key, so that
	// devices that can download it ahead do, spread over PrefetchJitter (a duration,
	// default 10m) (12.7).
	Prefetch       bool   `json:"prefetch,omitempty"`
	PrefetchJitter string `json:"prefetch_jitter,omitempty"`
}

// DefaultPrefetchJitter is the period over which devices spread their prefetch, unless
// release.create gives prefetch_jitter (12.7).
const DefaultPrefetchJitter = 10 * time.Minute

// NoBound as a release's max_concurrent sets no concurrency bound (12.5).
const NoBound = -1

// DefaultMaxConcurrent is the concurrency bound of a release that gives none, unless the
// server is configured otherwise (12.5).
const DefaultMaxConcurrent = 1000

// MaxVersionJump is how far above the version floor (the highest version of a release
// neither cancelled nor retired) release.create accepts a version without allow_jump:
// a guard against a mistyped version that would block every later release.
const MaxVersionJump = 1 << 32

// ReleaseCreateResult is the result of release.create.
type ReleaseCreateResult struct {
	Release keychain.ReleaseID `json:"release"`
	Targets int                `json:"targets"`
}

// ReleaseArgs names one release.
type ReleaseArgs struct {
	Release keychain.ReleaseID `json:"release"`
}

// ReleaseListResult is the result of release.list.
type ReleaseListResult struct {
	Releases []ReleaseStatus `json:"releases"`
}

// ReleaseState is a release's state (PROTOCOL.md 12.2).
type ReleaseState string

// Release states (PROTOCOL.md 12.2).
const (
	ReleasePublishing ReleaseState = "publishing"
	ReleaseActive     ReleaseState = "active"
	ReleasePaused     ReleaseState = "paused"
	ReleaseCompleted  ReleaseState = "completed"
	ReleaseCancelled  ReleaseState = "cancelled"
	// ReleaseRetired is a completed or cancelled release taken out of the version floor
	// (release.retire): a later release may have a lower version.
	ReleaseRetired ReleaseState = "retired"
)

// ReleaseStates lists every release state, in lifecycle order.
var ReleaseStates = []ReleaseState{ReleasePublishing, ReleaseActive, ReleasePaused, ReleaseCompleted, ReleaseCancelled, ReleaseRetired}

// FleetStatus is retained on FleetStatusTopic (PROTOCOL.md 13.1).
type FleetStatus struct {
	Devices  int                  `json:"devices"`
	Online   int                  `json:"online"`
	Releases map[ReleaseState]int `json:"releases"`
	// Versions counts the devices by the version the server records as installed
	// (decimal keys), counted at most once a minute (less often for a large fleet).
	Versions map[string]int `json:"versions,omitempty"`
	Updated  time.Time      `json:"updated"`
}

// ReleaseStatus is retained on ReleaseStatusTopic (PROTOCOL.md 13.2).
type ReleaseStatus struct {
	Release   keychain.ReleaseID `json:"release"`
	Version   uint64             `json:"version"`
	Label     string             `json:"label,omitempty"`
	State     ReleaseState       `json:"state"`
	Targets   int                `json:"targets"`
	Wrapped   int                `json:"wrapped"`
	Installed int                `json:"installed"`
	Failed    int                `json:"failed"`
	Pending   int                `json:"pending"`
	// Wave is the wave open now, from 1, and Waves every wave of the plan (none for a
	// release without waves); PauseReason says why a paused release is paused: operator
	// or failure_threshold.
	Wave        int          `json:"wave,omitempty"`
	Waves       []WaveStatus `json:"waves,omitempty"`
	PauseReason string       `json:"pause_reason,omitempty"`
	// MaxConcurrent is the release's concurrency bound (0: none); DefaultBound says it
	// is the server's default, which counts online targets only. Offered is how many
	// targets have been offered the release so far, with waves or a bound (12.5).
	MaxConcurrent int  `json:"max_concurrent,omitempty"`
	DefaultBound  bool `json:"default_bound,omitempty"`
	Offered       int  `json:"offered,omitempty"`
	// TimedOut is how many offered targets have not settled within the device timeout.
	TimedOut int `json:"timed_out,omitempty"`
	// Failures counts the offered targets whose last result is a failure, by its code
	// name (15.1), as the server last counted them.
	Failures map[string]int `json:"failures,omitempty"`
	// Prefetch says the release was announced for prefetch, and Prefetched how many
	// devices said they hold every chunk of it (12.7).
	Prefetch   bool `json:"prefetch,omitempty"`
	Prefetched int  `json:"prefetched,omitempty"`
	// InstallTimes is the time-to-installed curve: for each bound of InstallTimeBounds in
	// turn, how many targets had installed the release within that time of its start
	// (cumulative), up to the first bound by which every install counted had happened.
	InstallTimes []InstallTime `json:"install_times,omitempty"`
	// NextWave says, once the open waves have settled, what the next one waits for:
	// "soak" until NextWaveAt, or "approval".
	NextWave   string     `json:"next_wave,omitempty"`
	NextWaveAt *time.Time `json:"next_wave_at,omitempty"`
	ChunkSize  uint32     `json:"chunk_size"`
	ChunkCount uint32     `json:"chunk_count"`
	ImageSize  uint64     `json:"image_size"`
	Created    time.Time  `json:"created"`
	Updated    time.Time  `json:"updated"`
}

// InstallTimeBounds are the bounds of a release's time-to-installed curve (13.2).
var InstallTimeBounds = []time.Duration{
	5 * time.Second, 10 * time.Second, 20 * time.Second, 30 * time.Second,
	time.Minute, 2 * time.Minute, 5 * time.Minute, 10 * time.Minute, 20 * time.Minute, 30 * time.Minute,
	time.Hour, 2 * time.Hour, 4 * time.Hour, 8 * time.Hour, 12 * time.Hour,
	24 * time.Hour, 48 * time.Hour, 96 * time.Hour, 7 * 24 * time.Hour, 14 * 24 * time.Hour, 30 * 24 * time.Hour,
}

// InstallTime is one point of a release's time-to-installed curve: Installed targets had
// installed it within Within seconds of its start.
type InstallTime struct {
	Within    int64 `json:"within"`
	Installed int   `json:"installed"`
}

// WaveStatus is one wave of a release's status (PROTOCOL.md 13.2): its devices (not
// cumulative), when it opened and closed, and how its devices have settled.
type WaveStatus struct {
	Wave      int        `json:"wave"` // from 1
	Size      int        `json:"size"`
	Opened    *time.Time `json:"opened,omitempty"`
	Closed    *time.Time `json:"closed,omitempty"`
	Installed int        `json:"installed"`
	Failed    int        `json:"failed"`
	TimedOut  int        `json:"timed_out"`
}

// DeviceStatusState is a device's state as the server sees it, the state of a
// DeviceStatus (PROTOCOL.md 13.4). DeviceState, by contrast, is what a device says of itself.
type DeviceStatusState string

// Device states as the server sees them (PROTOCOL.md 13.4).
const (
	DevicePending   DeviceStatusState = "pending"
	DeviceWrapped   DeviceStatusState = "wrapped"
	DeviceInstalled DeviceStatusState = "installed"
	DeviceFailed    DeviceStatusState = "failed"
	DeviceRekeying  DeviceStatusState = "rekeying"
	DeviceIdle      DeviceStatusState = "idle"
)

// DeviceStatus is retained on DeviceStatusTopic (PROTOCOL.md 13.4).
type DeviceStatus struct {
	Serial     string              `json:"serial"`
	State      DeviceStatusState   `json:"state"`
	Version    uint64              `json:"version"`
	Epoch      uint32              `json:"epoch"`
	Seq        uint32              `json:"seq"`
	Release    *keychain.ReleaseID `json:"release,omitempty"`
	LastResult string              `json:"last_result,omitempty"`
	LastSeen   *time.Time          `json:"last_seen,omitempty"`
	// Online is set in device.list replies only: whether the device's presence says
	// online (9.1).
	Online *bool             `json:"online,omitempty"`
	Tags   map[string]string `json:"tags,omitempty"`
	// History is set in device.get replies only: the device's part in the newest
	// releases, newest first (13.4).
	History []DeviceRelease `json:"history,omitempty"`
	Updated time.Time       `json:"updated"`
}

// DeviceRelease is a device's part in one release, as the server records it (13.4):
// Result is "installed", "failed" (with the report's Code), or "pending" (the device's
// key for it is out and it has not settled).
type DeviceRelease struct {
	Release keychain.ReleaseID `json:"release"`
	Version uint64             `json:"version"`
	Label   string             `json:"label,omitempty"`
	State   ReleaseState       `json:"state"`
	Result  string             `json:"result"`
	Code    string             `json:"code,omitempty"`
	Created time.Time          `json:"created"`
}

// Device results in a device's history (DeviceRelease.Result).
const (
	HistoryInstalled = "installed"
	HistoryFailed    = "failed"
	HistoryPending   = "pending"
)

// Device agent states (PROTOCOL.md 13.3).
const (
	AgentIdle        = "idle"
	AgentDownloading = "downloading"
	AgentInstalling  = "installing"
	AgentInstalled   = "installed"
	AgentFailed      = "failed"
	AgentTrial       = "trial" // the new image runs on trial; its health is being checked (10.5)
)

// DeviceState is what a device retains on its StateTopic (PROTOCOL.md 13.3).
type DeviceState struct {
	Serial     string              `json:"serial"`
	State      string              `json:"state"`
	Version    uint64              `json:"version"`
	Epoch      uint32              `json:"epoch"`
	Seq        uint32              `json:"seq"`
	Release    *keychain.ReleaseID `json:"release,omitempty"`
	ChunksDone uint32              `json:"chunks_done,omitempty"`
	ChunkCount uint32              `json:"chunk_count,omitempty"`
	Error      *DeviceError        `json:"error,omitempty"`
	// Prefetch is the release the device fetches ahead of its key, and how far (9.9).
	Prefetch *PrefetchState `json:"prefetch,omitempty"`
	Updated  time.Time      `json:"updated"`
}

// PrefetchState is the prefetch part of a DeviceState (13.3): the release, how many of
// its chunks, from the first, the device keeps, and how many it has.
type PrefetchState struct {
	Release    keychain.ReleaseID `json:"release"`
	ChunksDone uint32             `json:"chunks_done"`
	ChunkCount uint32             `json:"chunk_count"`
}

// DeviceError is the error part of a DeviceState.
type DeviceError struct {
	Code    Code   `json:"code"`
	Message string `json:"message"`
}

// DeviceFile is what provisioning gives a device (PROTOCOL.md 14).
type DeviceFile struct {
	Serial           string   `json:"serial"`
	UnitData         HexBytes `json:"unit_data"`
	Epoch            uint32   `json:"epoch"`
	Seq              uint32   `json:"seq"`
	ChainLength      uint32   `json:"chain_length"`
	Version          uint64   `json:"version"`
	ReleasePublicKey HexBytes `json:"release_public_key"`
	// KeySeq is the sequence number of ReleasePublicKey: 0 until the release key was
	// first rotated (PROTOCOL.md 5.1).
	KeySeq uint32       `json:"key_seq"`
	Broker BrokerConfig `json:"broker"`
}

// BrokerConfig is how a device reaches its broker.
type BrokerConfig struct {
	URL      string `json:"url"`
	Username string `json:"username"`
	Password string `json:"password"`
}

// KeyRotateResult is the result of keys.rotate: the new release key, its sequence number,
// and where its key statement is retained.
type KeyRotateResult struct {
	Seq       uint32   `json:"seq"`
	PublicKey HexBytes `json:"public_key"`
	Topic     string   `json:"topic"`
}

// ReleasePendingArgs are the arguments of release.pending: at most Limit serials (default
// 100, at most 1,000).
type ReleasePendingArgs struct {
	Release keychain.ReleaseID `json:"release"`
	Limit   int                `json:"limit,omitempty"`
}

// ReleasePendingResult names the targets of a release that have no result yet: the first
// serials in order, and how many there are in all.
type ReleasePendingResult struct {
	Pending []string `json:"pending"`
	Total   int      `json:"total"`
}
