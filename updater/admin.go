package updater

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// maxProvision bounds one device.provision request: its reply carries the device files
// and must fit in one MQTT message (PROTOCOL.md 9).
const maxProvision = 1000

// adminLoop handles admin requests one at a time, so that commands never race each
// other (a release and a deprovision, two creates with the same version).
func (u *Updater) adminLoop(ctx context.Context) {
	defer u.uploads.close()
	for {
		select {
		case <-ctx.Done():
			return
		case b := <-u.admin:
			u.handleAdmin(ctx, b)
		}
	}
}

func (u *Updater) handleAdmin(ctx context.Context, b []byte) {
	var req protocol.Request
	if err := json.Unmarshal(b, &req); err != nil || !protocol.ValidID(req.ID) {
		// [SC-12.1] without a readable id there is no topic to reply on.
		u.log.Warn().Err(err).Int("bytes", len(b)).Msg("admin request without a valid id; no reply possible")
		return
	}
	result, err := u.dispatch(ctx, req)
	reply := protocol.Reply{ID: req.ID, OK: err == nil}
	if err != nil {
		var pe *protocol.Error
		if !errors.As(err, &pe) {
			u.log.Error().Err(err).Str("cmd", req.Cmd).Msg("admin command failed")
			pe = protocol.Errorf(protocol.ErrInternal, "%v", err)
		}
		reply.Error = pe
		u.log.Info().Str("id", req.ID).Str("cmd", req.Cmd).Str("code", string(pe.Code)).Msg(pe.Message)
	} else {
		reply.Result, _ = json.Marshal(result)
		u.log.Info().Str("id", req.ID).Str("cmd", req.Cmd).Msg("admin command done")
	}
	out, _ := json.Marshal(reply)
	if err := u.o.Bus.Publish(ctx, protocol.Message{Topic: protocol.ReplyTopic(req.ID), Payload: out}); err != nil {
		u.log.Error().Err(err).Msg("publishing admin reply")
	}
}

