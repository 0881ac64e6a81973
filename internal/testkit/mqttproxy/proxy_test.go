package mqttproxy

import (
	"bufio"
	"bytes"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/sealcast/sealcast/internal/testkit/brokertest"
)

func dial(t *testing.T, url, id string, c brokertest.Credentials) paho.Client {
	t.Helper()
	o := paho.NewClientOptions().AddBroker(url).SetClientID(id).SetUsername(c.Username).
		SetPassword(c.Password).SetProtocolVersion(4).SetAutoReconnect(false).
		SetConnectTimeout(5 * time.Second)
	cl := paho.NewClient(o)
	if tok := cl.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connecting %s to %s: %v", id, url, tok.Error())
	}
	t.Cleanup(func() { cl.Disconnect(0) })
	return cl
}

func wait(t *testing.T, tok paho.Token) {
	t.Helper()
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("mqtt: %v", tok.Error())
	}
}

// receiver collects the payloads of one subscription.
type receiver struct {
	mu   sync.Mutex
	msgs map[string][]byte
	got  chan struct{}
}

func newReceiver() *receiver {
	return &receiver{msgs: map[string][]byte{}, got: make(chan struct{}, 64)}
}

func (r *receiver) handle(_ paho.Client, m paho.Message) {
	r.mu.Lock()
	r.msgs[m.Topic()] = append([]byte(nil), m.Payload()...)
	r.mu.Unlock()
	r.got <- struct{}{}
}

func (r *receiver) waitN(t *testing.T, n int) map[string][]byte {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		r.mu.Lock()
		if len(r.msgs) >= n {
			out := r.msgs
			r.mu.Unlock()
			return out
		}
		r.mu.Unlock()
		select {
		case <-r.got:
		case <-deadline:
			t.Fatalf("received %d messages, want %d", len(r.msgs), n)
		}
	}
}

// TestTamperOnTheWire sends retained messages of several sizes (1-, 2- and 3-byte
// remaining lengths) at QoS 0 and 1 to a client behind the proxy, which flips one byte of
// each payload on a chosen topic; a client connected directly sees the originals.
func TestTamperOnTheWire(t *testing.T) {
	env := brokertest.Start(t)
	var mu sync.Mutex
	seen := map[string]string{} // topic -> client id the proxy saw
	p, err := Start(Options{Listen: "127.0.0.1:0", Target: env.Addr, Tamper: func(id, topic string, payload []byte) bool {
		mu.Lock()
		seen[topic] = id
		mu.Unlock()
		if !strings.Contains(topic, "/chunks/") || len(payload) == 0 {
			return false
		}
		payload[len(payload)/2] ^= 0x01
		return true
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()

	pub := dial(t, env.URL, "pub", env.Updater)
	sent := map[string][]byte{}
	// An empty retained payload would clear the topic, so the smallest is one byte.
	for i, size := range []int{1, 100, 200, 20_000, 300_000} {
		for _, qos := range []byte{0, 1} {
			leaf := "manifest" // not tampered
			if i > 0 {
				leaf = "chunks/" + string(rune('a'+i))
			}
			topic := "sealcast/releases/q" + string(rune('0'+qos)) + "/" + leaf
			b := bytes.Repeat([]byte{byte(i + 1)}, size)
			sent[topic] = b
			wait(t, pub.Publish(topic, qos, true, b))
		}
	}

	for _, qos := range []byte{0, 1} {
		viaProxy, direct := newReceiver(), newReceiver()
		id := "behind-proxy-" + string(rune('0'+qos))
		c := dial(t, "tcp://"+p.Addr(), id, env.Admin)
		wait(t, c.Subscribe("sealcast/releases/q"+string(rune('0'+qos))+"/#", qos, viaProxy.handle))
		d := dial(t, env.URL, "direct-"+string(rune('0'+qos)), env.Admin)
		wait(t, d.Subscribe("sealcast/releases/q"+string(rune('0'+qos))+"/#", qos, direct.handle))
		want := 5
		got, orig := viaProxy.waitN(t, want), direct.waitN(t, want)
		for topic, b := range got {
			if !bytes.Equal(orig[topic], sent[topic]) {
				t.Fatalf("%s: the direct client got %d bytes, not what was sent", topic, len(orig[topic]))
			}
			if len(b) != len(sent[topic]) {
				t.Fatalf("%s: %d bytes through the proxy, %d sent", topic, len(b), len(sent[topic]))
			}
			diff := 0
			for i := range b {
				if b[i] != sent[topic][i] {
					diff++
				}
			}
			wantDiff := 0
			if strings.Contains(topic, "/chunks/") {
				wantDiff = 1
			}
			if diff != wantDiff {
				t.Fatalf("%s: %d bytes differ through the proxy, want %d", topic, diff, wantDiff)
			}
			mu.Lock()
			if seen[topic] != id {
				t.Fatalf("%s: proxy saw client %q, want %q", topic, seen[topic], id)
			}
			mu.Unlock()
		}
	}
	st := p.Stats()
	if st.Connections != 2 || st.Tampered != 8 || st.Publishes != 10 || st.Refused != 0 {
		t.Fatalf("stats %+v, want 2 connections, 10 publishes, 8 tampered", st)
	}
}

// TestBrokerDown: a client of a proxy whose broker is gone sees its connection closed.
func TestBrokerDown(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	p, err := Start(Options{Listen: "127.0.0.1:0", Target: addr})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	o := paho.NewClientOptions().AddBroker("tcp://" + p.Addr()).SetClientID("x").SetProtocolVersion(4).
		SetConnectTimeout(5 * time.Second).SetAutoReconnect(false)
	cl := paho.NewClient(o)
	tok := cl.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		t.Fatal("connect did not finish")
	}
	if tok.Error() == nil {
		t.Fatal("connected through a proxy whose broker is down")
	}
	if st := p.Stats(); st.Refused != 1 || st.Connections != 0 {
		t.Fatalf("stats %+v, want 1 refused", st)
	}
}

// TestCloseEndsConnections: Close returns with a client connected, and the client sees
// the loss.
func TestCloseEndsConnections(t *testing.T) {
	env := brokertest.Start(t)
	p, err := Start(Options{Listen: "127.0.0.1:0", Target: env.Addr})
	if err != nil {
		t.Fatal(err)
	}
	lost := make(chan struct{})
	o := paho.NewClientOptions().AddBroker("tcp://" + p.Addr()).SetClientID("c").
		SetUsername(env.Admin.Username).SetPassword(env.Admin.Password).SetAutoReconnect(false).
		SetConnectionLostHandler(func(paho.Client, error) { close(lost) })
	cl := paho.NewClient(o)
	wait(t, cl.Connect())
	done := make(chan error)
	go func() { done <- p.Close() }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return")
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("the client did not see its connection end")
	}
}

// encode builds a packet with mochi's encoder, an implementation independent of ours.
func encode(t testing.TB, pk packets.Packet) []byte {
	t.Helper()
	var buf bytes.Buffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&buf)
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	}
	if err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestParseAgainstMochi parses CONNECT and PUBLISH packets of MQTT 3.1.1 and 5 (with
// properties) that mochi's encoder wrote.
func TestParseAgainstMochi(t *testing.T) {
	for _, v := range []byte{3, 4, 5} {
		name := []byte("MQTT")
		if v == 3 {
			name = []byte("MQIsdp")
		}
		c := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: v,
			Connect: packets.ConnectParams{ProtocolName: name, ClientIdentifier: "dev-1", Keepalive: 30, Clean: true,
				UsernameFlag: true, Username: []byte("dev-1"), PasswordFlag: true, Password: []byte("pw")}}
		if v == 5 {
			c.Properties.SessionExpiryInterval, c.Properties.SessionExpiryIntervalFlag = 60, true
			c.Properties.User = []packets.UserProperty{{Key: "k", Val: "v"}}
		}
		raw := encode(t, c)
		pk, err := readPacket(bufio.NewReader(bytes.NewReader(raw)), DefaultMaxPacket)
		if err != nil {
			t.Fatal(err)
		}
		info, err := parseConnect(pk)
		if err != nil || info.version != v || info.clientID != "dev-1" {
			t.Fatalf("v%d: %+v, %v", v, info, err)
		}
		for _, qos := range []byte{0, 1, 2} {
			for _, size := range []int{0, 5, 127, 128, 16383, 16384, 2_097_151 - 100} {
				payload := bytes.Repeat([]byte{0xab}, size)
				p := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos, Retain: true},
					ProtocolVersion: v, TopicName: "sealcast/releases/x/chunks/7", Payload: payload}
				if qos > 0 {
					p.PacketID = 513
				}
				if v == 5 {
					p.Properties.ContentType = "application/octet-stream"
					p.Properties.User = []packets.UserProperty{{Key: "a", Val: strings.Repeat("b", 200)}}
				}
				raw := encode(t, p)
				pk, err := readPacket(bufio.NewReader(bytes.NewReader(raw)), 4<<20)
				if err != nil {
					t.Fatalf("v%d qos %d size %d: %v", v, qos, size, err)
				}
				topic, pl, err := splitPublish(pk, v == 5)
				if err != nil || topic != p.TopicName || !bytes.Equal(pl, payload) {
					t.Fatalf("v%d qos %d size %d: topic %q, %d payload bytes, %v", v, qos, size, topic, len(pl), err)
				}
				if size > 0 && &pl[len(pl)-1] != &pk[len(pk)-1] {
					t.Fatal("the payload does not alias the packet")
				}
			}
		}
	}
}

