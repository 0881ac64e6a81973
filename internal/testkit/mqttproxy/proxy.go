// Package mqttproxy is a TCP proxy for MQTT connections that can alter the payloads the
// broker sends to a client, on the wire, so that fault-injection tests put real bytes on
// a real socket instead of hooking the client.
//
// # Model
//
// A client connects to the proxy as it would to the broker. The proxy reads the client's
// CONNECT (to learn its client identifier and protocol version), dials the broker, and
// then copies both directions. Client-to-broker bytes pass untouched. Broker-to-client
// bytes are read one MQTT packet at a time (fixed header, remaining length, body); for
// every PUBLISH, Options.Tamper sees the client id, the topic and the payload, and may
// change payload bytes in place before the packet is written on. Lengths never change,
// so the framing stays valid and only the application data is damaged.
//
// MQTT 3.1, 3.1.1 and 5 are understood (5 only as far as skipping PUBLISH properties).
// The proxy binds where Options.Listen says; tests use 127.0.0.1:0.
//
// A Proxy is safe for concurrent use. Close stops the listener and every connection and
// waits for their goroutines.
package mqttproxy

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// MQTT control packet types this package looks at.
const (
	typeConnect = 1
	typePublish = 3
)

// DefaultMaxPacket is the largest packet forwarded when Options.MaxPacket is 0: twice
// the largest Sealcast message (PROTOCOL.md 9), so the proxy never refuses what a broker
// would accept.
const DefaultMaxPacket = 2 << 20

// Options configure a Proxy.
type Options struct {
	// Listen is the proxy's address, e.g. "127.0.0.1:0".
	Listen string
	// Target is the broker's address, host:port.
	Target string
	// Tamper, if set, is called for every PUBLISH the broker sends to a client, on that
	// connection's goroutine, with the client identifier from its CONNECT. It may change
	// payload in place (the packet is written after it returns) and reports whether it
	// did, for Stats.Tampered. It must not keep payload.
	Tamper func(clientID, topic string, payload []byte) bool
	// MaxPacket bounds one packet in either direction (DefaultMaxPacket).
	MaxPacket int
	// ConnectTimeout bounds the wait for a client's CONNECT and the dial to Target (10 s).
	ConnectTimeout time.Duration
}

// Stats are a Proxy's counters since Start.
type Stats struct {
	Connections int64 // client connections forwarded to the broker
	Refused     int64 // client connections closed before reaching the broker
	Publishes   int64 // PUBLISH packets forwarded from the broker to clients
	Tampered    int64 // of which Tamper changed and the proxy wrote out
}

// Proxy is a running proxy.
type Proxy struct {
	o      Options
	ln     net.Listener
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu    sync.Mutex
	conns map[net.Conn]struct{}

	conn, refused, publishes, tampered atomic.Int64
}

// Start listens on o.Listen and forwards to o.Target until Close.
func Start(o Options) (*Proxy, error) {
	if o.Target == "" {
		return nil, errors.New("mqttproxy: Options.Target is empty: name the broker's host:port")
	}
	if o.MaxPacket <= 0 {
		o.MaxPacket = DefaultMaxPacket
	}
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = 10 * time.Second
	}
	ln, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return nil, fmt.Errorf("mqttproxy: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &Proxy{o: o, ln: ln, ctx: ctx, cancel: cancel, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr is the proxy's listening address, host:port.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Stats returns a snapshot of the counters.
func (p *Proxy) Stats() Stats {
	return Stats{Connections: p.conn.Load(), Refused: p.refused.Load(), Publishes: p.publishes.Load(), Tampered: p.tampered.Load()}
}

// Close stops accepting, closes every connection and waits for the proxy's goroutines.
func (p *Proxy) Close() error {
	p.cancel()
	err := p.ln.Close()
	p.mu.Lock()
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
	return err
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return // closed
		}
		if !p.track(c) {
			c.Close()
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			defer p.untrack(c)
			p.serve(c)
		}()
	}
}

// track registers a connection for Close; it reports false once the proxy is closing.
func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ctx.Err() != nil {
		return false
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	c.Close()
}

// serve forwards one client connection.
func (p *Proxy) serve(client net.Conn) {
	cr := bufio.NewReader(client)
	client.SetReadDeadline(time.Now().Add(p.o.ConnectTimeout))
	connect, err := readPacket(cr, p.o.MaxPacket)
	if err != nil {
		p.refused.Add(1)
		return
	}
	info, err := parseConnect(connect)
	if err != nil {
		p.refused.Add(1)
		return
	}
	client.SetReadDeadline(time.Time{})
	d := net.Dialer{Timeout: p.o.ConnectTimeout}
	broker, err := d.DialContext(p.ctx, "tcp", p.o.Target)
	if err != nil {
		p.refused.Add(1) // the client sees its connection closed, as with a broker that is down
		return
	}
	if !p.track(broker) {
		broker.Close()
		return
	}
	defer p.untrack(broker)
	p.conn.Add(1)
	if _, err := broker.Write(connect); err != nil {
		return
	}
	done := make(chan struct{})
	go func() { // client -> broker, untouched; cr may hold bytes read past CONNECT
		defer close(done)
		io.Copy(broker, cr)
		broker.Close()
		client.Close()
	}()
	p.fromBroker(broker, client, info)
	broker.Close()
	client.Close()
	<-done
}

