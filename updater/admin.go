package updater

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// maxProvision bounds one device.provision request: its reply carries the device files
// and must fit in one MQTT message (PROTOCOL.md 9).
const maxProvision = 1000

// Admin is the admin service: one method per admin command of PROTOCOL.md 12.1, with
// typed arguments and results. The MQTT admin topic is one transport over it; a Go
// caller, an HTTP API or a test may be another. Commands run one at a time, so that they
// never race each other (a release and a deprovision, two creates with the same
// version).
//
// An error that says what the caller did wrong, or what is unavailable, is a
// *protocol.Error with its code; any other error is an internal failure.
//
// Its methods come from two halves that share one state: fleetAdmin (devices, uploads,
// keys, the fleet) and releaseAdmin (releases).
type Admin struct {
	fleetAdmin
	releaseAdmin
}

func newAdmin(core *adminCore) *Admin {
	return &Admin{fleetAdmin{core}, releaseAdmin{core}}
}

// fleetAdmin is the half of Admin for devices, uploads, release keys and the fleet.
type fleetAdmin struct{ *adminCore }

// releaseAdmin is the half of Admin for releases.
type releaseAdmin struct{ *adminCore }

// adminCore is what both halves of Admin use; its lock runs one command at a time.
type adminCore struct {
	// maxConcurrent is the bound of releases that give none (protocol.NoBound: none).
	maxConcurrent int
	store         Store
	bus           Bus
	keys          *keys
	runs          *registry
	life          *lifecycle
	place         *placer
	status        *statusPublisher
	uploads       *uploads
	revoker       Revoker
	accounts      Accounts
	keyStore      KeyStore
	stats         *counters
	log           zerolog.Logger
	now           func() time.Time
	workers       int
	brokerURL     string

	mu sync.Mutex // one command at a time
}

func unavailable(err error) error {
	return protocol.Errorf(protocol.ErrUnavailable, "store: %v; retry later", err)
}

