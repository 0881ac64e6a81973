package broker_test

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/sealcast/sealcast/internal/testkit/brokertest"
)

// A minimal MQTT 3.1.1 codec for tests that need exact bytes: CONNACK codes, chosen
// packet ids, oversize headers, and thousands of cheap connections.

func appendLen(b []byte, n int) []byte {
	for {
		d := byte(n % 128)
		n /= 128
		if n > 0 {
			d |= 0x80
		}
		b = append(b, d)
		if n == 0 {
			return b
		}
	}
}

func appendStr(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

func packet(typ byte, body []byte) []byte {
	return append(appendLen([]byte{typ}, len(body)), body...)
}

func connectPacket(clientID, user, pass string, clean bool) []byte {
	return connectPacketKeepalive(clientID, user, pass, clean, 60)
}

func connectPacketKeepalive(clientID, user, pass string, clean bool, keepalive uint16) []byte {
	flags := byte(0)
	if clean {
		flags |= 0x02
	}
	if user != "" {
		flags |= 0x80
	}
	if pass != "" {
		flags |= 0x40
	}
	b := appendStr(nil, "MQTT")
	b = append(b, 4, flags) // level 4, flags
	b = binary.BigEndian.AppendUint16(b, keepalive)
	b = appendStr(b, clientID)
	if user != "" {
		b = appendStr(b, user)
	}
	if pass != "" {
		b = appendStr(b, pass)
	}
	return packet(0x10, b)
}

func subscribePacket(id uint16, filter string, qos byte) []byte {
	b := binary.BigEndian.AppendUint16(nil, id)
	b = appendStr(b, filter)
	return packet(0x82, append(b, qos))
}

func publishPacket(topic string, payload []byte, qos byte, id uint16, retain bool) []byte {
	typ := byte(0x30) | qos<<1
	if retain {
		typ |= 1
	}
	b := appendStr(nil, topic)
	if qos > 0 {
		b = binary.BigEndian.AppendUint16(b, id)
	}
	return packet(typ, append(b, payload...))
}

func pubackPacket(id uint16) []byte {
	return packet(0x40, binary.BigEndian.AppendUint16(nil, id))
}

type rawPacket struct {
	typ  byte // high nibble of the fixed header
	bits byte // low nibble
	body []byte
}

// publish fields of a PUBLISH packet at QoS > 0.
func (p rawPacket) publish() (topic string, id uint16, payload []byte) {
	n := int(binary.BigEndian.Uint16(p.body))
	topic = string(p.body[2 : 2+n])
	rest := p.body[2+n:]
	if p.bits&0x06 != 0 {
		id = binary.BigEndian.Uint16(rest)
		rest = rest[2:]
	}
	return topic, id, rest
}

type rawConn struct {
	t testing.TB
	net.Conn
	r *bufio.Reader
}

func dialRaw(t testing.TB, addr string) *rawConn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawConn{t: t, Conn: c, r: bufio.NewReader(c)}
}

func (c *rawConn) send(b []byte) {
	c.t.Helper()
	if _, err := c.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *rawConn) read(timeout time.Duration) (rawPacket, error) {
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	h, err := c.r.ReadByte()
	if err != nil {
		return rawPacket{}, err
	}
	n, mul := 0, 1
	for {
		d, err := c.r.ReadByte()
		if err != nil {
			return rawPacket{}, err
		}
		n += int(d&0x7f) * mul
		mul *= 128
		if d&0x80 == 0 {
			break
		}
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(c.r, body); err != nil {
		return rawPacket{}, err
	}
	return rawPacket{typ: h >> 4, bits: h & 0x0f, body: body}, nil
}

// expect reads packets until one of type typ arrives.
func (c *rawConn) expect(typ byte) rawPacket {
	c.t.Helper()
	for {
		p, err := c.read(5 * time.Second)
		if err != nil {
			c.t.Fatalf("waiting for packet type %d: %v", typ, err)
		}
		if p.typ == typ {
			return p
		}
	}
}

// connectRaw sends CONNECT and returns the CONNACK return code.
func connectRaw(t testing.TB, addr, clientID, user, pass string, clean bool) (*rawConn, byte) {
	t.Helper()
	c := dialRaw(t, addr)
	c.send(connectPacket(clientID, user, pass, clean))
	p := c.expect(2)
	if len(p.body) != 2 {
		t.Fatalf("CONNACK body %x", p.body)
	}
	return c, p.body[1]
}

// pahoClient connects a paho client (MQTT 3.1.1) and fails the test if it cannot.
func pahoClient(t testing.TB, env *brokertest.Env, clientID string, cr brokertest.Credentials, clean bool) paho.Client {
	t.Helper()
	c, err := pahoConnect(env, clientID, cr, clean, nil)
	if err != nil {
		t.Fatalf("connecting %s as %q: %v", clientID, cr.Username, err)
	}
	t.Cleanup(func() { c.Disconnect(100) })
	return c
}

func pahoConnect(env *brokertest.Env, clientID string, cr brokertest.Credentials, clean bool, tweak func(*paho.ClientOptions)) (paho.Client, error) {
	o := paho.NewClientOptions().AddBroker(env.URL).SetClientID(clientID).
		SetUsername(cr.Username).SetPassword(cr.Password).SetCleanSession(clean).
		SetProtocolVersion(4).SetAutoReconnect(false).SetConnectRetry(false).
		SetConnectTimeout(5 * time.Second)
	if tweak != nil {
		tweak(o)
	}
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return nil, fmt.Errorf("connect timed out")
	}
	return c, tok.Error()
}

// collector records messages from a paho subscription.
type collector struct {
	ch chan paho.Message
}

func newCollector() *collector { return &collector{ch: make(chan paho.Message, 1024)} }

func (c *collector) handle(_ paho.Client, m paho.Message) { c.ch <- m }

func (c *collector) next(t testing.TB, d time.Duration) (paho.Message, bool) {
	t.Helper()
	select {
	case m := <-c.ch:
		return m, true
	case <-time.After(d):
		return nil, false
	}
}

// subscribe subscribes and returns the SUBACK return code.
func subscribe(t testing.TB, c paho.Client, filter string, col *collector) byte {
	t.Helper()
	var h paho.MessageHandler
	if col != nil {
		h = col.handle
	}
	tok := c.Subscribe(filter, 1, h)
	if !tok.WaitTimeout(5 * time.Second) {
		t.Fatalf("subscribe %q timed out", filter)
	}
	if err := tok.Error(); err != nil {
		// paho reports a 0x80 SUBACK as an error too.
		return 0x80
	}
	for _, code := range tok.(*paho.SubscribeToken).Result() {
		return code // one filter; paho keys shared subscriptions without $share/{group}/
	}
	return 0x80
}

func publish(t testing.TB, c paho.Client, topic string, qos byte, retain bool, payload string) {
	t.Helper()
	tok := c.Publish(topic, qos, retain, payload)
	if !tok.WaitTimeout(5 * time.Second) {
		t.Fatalf("publish to %q timed out", topic)
	}
	if err := tok.Error(); err != nil {
		t.Fatalf("publish to %q: %v", topic, err)
	}
}

// eventually polls cond every 10 ms until it holds, failing the test after 10 s.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
