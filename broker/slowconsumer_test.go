package broker_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/gorilla/websocket"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/internal/testkit/brokertest"
)

// smallRcvBuf dials with a 4 KiB receive buffer.
var smallRcvBuf = net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
	})
	return errors.Join(err, serr)
}}

// stalledClient connects with a 4 KiB receive buffer and keepalive 0, subscribes to
// filter, and from then on never reads: the attack of a client that stops reading. With
// ws it speaks MQTT over WebSocket. It returns what ends when the connection does.
func stalledClient(t *testing.T, env *brokertest.Env, ws bool, clientID string, cr brokertest.Credentials, clean bool, filter string) net.Conn {
	t.Helper()
	if ws {
		d := websocket.Dialer{NetDialContext: smallRcvBuf.DialContext, Subprotocols: []string{"mqtt"}}
		c, _, err := d.Dial("ws://"+env.Broker.Addr(broker.ListenerWS).String()+"/mqtt", nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		exchange := func(out []byte, typ byte) {
			if err := c.WriteMessage(websocket.BinaryMessage, out); err != nil {
				t.Fatal(err)
			}
			_, in, err := c.ReadMessage()
			if err != nil || len(in) == 0 || in[0]>>4 != typ {
				t.Fatalf("%s: got %x, %v; want packet type %d", clientID, in, err, typ)
			}
		}
		exchange(connectPacketKeepalive(clientID, cr.Username, cr.Password, clean, 0), 2)
		exchange(subscribePacket(1, filter, 1), 9)
		return c.UnderlyingConn()
	}
	nc, err := smallRcvBuf.Dial("tcp", env.Addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	c := &rawConn{t: t, Conn: nc, r: bufio.NewReader(nc)}
	c.send(connectPacketKeepalive(clientID, cr.Username, cr.Password, clean, 0))
	if p := c.expect(2); len(p.body) != 2 || p.body[1] != 0 {
		t.Fatalf("%s: CONNACK %x", clientID, p.body)
	}
	c.send(subscribePacket(1, filter, 1))
	if p := c.expect(9); len(p.body) != 3 || p.body[2] > 1 {
		t.Fatalf("%s: SUBACK %x", clientID, p.body)
	}
	return nc
}

// TestSlowConsumerCannotFreeze: a device subscribed to sealcast/releases/#, a monitor on
// the status topics and an admin on # each stop reading; a release's worth of messages
// to other clients still goes through at once, and the stalled client is disconnected
// within a bounded time (Limits.WriteDeadline), counted and logged. A device's persistent
// session is kept.
func TestSlowConsumerCannotFreeze(t *testing.T) {
	const parts, size = 128, 64 << 10 // 8 MiB: more than the socket buffers of the stalled client
	for _, tc := range []struct {
		name     string
		ws       bool
		stall    func(env *brokertest.Env) (id string, cr brokertest.Credentials, clean bool, filter string)
		topic    string
		receiver func(env *brokertest.Env) (id string, cr brokertest.Credentials, filter string)
	}{
		{
			name: "device on releases/#",
			stall: func(env *brokertest.Env) (string, brokertest.Credentials, bool, string) {
				return "stall-dev", env.Device(t, "stall-dev"), false, "sealcast/releases/#"
			},
			topic: "sealcast/releases/00112233445566778899aabbccddeeff/chunks/%d",
			receiver: func(env *brokertest.Env) (string, brokertest.Credentials, string) {
				return "good-dev", env.Device(t, "good-dev"), "sealcast/releases/#"
			},
		},
		{
			name: "monitor on status",
			stall: func(env *brokertest.Env) (string, brokertest.Credentials, bool, string) {
				return "stall-mon", env.Monitor, true, "sealcast/status/#"
			},
			topic: "sealcast/status/releases/r%d",
			receiver: func(env *brokertest.Env) (string, brokertest.Credentials, string) {
				return "good-mon", env.Monitor, "sealcast/status/#"
			},
		},
		{
			name: "monitor over WebSocket",
			ws:   true,
			stall: func(env *brokertest.Env) (string, brokertest.Credentials, bool, string) {
				return "stall-ws", env.Monitor, true, "sealcast/status/#"
			},
			topic: "sealcast/status/releases/r%d",
			receiver: func(env *brokertest.Env) (string, brokertest.Credentials, string) {
				return "good-mon", env.Monitor, "sealcast/status/#"
			},
		},
		{
			name: "admin on #",
			stall: func(env *brokertest.Env) (string, brokertest.Credentials, bool, string) {
				return "stall-admin", env.Admin, true, "#"
			},
			topic: "sealcast/releases/00112233445566778899aabbccddeeff/chunks/%d",
			receiver: func(env *brokertest.Env) (string, brokertest.Credentials, string) {
				return "good-dev", env.Device(t, "good-dev"), "sealcast/releases/#"
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := brokertest.Start(t, brokertest.WithOptions(func(o *broker.Options) {
				o.Limits.WriteDeadline = 4 * time.Second
				o.WSAddr = "127.0.0.1:0"
			}))
			id, cr, clean, filter := tc.stall(env)
			stalled := stalledClient(t, env, tc.ws, id, cr, clean, filter)

			rid, rcr, rfilter := tc.receiver(env)
			recv := pahoClient(t, env, rid, rcr, true)
			var mu sync.Mutex
			got := map[string]bool{}
			all := make(chan struct{})
			tok := recv.Subscribe(rfilter, 1, func(_ paho.Client, m paho.Message) {
				mu.Lock()
				defer mu.Unlock()
				got[m.Topic()] = true
				if len(got) == parts {
					close(all)
				}
			})
			if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
				t.Fatalf("subscribe: %v", tok.Error())
			}

			pub := pahoClient(t, env, "pub", env.Updater, true)
			payload := make([]byte, size)
			start := time.Now()
			for i := range parts {
				tok := pub.Publish(fmt.Sprintf(tc.topic, i), 1, false, payload)
				if !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
					t.Fatalf("publish %d of %d not acknowledged after %v (%v): the stalled client froze the publisher",
						i, parts, time.Since(start).Round(time.Millisecond), tok.Error())
				}
			}
			select {
			case <-all:
			case <-time.After(30 * time.Second):
				mu.Lock()
				t.Fatalf("the receiving client got %d of %d messages", len(got), parts)
			}
			// All of it went through while the stalled client was still connected: it was
			// never waited for.
			if n := env.Broker.Stats().SlowConsumers; n != 0 {
				t.Fatalf("the release went through only after the stalled client was cut off (%v)", time.Since(start))
			}
			t.Logf("%d x %d KiB published and received in %v", parts, size>>10, time.Since(start).Round(time.Millisecond))

			eventually(t, "the stalled client is disconnected", func() bool {
				return env.Broker.Stats().SlowConsumers == 1
			})
			_ = stalled.SetReadDeadline(time.Now().Add(30 * time.Second))
			if _, err := io.Copy(io.Discard, stalled); err != nil {
				t.Fatalf("the stalled client's connection did not end: %v", err)
			}
			if !clean && broker.ClientOf(env.Broker, id) == nil {
				t.Fatal("the stalled device's persistent session was dropped")
			}
		})
	}
}