// args decodes a command's arguments strictly: unknown fields are errors, so that a typo
// never silently means "all devices".
func args(req protocol.Request, v any) error {
	if len(req.Args) == 0 {
		req.Args = []byte("{}")
	}
	dec := json.NewDecoder(strings.NewReader(string(req.Args)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return protocol.Errorf(protocol.ErrBadRequest, "%s: bad arguments: %v", req.Cmd, err)
	}
	return nil
}

func (u *Updater) dispatch(ctx context.Context, req protocol.Request) (any, error) {
	switch req.Cmd {
	case protocol.CmdProvision:
		var a protocol.ProvisionArgs
		if err := args(req, &a); err != nil {
			return nil, err
		}
		return u.provision(ctx, a)
	case protocol.CmdDeprovision:
		var a protocol.SerialArgs
		if err := args(req, &a); err != nil {
			return nil, err
		}
		return struct{}{}, u.deprovision(ctx, a.Serial)
	case protocol.CmdDeviceGet:
		var a protocol.SerialArgs
		if err := args(req, &a); err != nil {
			return nil, err
		}
		d, err := u.device(ctx, a.Serial)
		if err != nil {
			return nil, err
		}
		return deviceStatus(d, d.State, d.LastResult, u.o.Now()), nil
	case protocol.CmdUploadBegin:
		var a protocol.UploadBeginArgs
		if err := args(req, &a); err != nil {
			return nil, err
		}
		up, err := u.uploads.begin(a.Size, a.SHA256)
		if err != nil {
			return nil, err
		}
		return protocol.UploadBeginResult{Upload: up.id, PartSize: partSize, Topic: protocol.UploadBase(up.id)}, nil
	case protocol.CmdUploadFinish:
		var a protocol.UploadArgs
		if err := args(req, &a); err != nil {
			return nil, err
		}
		up, err := u.uploads.finish(a.Upload)
		if err != nil {
			return nil, err
		}
		return protocol.UploadFinishResult{Size: up.size, SHA256: up.sha256}, nil
	case protocol.CmdReleaseCreate:
		var a protocol.ReleaseCreateArgs
		if err := args(req, &a); err != nil {
			return nil, err
		}
		return u.createRelease(ctx, a)
	case protocol.CmdReleasePause, protocol.CmdReleaseResume, protocol.CmdReleaseCancel, protocol.CmdReleaseGet:
		var a protocol.ReleaseArgs
		if err := args(req, &a); err != nil {
			return nil, err
		}
		return u.releaseCommand(ctx, req.Cmd, a.Release)
	case protocol.CmdReleaseList:
		rels, err := u.o.Store.Releases(ctx)
		if err != nil {
			return nil, unavailable(err)
		}
		out := protocol.ReleaseListResult{Releases: []protocol.ReleaseStatus{}}
		for _, r := range rels {
			out.Releases = append(out.Releases, u.releaseStatus(ctx, r))
		}
		return out, nil
	}
	return nil, protocol.Errorf(protocol.ErrUnknownCommand, "unknown command %q; see docs/PROTOCOL.md section 12.1", req.Cmd)
}

func unavailable(err error) error {
	return protocol.Errorf(protocol.ErrUnavailable, "store: %v; retry later", err)
}

func (u *Updater) device(ctx context.Context, serial string) (*Device, error) {
	if err := keychain.CheckSerial(serial); err != nil {
		return nil, protocol.Errorf(protocol.ErrBadRequest, "%v", err)
	}
	ds, err := u.o.Store.Devices(ctx, []string{serial})
	if err != nil {
		return nil, unavailable(err)
	}
	if ds[0] == nil {
		return nil, protocol.Errorf(protocol.ErrNotFound, "no device %q is provisioned", serial)
	}
	return ds[0], nil
}

func (u *Updater) provision(ctx context.Context, a protocol.ProvisionArgs) (*protocol.ProvisionResult, error) {
	serials := a.Serials
	switch {
	case len(serials) > 0 && (a.Count != 0 || a.Prefix != ""):
		return nil, protocol.Errorf(protocol.ErrBadRequest, "give either serials or count and prefix, not both")
	case len(serials) == 0 && a.Count <= 0:
		return nil, protocol.Errorf(protocol.ErrBadRequest, "give serials, or a positive count with a prefix")
	case len(serials) == 0:
		if a.Count > maxProvision {
			return nil, protocol.Errorf(protocol.ErrTooLarge, "at most %d devices per request; send several requests", maxProvision)
		}
		for i := 1; i <= a.Count; i++ {
			serials = append(serials, fmt.Sprintf("%s%06d", a.Prefix, i))
		}
	}
	if len(serials) > maxProvision {
		return nil, protocol.Errorf(protocol.ErrTooLarge, "at most %d devices per request; send several requests", maxProvision)
	}
	length := a.ChainLength
	if length == 0 {
		length = u.o.ChainLength
	}
	if !keychain.ValidChainLength(length) {
		return nil, protocol.Errorf(protocol.ErrBadRequest, "chain_length %d must be a power of two from %d to %d", length, keychain.MinChainLength, keychain.MaxChainLength)
	}
	seen := map[string]bool{}
	for _, s := range serials {
		if err := keychain.CheckSerial(s); err != nil {
			return nil, protocol.Errorf(protocol.ErrBadRequest, "%v", err)
		}
		if seen[s] {
			return nil, protocol.Errorf(protocol.ErrBadRequest, "serial %q is listed twice", s)
		}
		seen[s] = true
	}
	existing, err := u.o.Store.Devices(ctx, serials)
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
	devs := make([]*Device, len(serials))
	files := make([]protocol.DeviceFile, len(serials))
	auth := u.o.Root.BrokerAuth()
	now := u.o.Now()
	var (
		wg   sync.WaitGroup
		next = make(chan int)
		errs = make([]error, len(serials))
	)
	for w := 0; w < u.o.Workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				devs[i], files[i], errs[i] = u.newDevice(serials[i], length, auth, now)
			}
		}()
	}
	for i := range serials {
		next <- i
	}
	close(next)
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	if dup, err = u.o.Store.CreateDevices(ctx, devs); err != nil {
		return nil, unavailable(err)
	}
	if len(dup) > 0 {
		return nil, protocol.Errorf(protocol.ErrConflict, "provisioned concurrently by another request: %s", strings.Join(first(dup, 10), ", "))
	}
	if u.o.Revoker != nil {
		for _, s := range serials {
			if err := u.o.Revoker.Unrevoke(s); err != nil {
				// The device is provisioned but a revocation of an earlier device of
				// that serial still stands: it is refused until provisioned again.
				u.log.Error().Err(err).Str("serial", s).Msg("lifting an earlier revocation")
			}
		}
	}
	u.mu.Lock()
	u.fleetDir = true
	u.mu.Unlock()
	statuses := make([]protocol.Message, len(devs))
	for i, d := range devs {
		statuses[i] = deviceStatusMessage(d, protocol.DeviceIdle, "", now)
	}
	if err := u.o.Bus.Publish(ctx, statuses...); err != nil && ctx.Err() == nil {
		u.log.Warn().Err(err).Int("devices", len(devs)).Msg("publishing device statuses")
	}
	return &protocol.ProvisionResult{Devices: files}, nil
}

