package broker

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"time"
)

// healthUser is the username of the broker's own health probe. It is no valid serial or
// account name ('$'), so no device or account can have it; its password is random, held
// in memory, and it may publish and subscribe to nothing.
const healthUser = "$health"

// Check connects to the broker's own MQTT listener (plain TCP, else TLS) as an outside
// client would, sends CONNECT and PINGREQ, and waits for CONNACK and PINGRESP: it fails
// when the broker does not accept connections or does not answer them, within ctx.
func (b *Broker) Check(ctx context.Context) error {
	if !b.started.Load() {
		return ErrClosed
	}
	addr, secure := b.addrs[ListenerTCP], false
	if addr == nil {
		addr, secure = b.addrs[ListenerTLS], true
	}
	if addr == nil {
		return nil // no MQTT listener to check (in-process use only)
	}
	target := addr.String()
	if ta, ok := addr.(*net.TCPAddr); ok && ta.IP.IsUnspecified() {
		target = net.JoinHostPort("127.0.0.1", fmt.Sprint(ta.Port))
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", target)
	if err != nil {
		return fmt.Errorf("broker: not accepting connections on %s: %w", target, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	} else {
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	}
	if secure {
		tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true}) // our own listener
		if err := tc.HandshakeContext(ctx); err != nil {
			return fmt.Errorf("broker: TLS handshake with %s: %w", target, err)
		}
		c = tc
	}
	var id [8]byte
	_, _ = rand.Read(id[:])
	body := appendMQTTString(nil, "MQTT")
	body = append(body, 4, 0xc2, 0, 10) // 3.1.1; username, password, clean; keepalive 10 s
	body = appendMQTTString(body, fmt.Sprintf("$health-%x", id))
	body = appendMQTTString(appendMQTTString(body, healthUser), b.healthToken)
	connect := append([]byte{0x10, byte(len(body))}, body...)             // < 128 bytes
	if _, err := c.Write(append(connect, 0xc0, 0, 0xe0, 0)); err != nil { // CONNECT, PINGREQ, DISCONNECT
		return fmt.Errorf("broker: writing to %s: %w", target, err)
	}
	var in [6]byte // CONNACK (4 bytes), PINGRESP (2)
	if _, err := io.ReadFull(c, in[:]); err != nil {
		return fmt.Errorf("broker: no answer from %s: %w", target, err)
	}
	if in[0] != 0x20 || in[3] != 0 || in[4] != 0xd0 {
		return fmt.Errorf("broker: unexpected answer % x from %s", in, target)
	}
	return nil
}

func appendMQTTString(b []byte, s string) []byte {
	return append(binary.BigEndian.AppendUint16(b, uint16(len(s))), s...)
}

// isHealthProbe reports whether a CONNECT carries the health probe's credentials.
func (b *Broker) isHealthProbe(username, password []byte) bool {
	return string(username) == healthUser &&
		subtle.ConstantTimeCompare(password, []byte(b.healthToken)) == 1
}