// fromBroker forwards broker -> client packet by packet, offering each PUBLISH to Tamper.
func (p *Proxy) fromBroker(broker, client net.Conn, info connectInfo) {
	br := bufio.NewReaderSize(broker, 64<<10)
	for {
		pk, err := readPacket(br, p.o.MaxPacket)
		if err != nil {
			return
		}
		changed := false
		if pk[0]>>4 == typePublish {
			p.publishes.Add(1)
			if p.o.Tamper != nil {
				topic, payload, err := splitPublish(pk, info.version >= 5)
				if err != nil {
					return // a broker sending a malformed PUBLISH: give up on this connection
				}
				changed = p.o.Tamper(info.clientID, topic, payload)
			}
		}
		if _, err := client.Write(pk); err != nil {
			return
		}
		if changed {
			p.tampered.Add(1)
		}
	}
}

// errMalformed is wrapped by every parse error.
var errMalformed = errors.New("mqttproxy: malformed MQTT packet")

// readPacket reads one whole control packet: fixed header, remaining length, body.
func readPacket(r *bufio.Reader, max int) ([]byte, error) {
	var hdr [5]byte
	b, err := r.ReadByte()
	if err != nil {
		return nil, err
	}
	hdr[0] = b
	n, mult := 0, 1
	i := 1
	for {
		b, err := r.ReadByte()
		if err != nil {
			return nil, err
		}
		hdr[i] = b
		i++
		n += int(b&0x7f) * mult
		if b&0x80 == 0 {
			break
		}
		if i == len(hdr) { // at most four length bytes [MQTT-2.2.3]
			return nil, fmt.Errorf("%w: remaining length longer than 4 bytes", errMalformed)
		}
		mult *= 128
	}
	if i+n > max {
		return nil, fmt.Errorf("%w: packet of %d bytes exceeds the limit of %d", errMalformed, i+n, max)
	}
	pk := make([]byte, i+n)
	copy(pk, hdr[:i])
	if _, err := io.ReadFull(r, pk[i:]); err != nil {
		return nil, err
	}
	return pk, nil
}

// body returns a whole packet's bytes after its fixed header and remaining length.
func body(pk []byte) []byte {
	i := 1
	for i < len(pk) && i < 5 && pk[i]&0x80 != 0 {
		i++
	}
	return pk[min(i+1, len(pk)):]
}

type connectInfo struct {
	version  byte // protocol level: 3 (3.1), 4 (3.1.1), 5
	clientID string
}

// parseConnect reads the protocol level and client identifier of a CONNECT packet.
func parseConnect(pk []byte) (connectInfo, error) {
	var info connectInfo
	if pk[0]>>4 != typeConnect {
		return info, fmt.Errorf("%w: first packet is type %d, not CONNECT", errMalformed, pk[0]>>4)
	}
	b := body(pk)
	name, b, ok := cutString(b)
	if !ok || (name != "MQTT" && name != "MQIsdp") || len(b) < 4 {
		return info, fmt.Errorf("%w: bad CONNECT protocol name", errMalformed)
	}
	info.version = b[0]
	b = b[4:] // level, flags, keep alive
	if info.version >= 5 {
		var ok bool
		if b, ok = skipProperties(b); !ok {
			return info, fmt.Errorf("%w: bad CONNECT properties", errMalformed)
		}
	}
	id, _, ok := cutString(b)
	if !ok {
		return info, fmt.Errorf("%w: bad CONNECT client identifier", errMalformed)
	}
	info.clientID = id
	return info, nil
}

// splitPublish returns the topic of a PUBLISH packet and its payload, which aliases pk.
func splitPublish(pk []byte, v5 bool) (string, []byte, error) {
	qos := (pk[0] >> 1) & 3
	b := body(pk)
	topic, b, ok := cutString(b)
	if !ok {
		return "", nil, fmt.Errorf("%w: bad PUBLISH topic", errMalformed)
	}
	if qos > 0 {
		if len(b) < 2 {
			return "", nil, fmt.Errorf("%w: PUBLISH without packet identifier", errMalformed)
		}
		b = b[2:]
	}
	if v5 {
		if b, ok = skipProperties(b); !ok {
			return "", nil, fmt.Errorf("%w: bad PUBLISH properties", errMalformed)
		}
	}
	return topic, b, nil
}

// cutString splits a two-byte-length-prefixed string off b.
func cutString(b []byte) (string, []byte, bool) {
	if len(b) < 2 {
		return "", b, false
	}
	n := int(binary.BigEndian.Uint16(b))
	if len(b) < 2+n {
		return "", b, false
	}
	return string(b[2 : 2+n]), b[2+n:], true
}

// skipProperties skips an MQTT 5 property block (variable byte integer length, then the
// properties).
func skipProperties(b []byte) ([]byte, bool) {
	n, mult, i := 0, 1, 0
	for {
		if i >= len(b) || i == 4 {
			return b, false
		}
		c := b[i]
		i++
		n += int(c&0x7f) * mult
		if c&0x80 == 0 {
			break
		}
		mult *= 128
	}
	if len(b) < i+n {
		return b, false
	}
	return b[i+n:], true
}