// newDevice derives a device's unit data and first chain state, and its device file.
func (u *Updater) newDevice(serial string, length uint32, auth keychain.BrokerAuthKey, now interface{ Unix() int64 }) (*Device, protocol.DeviceFile, error) {
	ud, err := keychain.DeriveUnitData(u.o.Root, serial, 0)
	if err != nil {
		return nil, protocol.DeviceFile{}, err
	}
	tr, err := keychain.NewTraversal(ud, length)
	if err != nil {
		return nil, protocol.DeviceFile{}, err
	}
	sealed, err := u.sealer.Seal(serial, 0, tr)
	if err != nil {
		return nil, protocol.DeviceFile{}, err
	}
	pw, err := auth.DevicePassword(serial)
	if err != nil {
		return nil, protocol.DeviceFile{}, err
	}
	d := &Device{Serial: serial, Seq: length, ChainLength: length, Chain: sealed, State: protocol.DeviceIdle, Provisioned: u.o.Now()}
	f := protocol.DeviceFile{
		Serial: serial, UnitData: ud[:], Seq: length, ChainLength: length,
		ReleasePublicKey: protocol.HexBytes(u.pkey),
		Broker:           protocol.BrokerConfig{URL: u.o.BrokerURL, Username: serial, Password: pw},
	}
	return d, f, nil
}

func first(s []string, n int) []string {
	if len(s) > n {
		return append(s[:n:n], fmt.Sprintf("and %d more", len(s)-n))
	}
	return s
}

func (u *Updater) deprovision(ctx context.Context, serial string) error {
	if _, err := u.device(ctx, serial); err != nil {
		return err
	}
	// Revoke first: a device that is gone from the store but can still connect could
	// read release topics; one that is revoked but still in the store is only refused.
	if u.o.Revoker != nil {
		if err := u.o.Revoker.Revoke(serial); err != nil {
			return unavailable(err)
		}
	}
	if _, err := u.o.Store.DeleteDevice(ctx, serial); err != nil {
		if u.o.Revoker != nil {
			if uerr := u.o.Revoker.Unrevoke(serial); uerr != nil {
				u.log.Error().Err(uerr).Str("serial", serial).Msg("undoing the revocation of a device still provisioned")
			}
		}
		return unavailable(err)
	}
	u.mu.Lock()
	u.fleetDir = true
	u.mu.Unlock()
	return u.o.Bus.Publish(ctx,
		protocol.Message{Topic: protocol.KeyTopic(serial), Retain: true},
		protocol.Message{Topic: protocol.ReceiptTopic(serial), Retain: true},
		protocol.Message{Topic: protocol.DeviceStatusTopic(serial), Retain: true})
}

