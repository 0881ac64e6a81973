package broker

import (
	"context"
	"log/slog"

	"github.com/mochi-mqtt/server/v2/packets"
)

// redactHandler keeps message payloads out of mochi's logs. mochi logs whole packets
// (when a write fails, when a hook refuses a publish, when a packet cannot be processed),
// and their payloads are firmware, admin replies, provisioning replies with unit data and
// passwords, and CONNECT passwords. Every packet attribute is replaced by its type, topic,
// packet id and payload length, and every []byte by its length, at every level.
type redactHandler struct{ next slog.Handler }

func (h redactHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h.next.Enabled(ctx, l)
}

func (h redactHandler) Handle(ctx context.Context, r slog.Record) error {
	out := slog.NewRecord(r.Time, r.Level, r.Message, r.PC)
	r.Attrs(func(a slog.Attr) bool {
		out.AddAttrs(redact(a))
		return true
	})
	return h.next.Handle(ctx, out)
}

func (h redactHandler) WithAttrs(as []slog.Attr) slog.Handler {
	red := make([]slog.Attr, len(as))
	for i, a := range as {
		red[i] = redact(a)
	}
	return redactHandler{h.next.WithAttrs(red)}
}

func (h redactHandler) WithGroup(name string) slog.Handler {
	return redactHandler{h.next.WithGroup(name)}
}

func redact(a slog.Attr) slog.Attr {
	v := a.Value.Resolve()
	switch v.Kind() {
	case slog.KindGroup:
		g := v.Group()
		red := make([]any, len(g))
		for i, x := range g {
			red[i] = redact(x)
		}
		return slog.Group(a.Key, red...)
	case slog.KindAny:
		switch x := v.Any().(type) {
		case packets.Packet:
			return slog.Attr{Key: a.Key, Value: packetSummary(&x)}
		case *packets.Packet:
			if x != nil {
				return slog.Attr{Key: a.Key, Value: packetSummary(x)}
			}
		case []byte:
			return slog.Int(a.Key+"_bytes", len(x))
		}
	}
	return slog.Attr{Key: a.Key, Value: v}
}

func packetSummary(pk *packets.Packet) slog.Value {
	return slog.GroupValue(
		slog.String("type", packets.PacketNames[pk.FixedHeader.Type]),
		slog.String("topic", pk.TopicName),
		slog.Int("id", int(pk.PacketID)),
		slog.Int("payload_bytes", len(pk.Payload)),
	)
}
