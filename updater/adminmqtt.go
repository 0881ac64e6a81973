package updater

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"

	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// mqttAdmin is the admin service's MQTT transport (PROTOCOL.md 12.1): it takes requests
// from the admin topic, one at a time, and publishes each reply on the request's reply
// topic.
type mqttAdmin struct {
	svc      *Admin
	bus      Bus
	log      zerolog.Logger
	queue    chan []byte
	commands map[string]command
}

// command decodes a request's arguments and calls the service.
type command func(ctx context.Context, req protocol.Request) (any, error)

func newMQTTAdmin(svc *Admin, bus Bus, log zerolog.Logger) *mqttAdmin {
	m := &mqttAdmin{svc: svc, bus: bus, log: log, queue: make(chan []byte, 256)}
	m.commands = map[string]command{
		protocol.CmdProvision: withArgs(svc.Provision),
		protocol.CmdDeprovision: withArgs(func(ctx context.Context, a protocol.SerialArgs) (struct{}, error) {
			return struct{}{}, svc.Deprovision(ctx, a.Serial)
		}),
		protocol.CmdDeviceGet: withArgs(func(ctx context.Context, a protocol.SerialArgs) (protocol.DeviceStatus, error) {
			return svc.Device(ctx, a.Serial)
		}),
		protocol.CmdDeviceTag:   withArgs(svc.Tag),
		protocol.CmdDeviceList:  withArgs(svc.Devices),
		protocol.CmdUploadBegin: withArgs(svc.BeginUpload),
		protocol.CmdUploadFinish: withArgs(func(ctx context.Context, a protocol.UploadArgs) (protocol.UploadFinishResult, error) {
			return svc.FinishUpload(ctx, a.Upload)
		}),
		protocol.CmdReleaseCreate:  withArgs(svc.CreateRelease),
		protocol.CmdReleasePause:   withRelease(svc.PauseRelease),
		protocol.CmdReleaseResume:  withRelease(svc.ResumeRelease),
		protocol.CmdReleaseCancel:  withRelease(svc.CancelRelease),
		protocol.CmdReleaseRetire:  withRelease(svc.RetireRelease),
		protocol.CmdReleaseApprove: withRelease(svc.ApproveRelease),
		protocol.CmdReleaseGet:     withRelease(svc.Release),
		protocol.CmdReleasePending: withArgs(svc.Pending),
		protocol.CmdReleaseList: func(ctx context.Context, _ protocol.Request) (any, error) {
			return svc.Releases(ctx)
		},
		protocol.CmdFleetGet: withArgs(func(ctx context.Context, _ struct{}) (protocol.FleetStatus, error) {
			return svc.Fleet(ctx)
		}),
		protocol.CmdKeysRotate: withArgs(func(ctx context.Context, _ struct{}) (protocol.KeyRotateResult, error) {
			return svc.RotateKey(ctx)
		}),
	}
	return m
}

func withArgs[A, R any](f func(context.Context, A) (R, error)) command {
	return func(ctx context.Context, req protocol.Request) (any, error) {
		var a A
		if err := args(req, &a); err != nil {
			return nil, err
		}
		return f(ctx, a)
	}
}

func withRelease[R any](f func(context.Context, keychain.ReleaseID) (R, error)) command {
	return withArgs(func(ctx context.Context, a protocol.ReleaseArgs) (R, error) { return f(ctx, a.Release) })
}

// args decodes a command's arguments strictly: unknown fields are errors, so that a typo
// never silently means "all devices".
func args(req protocol.Request, v any) error {
	if len(req.Args) == 0 {
		req.Args = []byte("{}")
	}
	dec := json.NewDecoder(bytes.NewReader(req.Args))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return protocol.Errorf(protocol.ErrBadRequest, "%s: bad arguments: %v", req.Cmd, err)
	}
	return nil
}

// onRequest queues a request; like an ack it waits while the queue is full.
func (m *mqttAdmin) onRequest(ctx context.Context, payload []byte) {
	select {
	case m.queue <- append([]byte(nil), payload...):
	case <-ctx.Done():
	}
}

// loop handles the queued requests until ctx is done.
func (m *mqttAdmin) loop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case b := <-m.queue:
			m.handle(ctx, b)
		}
	}
}

func (m *mqttAdmin) handle(ctx context.Context, b []byte) {
	var req protocol.Request
	if err := json.Unmarshal(b, &req); err != nil || !protocol.ValidID(req.ID) {
		// [SC-12.1] without a readable id there is no topic to reply on.
		m.log.Warn().Err(err).Int("bytes", len(b)).Msg("admin request without a valid id; no reply possible")
		return
	}
	var (
		result any
		err    error = protocol.Errorf(protocol.ErrUnknownCommand, "unknown command %q; see docs/PROTOCOL.md section 12.1", req.Cmd)
	)
	if c := m.commands[req.Cmd]; c != nil {
		result, err = c(ctx, req)
	}
	reply := protocol.Reply{ID: req.ID, OK: err == nil}
	if err != nil {
		var pe *protocol.Error
		if !errors.As(err, &pe) {
			m.log.Error().Err(err).Str("cmd", req.Cmd).Msg("admin command failed")
			pe = protocol.Errorf(protocol.ErrInternal, "%v", err)
		}
		reply.Error = pe
		m.log.Info().Str("id", req.ID).Str("cmd", req.Cmd).Str("code", string(pe.Code)).Msg(pe.Message)
	} else {
		reply.Result, _ = json.Marshal(result)
		m.log.Info().Str("id", req.ID).Str("cmd", req.Cmd).Msg("admin command done")
	}
	out, _ := json.Marshal(reply)
	if err := m.bus.Publish(ctx, protocol.Message{Topic: protocol.ReplyTopic(req.ID), Payload: out}); err != nil {
		m.log.Error().Err(err).Msg("publishing admin reply")
	}
}