func (u *Updater) createRelease(ctx context.Context, a protocol.ReleaseCreateArgs) (*protocol.ReleaseCreateResult, error) {
	if a.Version == 0 {
		return nil, protocol.Errorf(protocol.ErrBadRequest, "version must be a positive integer")
	}
	if a.All == (len(a.Devices) > 0) {
		return nil, protocol.Errorf(protocol.ErrBadRequest, "give either devices or all: true")
	}
	if a.ChunkSize == 0 {
		a.ChunkSize = keychain.DefaultChunkSize
	}
	if a.ChunkSize < keychain.MinChunkSize || a.ChunkSize > keychain.MaxChunkSize {
		return nil, protocol.Errorf(protocol.ErrBadRequest, "chunk_size %d must be from %d to %d", a.ChunkSize, keychain.MinChunkSize, keychain.MaxChunkSize)
	}
	if len(a.Label) > 64 {
		return nil, protocol.Errorf(protocol.ErrBadRequest, "label is over 64 characters")
	}
	up, err := u.uploads.get(a.Upload)
	if err != nil {
		return nil, err
	}
	rels, err := u.o.Store.Releases(ctx)
	if err != nil {
		return nil, unavailable(err)
	}
	for _, r := range rels {
		if r.Version >= a.Version && r.State != protocol.ReleaseCancelled {
			return nil, protocol.Errorf(protocol.ErrVersionNotNewer, "version %d is not newer than release %s (version %d); versions only go up", a.Version, r.ID, r.Version)
		}
	}
	var targets []string
	if a.All {
		if targets, err = u.o.Store.Serials(ctx); err != nil {
			return nil, unavailable(err)
		}
		if len(targets) == 0 {
			return nil, protocol.Errorf(protocol.ErrNotFound, "no device is provisioned")
		}
	} else {
		devs, err := u.o.Store.Devices(ctx, a.Devices)
		if err != nil {
			return nil, unavailable(err)
		}
		var unknown []string
		seen := map[string]bool{}
		for i, d := range devs {
			if d == nil {
				unknown = append(unknown, a.Devices[i])
			} else if !seen[d.Serial] {
				seen[d.Serial] = true
				targets = append(targets, d.Serial)
			}
		}
		if len(unknown) > 0 {
			return nil, protocol.Errorf(protocol.ErrNotFound, "unknown devices: %s", strings.Join(first(unknown, 10), ", "))
		}
	}
	id, err := keychain.NewReleaseID()
	if err != nil {
		return nil, err
	}
	ck, err := keychain.NewContentKey()
	if err != nil {
		return nil, err
	}
	sealed, err := u.sealContentKey(id, ck)
	if err != nil {
		return nil, err
	}
	rel := &Release{ID: id, Version: a.Version, Label: a.Label, State: protocol.ReleasePublishing, All: a.All, Created: u.o.Now(), ContentKey: sealed, ChunkSize: a.ChunkSize}
	// The release is recorded as publishing before anything is published, so that a
	// crash half way leaves a release that the restart cancels, not orphan topics.
	if err := u.o.Store.PutRelease(ctx, rel); err != nil {
		return nil, unavailable(err)
	}
	if err := u.o.Store.AddTargets(ctx, id, targets); err != nil {
		return nil, unavailable(err)
	}
	m, mb, err := u.publishImage(ctx, up.reader(), id, ck, a.Version, a.ChunkSize)
	if err != nil {
		if terr := transition(rel, protocol.ReleaseCancelled); terr == nil {
			u.o.Store.PutRelease(ctx, rel)
		}
		return nil, protocol.Errorf(protocol.ErrUnavailable, "%v; the release was cancelled, create it again", err)
	}
	rel.Manifest, rel.ImageSize, rel.ChunkCount = mb, m.ImageSize, m.ChunkCount
	if err := transition(rel, protocol.ReleaseActive); err != nil {
		return nil, protocol.Errorf(protocol.ErrInternal, "%v", err)
	}
	if err := u.o.Store.PutRelease(ctx, rel); err != nil {
		return nil, unavailable(err)
	}
	r, err := u.newRun(rel, targets)
	if err != nil {
		return nil, err
	}
	u.mu.Lock()
	u.runs[id] = r
	u.dirty[id] = true
	u.fleetDir = true
	u.mu.Unlock()
	u.log.Info().Str("release", id.String()).Uint64("version", a.Version).Int("targets", len(targets)).Uint32("chunks", m.ChunkCount).Msg("release created")
	// The image is published; its upload would otherwise hold a copy on disk for a day.
	u.uploads.remove(a.Upload)
	u.startFanout(r)
	return &protocol.ReleaseCreateResult{Release: id, Targets: len(targets)}, nil
}