// Provision creates devices and returns their device files (device.provision).
func (a *fleetAdmin) Provision(ctx context.Context, args protocol.ProvisionArgs) (*protocol.ProvisionResult, error) {
	serials, length, err := provisionList(args, a.keys.chainLength)
	if err != nil {
		return nil, err
	}
	if err := protocol.CheckTags(args.Tags); err != nil {
		return nil, err
	}
	if a.accounts != nil {
		for _, s := range serials {
			if a.accounts.IsAccount(s) {
				return nil, protocol.Errorf(protocol.ErrConflict, "serial %q is the name of a broker account; a device cannot share it (PROTOCOL.md [SC-2.2])", s)
			}
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	existing, err := a.store.Devices(ctx, serials)
	if err != nil {
		return nil, unavailable(err)
	}
	var dup []string
	for _, d := range existing {
		if d != nil {
			dup = append(dup, d.Serial)
		}
	}
	if len(dup) > 0 {
		return nil, protocol.Errorf(protocol.ErrConflict, "already provisioned: %s (deprovision first to re-issue)", strings.Join(first(dup, 10), ", "))
	}
	now := a.now()
	devs, files, err := a.keys.newDevices(serials, length, a.brokerURL, now, a.workers)
	if err != nil {
		return nil, err
	}
	for _, d := range devs {
		if len(args.Tags) > 0 {
			d.Tags = maps.Clone(args.Tags)
		}
	}
	if dup, err = a.store.CreateDevices(ctx, devs); err != nil {
		return nil, unavailable(err)
	}
	if len(dup) > 0 {
		return nil, protocol.Errorf(protocol.ErrConflict, "provisioned concurrently by another request: %s", strings.Join(first(dup, 10), ", "))
	}
	if a.revoker != nil {
		for _, s := range serials {
			if err := a.revoker.Unrevoke(s); err != nil {
				// The device is provisioned but a revocation of an earlier device of
				// that serial still stands: it is refused until provisioned again.
				a.log.Error().Err(err).Str("serial", s).Msg("lifting an earlier revocation")
			}
		}
	}
	a.status.fleetChanged()
	statuses := make([]protocol.Message, len(devs))
	for i, d := range devs {
		statuses[i] = deviceStatusMessage(d, protocol.DeviceIdle, "", now)
	}
	if err := a.bus.Publish(ctx, statuses...); err != nil && ctx.Err() == nil {
		a.log.Warn().Err(err).Int("devices", len(devs)).Msg("publishing device statuses")
	}
	if err := a.follow(ctx, devs); err != nil {
		a.log.Error().Err(err).Msg("adding new devices to the releases that follow them; they join at the next restart")
	}
	return &protocol.ProvisionResult{Devices: files}, nil
}

// provisionList checks a device.provision request and returns its serials and chain
// length (def if the request gives none).
func provisionList(a protocol.ProvisionArgs, def uint32) ([]string, uint32, error) {
	serials := a.Serials
	switch {
	case len(serials) > 0 && (a.Count != 0 || a.Prefix != ""):
		return nil, 0, protocol.Errorf(protocol.ErrBadRequest, "give either serials or count and prefix, not both")
	case len(serials) == 0 && a.Count <= 0:
		return nil, 0, protocol.Errorf(protocol.ErrBadRequest, "give serials, or a positive count with a prefix")
	case len(serials) == 0 && a.Count <= maxProvision:
		for i := 1; i <= a.Count; i++ {
			serials = append(serials, fmt.Sprintf("%s%06d", a.Prefix, i))
		}
	}
	if len(serials) > maxProvision || a.Count > maxProvision {
		return nil, 0, protocol.Errorf(protocol.ErrTooLarge, "at most %d devices per request; send several requests", maxProvision)
	}
	length := a.ChainLength
	if length == 0 {
		length = def
	}
	if !keychain.ValidChainLength(length) {
		return nil, 0, protocol.Errorf(protocol.ErrBadRequest, "chain_length %d must be a power of two from %d to %d", length, keychain.MinChainLength, keychain.MaxChainLength)
	}
	seen := map[string]bool{}
	for _, s := range serials {
		if err := keychain.CheckSerial(s); err != nil {
			return nil, 0, protocol.Errorf(protocol.ErrBadRequest, "%v", err)
		}
		if protocol.Reserved(s) {
			return nil, 0, protocol.Errorf(protocol.ErrBadRequest, "serial %q is reserved for broker accounts (%s, and names beginning with %q; PROTOCOL.md [SC-2.2])", s, strings.Join(protocol.ReservedNames, ", "), protocol.ReservedPrefix)
		}
		if seen[s] {
			return nil, 0, protocol.Errorf(protocol.ErrBadRequest, "serial %q is listed twice", s)
		}
		seen[s] = true
	}
	return serials, length, nil
}

// leaveReleases takes serial out of the targets of every release in progress, in the
// store, then in memory.
func (a *fleetAdmin) leaveReleases(ctx context.Context, serial string) error {
	for _, r := range a.runs.all() {
		id := r.release().ID
		if _, err := a.store.RemoveTarget(ctx, id, serial); err != nil {
			return fmt.Errorf("taking %s out of release %s: %w", serial, id, err)
		}
	}
	for _, id := range a.runs.removeTarget(serial) {
		a.status.releaseChanged(id)
	}
	return nil
}

func first(s []string, n int) []string {
	if len(s) > n {
		return append(s[:n:n], fmt.Sprintf("and %d more", len(s)-n))
	}
	return s
}

// Deprovision revokes a device's broker access, takes it out of the targets of the
// releases in progress (so that they can complete), forgets it, and clears its retained
// topics (device.deprovision).
func (a *fleetAdmin) Deprovision(ctx context.Context, serial string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, err := findDevice(ctx, a.store, serial); err != nil {
		return err
	}
	// Revoke first: a device that is gone from the store but can still connect could
	// read release topics; one that is revoked but still in the store is only refused.
	if a.revoker != nil {
		if err := a.revoker.Revoke(serial); err != nil {
			return unavailable(err)
		}
	}
	undo := func() {
		if a.revoker == nil {
			return
		}
		if uerr := a.revoker.Unrevoke(serial); uerr != nil {
			a.log.Error().Err(uerr).Str("serial", serial).Msg("undoing the revocation of a device still provisioned")
		}
	}
	if err := a.leaveReleases(ctx, serial); err != nil {
		undo()
		return unavailable(err)
	}
	if _, err := a.store.DeleteDevice(ctx, serial); err != nil {
		undo()
		return unavailable(err)
	}
	a.status.fleetChanged()
	return a.bus.Publish(ctx,
		protocol.Message{Topic: protocol.KeyTopic(serial), Retain: true},
		protocol.Message{Topic: protocol.ReceiptTopic(serial), Retain: true},
		protocol.Message{Topic: protocol.DeviceStatusTopic(serial), Retain: true})
}

// maxDeviceList is the most devices one device.list reply holds.
const maxDeviceList = 1000

// Devices returns a page of the fleet as the store has it, in serial order, with each
// device's presence (device.list).
func (a *fleetAdmin) Devices(ctx context.Context, args protocol.DeviceListArgs) (protocol.DeviceListResult, error) {
	if args.Limit < 0 || args.Limit > maxDeviceList {
		return protocol.DeviceListResult{}, protocol.Errorf(protocol.ErrBadRequest, "limit %d: give 1 to %d (0: %d)", args.Limit, maxDeviceList, maxDeviceList)
	}
	limit := args.Limit
	if limit == 0 {
		limit = maxDeviceList
	}
	serials, err := a.store.Serials(ctx)
	if err != nil {
		return protocol.DeviceListResult{}, unavailable(err)
	}
	i, _ := slices.BinarySearch(serials, args.After) // Serials are sorted
	if i < len(serials) && serials[i] == args.After {
		i++
	}
	page := serials[i:min(i+limit, len(serials))]
	res := protocol.DeviceListResult{Devices: []protocol.DeviceStatus{}, Total: len(serials)}
	if i+len(page) < len(serials) && len(page) > 0 {
		res.Next = page[len(page)-1]
	}
	devs, err := a.store.Devices(ctx, page)
	if err != nil {
		return protocol.DeviceListResult{}, unavailable(err)
	}
	online := a.status.onlineOf(page)
	now := a.now()
	for k, d := range devs {
		if d == nil {
			continue // deprovisioned meanwhile
		}
		st := deviceStatus(d, d.State, d.LastResult, now)
		on := online[k]
		st.Online = &on
		res.Devices = append(res.Devices, st)
	}
	return res, nil
}

// Device returns the server's view of a device (device.get).
func (a *fleetAdmin) Device(ctx context.Context, serial string) (protocol.DeviceStatus, error) {
	d, err := findDevice(ctx, a.store, serial)
	if err != nil {
		return protocol.DeviceStatus{}, err
	}
	st := deviceStatus(d, d.State, d.LastResult, a.now())
	if st.History, err = deviceHistory(ctx, a.store, d); err != nil {
		return protocol.DeviceStatus{}, unavailable(err)
	}
	return st, nil
}

// historyReleases is how many of the newest releases a device's history looks at.
const historyReleases = 100

// deviceHistory returns d's part in the newest historyReleases releases, newest first
// (13.4): the result the store holds, or pending where the release's key is wrapped at
// the device's position and it has none; releases it has no part in are left out.
func deviceHistory(ctx context.Context, store Store, d *Device) ([]protocol.DeviceRelease, error) {
	rels, err := store.Releases(ctx)
	if err != nil {
		return nil, err
	}
	var out []protocol.DeviceRelease
	for i := len(rels) - 1; i >= max(0, len(rels)-historyReleases); i-- {
		rel := rels[i]
		res, err := store.Results(ctx, rel.ID, []string{d.Serial})
		if err != nil {
			return nil, err
		}
		h := protocol.DeviceRelease{Release: rel.ID, Version: rel.Version, Label: rel.Label, State: rel.State, Created: rel.Created}
		code, failed := strings.CutPrefix(res[0], ResultFailed+":")
		switch {
		case res[0] == ResultInstalled:
			h.Result = protocol.HistoryInstalled
		case failed:
			h.Result, h.Code = protocol.HistoryFailed, code
		case slices.Contains(d.Assigned, rel.ID):
			h.Result = protocol.HistoryPending
		default:
			continue
		}
		out = append(out, h)
	}
	return out, nil
}

// findDevice reads a device, with the admin error for a bad or unknown serial.
func findDevice(ctx context.Context, store Store, serial string) (*Device, error) {
	if err := keychain.CheckSerial(serial); err != nil {
		return nil, protocol.Errorf(protocol.ErrBadRequest, "%v", err)
	}
	ds, err := store.Devices(ctx, []string{serial})
	if err != nil {
		return nil, unavailable(err)
	}
	if ds[0] == nil {
		return nil, protocol.Errorf(protocol.ErrNotFound, "no device %q is provisioned", serial)
	}
	return ds[0], nil
}

// Tag sets and removes tags of a device (device.tag) and returns its status. A device
// that now matches a release in progress that follows its selection joins it; one that
// no longer matches stays a target of the releases it is in.
func (a *fleetAdmin) Tag(ctx context.Context, args protocol.TagArgs) (protocol.DeviceStatus, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	d, err := findDevice(ctx, a.store, args.Serial)
	if err != nil {
		return protocol.DeviceStatus{}, err
	}
	tags := maps.Clone(d.Tags)
	if tags == nil {
		tags = map[string]string{}
	}
	maps.Copy(tags, args.Set)
	for _, k := range args.Unset {
		delete(tags, k)
	}
	if err := protocol.CheckTags(tags); err != nil {
		return protocol.DeviceStatus{}, err
	}
	if ok, err := a.store.PutTags(ctx, d.Serial, tags); err != nil {
		return protocol.DeviceStatus{}, unavailable(err)
	} else if !ok {
		return protocol.DeviceStatus{}, protocol.Errorf(protocol.ErrNotFound, "no device %q is provisioned", d.Serial)
	}
	d.Tags = tags
	now := a.now()
	if err := a.bus.Publish(ctx, deviceStatusMessage(d, d.State, d.LastResult, now)); err != nil && ctx.Err() == nil {
		a.log.Warn().Err(err).Str("serial", d.Serial).Msg("publishing the device status")
	}
	if err := a.follow(ctx, []*Device{d}); err != nil {
		return protocol.DeviceStatus{}, unavailable(err)
	}
	return deviceStatus(d, d.State, d.LastResult, now), nil
}

// follow adds devs to the targets of every release in progress that follows a selection
// they match, and publishes what each of them should see now ([SC-12.4]).
func (a *fleetAdmin) follow(ctx context.Context, devs []*Device) error {
	var joined []*Device
	for _, r := range a.runs.all() {
		rel := r.release()
		if !rel.Follow {
			continue
		}
		var add []string
		for _, d := range devs {
			if protocol.Matches(d.Tags, rel.Select) && !a.runs.isTarget(rel.ID, d.Serial) {
				add = append(add, d.Serial)
			}
		}
		if len(add) == 0 {
			continue
		}
		if err := a.store.AddTargets(ctx, rel.ID, add); err != nil {
			return fmt.Errorf("adding %d devices to release %s: %w", len(add), rel.ID, err)
		}
		a.runs.addTargets(rel.ID, add)
		a.status.releaseChanged(rel.ID)
		for _, d := range devs {
			if slices.Contains(add, d.Serial) && !slices.Contains(joined, d) {
				joined = append(joined, d)
			}
		}
	}
	if len(joined) == 0 {
		return nil
	}
	return a.place.nextForAll(ctx, joined)
}

// Fleet returns the fleet status as the store has it now (fleet.get): what the retained
// fleet status (13.1) shows within a moment, read at once, so that an operator who just
// provisioned sees the devices.
func (a *fleetAdmin) Fleet(ctx context.Context) (protocol.FleetStatus, error) {
	fs, err := a.status.fleetStatus(ctx)
	if err != nil {
		return protocol.FleetStatus{}, unavailable(err)
	}
	return fs, nil
}

// BeginUpload starts receiving an image in parts (upload.begin).
func (a *fleetAdmin) BeginUpload(_ context.Context, args protocol.UploadBeginArgs) (protocol.UploadBeginResult, error) {
	up, err := a.uploads.begin(args.Size, args.SHA256)
	if err != nil {
		return protocol.UploadBeginResult{}, err
	}
	return protocol.UploadBeginResult{Upload: up.id, PartSize: partSize, Topic: protocol.UploadBase(up.id)}, nil
}

// FinishUpload checks that an upload is whole (upload.finish).
func (a *fleetAdmin) FinishUpload(_ context.Context, upload string) (protocol.UploadFinishResult, error) {
	up, err := a.uploads.finish(upload)
	if err != nil {
		return protocol.UploadFinishResult{}, err
	}
	return protocol.UploadFinishResult{Size: up.size, SHA256: up.sha256}, nil
}

// RotateKey makes a new release-signing key, publishes its key statement (signed by the
// current key) retained, and signs every later manifest with it (keys.rotate, PROTOCOL.md
// 5.1). Devices that learn the statement refuse manifests signed by older keys, so it is
// refused while a release is publishing, active or paused: cancel it, or let it
// complete, first.
func (a *fleetAdmin) RotateKey(ctx context.Context) (protocol.KeyRotateResult, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.keyStore == nil {
		return protocol.KeyRotateResult{}, protocol.Errorf(protocol.ErrUnavailable, "this updater has no key store to keep a new release key in")
	}
	if held := a.runs.all(); len(held) > 0 {
		rel := held[0].release()
		return protocol.KeyRotateResult{}, protocol.Errorf(protocol.ErrConflict,
			"release %s is %s: devices that learn a new key refuse its manifest; cancel it or let it complete, then rotate", rel.ID, rel.State)
	}
	seq, pub, st, err := a.keys.release.rotate(a.keyStore)
	if err != nil {
		return protocol.KeyRotateResult{}, protocol.Errorf(protocol.ErrUnavailable, "keeping the new release key: %v; the key is unchanged", err)
	}
	res := protocol.KeyRotateResult{Seq: seq, PublicKey: protocol.HexBytes(pub), Topic: protocol.KeyStatementTopic(seq)}
	a.log.Info().Uint32("key_seq", seq).Hex("public_key", pub).Msg("release key rotated")
	if err := a.bus.Publish(ctx, protocol.Message{Topic: res.Topic, Payload: st, Retain: true}); err != nil {
		// The key is rotated and kept; the statement goes out again at the next start.
		return res, protocol.Errorf(protocol.ErrUnavailable, "release key %d is kept but its statement is not published (%v); it is published again at the next start", seq, err)
	}
	return res, nil
}

// publishKeyStatements publishes every key statement, retained, so that a device that
// missed a rotation, or a broker that lost its retained messages, catches up (5.1).
func publishKeyStatements(ctx context.Context, bus Bus, r *releaseKeys) error {
	sts := r.all()
	msgs := make([]protocol.Message, len(sts))
	for i, st := range sts {
		msgs[i] = protocol.Message{Topic: protocol.KeyStatementTopic(uint32(i + 1)), Payload: st, Retain: true}
	}
	if len(msgs) == 0 {
		return nil
	}
	return bus.Publish(ctx, msgs...)
}