func TestReadPacketLimits(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []byte
	}{
		{"five length bytes", []byte{0x30, 0xff, 0xff, 0xff, 0xff, 0x01}},
		{"over the limit", []byte{0x30, 0x80, 0x80, 0x01}}, // 16384 bytes
		{"truncated", []byte{0x30, 0x05, 0x00, 0x01}},
		{"empty", nil},
	} {
		if _, err := readPacket(bufio.NewReader(bytes.NewReader(tc.in)), 1000); err == nil {
			t.Errorf("%s: no error", tc.name)
		}
	}
	if _, err := parseConnect([]byte{0x30, 0x00}); err == nil {
		t.Error("a PUBLISH passed as CONNECT")
	}
}

// FuzzParse: no input makes the parsers panic or return a payload outside the packet.
func FuzzParse(f *testing.F) {
	f.Add([]byte{0x10, 0x0c, 0x00, 0x04, 'M', 'Q', 'T', 'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x00})
	f.Add([]byte{0x32, 0x08, 0x00, 0x03, 'a', '/', 'b', 0x00, 0x01, 0xff})
	f.Add([]byte{0x30, 0x06, 0x00, 0x01, 'a', 0x02, 0x01, 0x00})
	f.Fuzz(func(t *testing.T, in []byte) {
		pk, err := readPacket(bufio.NewReader(bytes.NewReader(in)), 1<<16)
		if err != nil {
			return
		}
		if !bytes.HasPrefix(in, pk) {
			t.Fatal("readPacket returned bytes it did not read")
		}
		parseConnect(pk)
		for _, v5 := range []bool{false, true} {
			_, pl, err := splitPublish(pk, v5)
			if err == nil && len(pl) > 0 && &pl[len(pl)-1] != &pk[len(pk)-1] {
				t.Fatal("payload is not the tail of the packet")
			}
		}
	})
}