func (u *Updater) releaseCommand(ctx context.Context, cmd string, id keychain.ReleaseID) (any, error) {
	rel, err := u.o.Store.Release(ctx, id)
	if errors.Is(err, ErrNotFound) {
		return nil, protocol.Errorf(protocol.ErrNotFound, "no release %s", id)
	} else if err != nil {
		return nil, unavailable(err)
	}
	u.mu.Lock()
	r := u.runs[id]
	u.mu.Unlock()
	conflict := func() error {
		return protocol.Errorf(protocol.ErrConflict, "release %s is %s; %s is not possible", id, rel.State, cmd)
	}
	if cmd == protocol.CmdReleaseGet {
		return u.releaseStatus(ctx, rel), nil
	}
	to := map[string]protocol.ReleaseState{
		protocol.CmdReleasePause:  protocol.ReleasePaused,
		protocol.CmdReleaseResume: protocol.ReleaseActive,
		protocol.CmdReleaseCancel: protocol.ReleaseCancelled,
	}[cmd]
	// A release still publishing belongs to the release.create publishing it; pause and
	// resume need it running in this updater.
	if rel.State == protocol.ReleasePublishing || cmd != protocol.CmdReleaseCancel && r == nil {
		return nil, conflict()
	}
	if err := transition(rel, to); err != nil {
		return nil, conflict()
	}
	if cmd == protocol.CmdReleasePause {
		r.paused.Store(true)
	}
	if r != nil && r.cancel != nil && cmd != protocol.CmdReleaseResume {
		r.cancel()
		<-r.done
	}
	if err := u.o.Store.PutRelease(ctx, rel); err != nil {
		return nil, unavailable(err)
	}
	switch cmd {
	case protocol.CmdReleaseResume:
		r.rel.Store(rel)
		r.paused.Store(false)
		u.startFanout(r)
	case protocol.CmdReleaseCancel:
		u.mu.Lock()
		delete(u.runs, id)
		u.mu.Unlock()
		if err := u.withdraw(ctx, rel); err != nil {
			return nil, err
		}
	default:
		r.rel.Store(rel)
	}
	u.mu.Lock()
	u.dirty[id] = true
	u.fleetDir = true
	u.mu.Unlock()
	return u.releaseStatus(ctx, rel), nil
}

// withdraw clears the key topics of a cancelled release's targets that still hold its key,
// and offers them whatever else is pending ([SC-12.2]).
func (u *Updater) withdraw(ctx context.Context, rel *Release) error {
	targets, err := u.o.Store.Targets(ctx, rel.ID)
	if err != nil {
		return unavailable(err)
	}
	for i := 0; i < len(targets); i += batchSize {
		devs, err := u.o.Store.Devices(ctx, targets[i:min(i+batchSize, len(targets))])
		if err != nil {
			return unavailable(err)
		}
		var held []*Device
		for _, d := range devs {
			if d != nil && assigned(d, rel.ID) {
				held = append(held, d)
			}
		}
		if err := u.nextForAll(ctx, held); err != nil {
			return fmt.Errorf("withdrawing the keys of release %s: %w", rel.ID, err)
		}
	}
	return nil
}