// TestSlowConsumerLimitsChecked: negative limits are refused with ErrBadOptions.
func TestSlowConsumerLimitsChecked(t *testing.T) {
	env := brokertest.Start(t)
	for _, l := range []broker.Limits{{WriteDeadline: -time.Second}, {MaxPending: -1}} {
		o := env.Options
		o.TCPAddr, o.Limits = "127.0.0.1:0", l
		if b, err := broker.New(o); !errors.Is(err, broker.ErrBadOptions) {
			if b != nil {
				b.Close()
			}
			t.Errorf("limits %+v: %v, want ErrBadOptions", l, err)
		}
	}
}

// TestCloseEndsUnlistedConnections: Close ends a connection that mochi no longer lists
// (seen once at shutdown after a reconnect storm); before, mochi's Close waited for its
// reader for ever.
func TestCloseEndsUnlistedConnections(t *testing.T) {
	env := brokertest.Start(t)
	c, code := connectRaw(t, env.Addr, "dev-u", "dev-u", env.Device(t, "dev-u").Password, false)
	if code != 0 {
		t.Fatalf("CONNACK %#x", code)
	}
	broker.ForgetClient(env.Broker, "dev-u")
	done := make(chan struct{})
	go func() {
		env.Broker.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("Close waits for a connection mochi no longer lists")
	}
	if _, err := c.read(5 * time.Second); err == nil {
		t.Fatal("the connection is still open")
	}
}
