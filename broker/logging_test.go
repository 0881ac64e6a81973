package broker

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/rs/zerolog"
)

// TestLogsCarryNoPayload: packets and byte slices that mochi logs, at any level, reach
// the log as their type, topic, id and length, never their bytes.
func TestLogsCarryNoPayload(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(redactHandler{zerolog.NewSlogHandler(zerolog.New(&buf).Level(zerolog.DebugLevel))})
	pub := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "sealcast/admin/replies/r1",
		PacketID: 9, Payload: []byte("SECRET-unit-data")}
	conn := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}}
	conn.Connect.Password = []byte("SECRET-password")
	log.Debug("failed publishing packet", "packet", pub)
	log.Debug("failed publishing packet", "packet", &pub)
	log.Warn("error processing packet", "pk", conn)
	log.With("raw", []byte("SECRET-bytes")).Error("with attrs", slog.Group("g", "packet", pub))
	out := buf.String()
	if strings.Contains(out, "SECRET") {
		t.Fatalf("a payload reached the log:\n%s", out)
	}
	for _, want := range []string{`"packet.topic":"sealcast/admin/replies/r1"`, `"packet.payload_bytes":16`, `"pk.type":"Connect"`, `"raw_bytes":12`, `"g.packet.id":9`} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %s:\n%s", want, out)
		}
	}
}
