// Package operator is the operator's side of the Sealcast admin protocol
// (docs/PROTOCOL.md 12-13): it sends admin requests over MQTT and waits for their
// replies, uploads images in parts, and reads the retained status topics. The sealcast
// command line is built on it; anything it does, any MQTT client can do.
//
// A Client is safe for concurrent use.
package operator

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// Options configure a Client.
type Options struct {
	URL      string // tcp://host:1883, ssl://host:8883
	Username string
	Password string
	TLS      *tls.Config
	// Timeout bounds each request (default 60 s; a release of a large image takes longer
	// to encrypt and publish, so Release uses at least 10 minutes).
	Timeout time.Duration
}

// Client is an operator's MQTT connection.
type Client struct {
	c       mqtt.Client
	timeout time.Duration
	mu      sync.Mutex
	waiting map[string]chan protocol.Reply
}

// ErrNoReply is returned when no updater answered in time.
var ErrNoReply = errors.New("operator: no reply from the updater in time (is `sealcast serve` running and connected to this broker?)")

// Dial connects to the broker.
func Dial(ctx context.Context, o Options) (*Client, error) {
	if o.Timeout == 0 {
		o.Timeout = 60 * time.Second
	}
	cl := &Client{timeout: o.Timeout, waiting: map[string]chan protocol.Reply{}}
	var rnd [6]byte
	rand.Read(rnd[:])
	co := mqtt.NewClientOptions().AddBroker(o.URL).SetClientID("op-" + hex.EncodeToString(rnd[:])).
		SetUsername(o.Username).SetPassword(o.Password).SetCleanSession(true).
		SetAutoReconnect(true).SetConnectTimeout(10 * time.Second).SetOrderMatters(false)
	if o.TLS != nil {
		co.SetTLSConfig(o.TLS)
	}
	cl.c = mqtt.NewClient(co)
	tok := cl.c.Connect()
	select {
	case <-tok.Done():
	case <-ctx.Done():
		cl.c.Disconnect(0) // stops paho's connect attempt and its goroutines
		return nil, fmt.Errorf("connecting to %s: %w", o.URL, ctx.Err())
	}
	if err := tok.Error(); err != nil {
		return nil, fmt.Errorf("connecting to %s as %q: %w", o.URL, o.Username, err)
	}
	return cl, nil
}

// Close disconnects.
func (c *Client) Close() { c.c.Disconnect(250) }

// Do sends one admin request and decodes the result into out (if not nil). An error reply
// is returned as a *protocol.Error carrying its stable code.
func (c *Client) Do(ctx context.Context, cmd string, args, out any) error {
	var rnd [8]byte
	rand.Read(rnd[:])
	id := "op-" + hex.EncodeToString(rnd[:])
	req := protocol.Request{ID: id, Cmd: cmd}
	if args != nil {
		b, err := json.Marshal(args)
		if err != nil {
			return err
		}
		req.Args = b
	}
	ch := make(chan protocol.Reply, 1)
	c.mu.Lock()
	c.waiting[id] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.waiting, id)
		c.mu.Unlock()
	}()
	reply := protocol.ReplyTopic(id)
	// Subscribe before publishing, so the reply cannot be missed ([SC-12.1]).
	if err := c.wait(ctx, c.c.Subscribe(reply, 1, func(_ mqtt.Client, m mqtt.Message) {
		var r protocol.Reply
		if json.Unmarshal(m.Payload(), &r) == nil {
			select {
			case ch <- r:
			default:
			}
		}
	})); err != nil {
		return fmt.Errorf("subscribing to %s: %w (does this account have the admin role?)", reply, err)
	}
	defer c.c.Unsubscribe(reply)
	body, _ := json.Marshal(req)
	if err := c.wait(ctx, c.c.Publish(protocol.AdminRequests, 1, false, body)); err != nil {
		return fmt.Errorf("publishing %s: %w", cmd, err)
	}
	timeout := c.timeout
	if cmd == protocol.CmdReleaseCreate {
		timeout = max(timeout, 10*time.Minute)
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case r := <-ch:
		if !r.OK {
			if r.Error == nil {
				return protocol.Errorf(protocol.ErrInternal, "error reply without details")
			}
			return r.Error
		}
		if out != nil {
			return json.Unmarshal(r.Result, out)
		}
		return nil
	case <-t.C:
		return ErrNoReply
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (c *Client) wait(ctx context.Context, tok mqtt.Token) error {
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil {
			return err
		}
		if st, ok := tok.(*mqtt.SubscribeToken); ok {
			for f, code := range st.Result() {
				if code == 0x80 {
					return fmt.Errorf("the broker refused the subscription to %s", f)
				}
			}
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Provision registers devices and returns their device files, in requests of at most
// 1,000 devices.
func (c *Client) Provision(ctx context.Context, serials []string, chainLength uint32) ([]protocol.DeviceFile, error) {
	return c.ProvisionTagged(ctx, serials, chainLength, nil)
}

// ProvisionTagged is Provision with tags set on every device (PROTOCOL.md 12.4).
func (c *Client) ProvisionTagged(ctx context.Context, serials []string, chainLength uint32, tags map[string]string) ([]protocol.DeviceFile, error) {
	var files []protocol.DeviceFile
	for i := 0; i < len(serials); i += 1000 {
		var res protocol.ProvisionResult
		args := protocol.ProvisionArgs{Serials: serials[i:min(i+1000, len(serials))], ChainLength: chainLength, Tags: tags}
		if err := c.Do(ctx, protocol.CmdProvision, args, &res); err != nil {
			return files, err
		}
		files = append(files, res.Devices...)
	}
	return files, nil
}

// Upload sends an image of size bytes in parts and returns the upload id for
// release.create.
func (c *Client) Upload(ctx context.Context, img io.ReaderAt, size int64) (string, error) {
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(img, 0, size)); err != nil {
		return "", fmt.Errorf("reading image: %w", err)
	}
	var begin protocol.UploadBeginResult
	if err := c.Do(ctx, protocol.CmdUploadBegin, protocol.UploadBeginArgs{Size: uint64(size), SHA256: hex.EncodeToString(h.Sum(nil))}, &begin); err != nil {
		return "", err
	}
	buf := make([]byte, begin.PartSize)
	var toks []mqtt.Token
	for part, off := uint32(0), int64(0); off < size; part++ {
		n, err := img.ReadAt(buf[:min(int64(len(buf)), size-off)], off)
		if err != nil && !errors.Is(err, io.EOF) {
			return "", fmt.Errorf("reading image: %w", err)
		}
		toks = append(toks, c.c.Publish(protocol.UploadTopic(begin.Upload, part), 1, false, append([]byte(nil), buf[:n]...)))
		off += int64(n)
		// Bound the parts in flight: each is up to part_size bytes.
		if len(toks) >= 8 {
			if err := c.wait(ctx, toks[0]); err != nil {
				return "", fmt.Errorf("uploading: %w", err)
			}
			toks = toks[1:]
		}
	}
	for _, t := range toks {
		if err := c.wait(ctx, t); err != nil {
			return "", fmt.Errorf("uploading: %w", err)
		}
	}
	if err := c.Do(ctx, protocol.CmdUploadFinish, protocol.UploadArgs{Upload: begin.Upload}, nil); err != nil {
		return "", err
	}
	return begin.Upload, nil
}

// Release uploads an image and creates a release of it.
func (c *Client) Release(ctx context.Context, img io.ReaderAt, size int64, args protocol.ReleaseCreateArgs) (*protocol.ReleaseCreateResult, error) {
	up, err := c.Upload(ctx, img, size)
	if err != nil {
		return nil, err
	}
	args.Upload = up
	var res protocol.ReleaseCreateResult
	if err := c.Do(ctx, protocol.CmdReleaseCreate, args, &res); err != nil {
		return nil, err
	}
	return &res, nil
}

// ReleaseStatus returns a release's status through the admin topic.
func (c *Client) ReleaseStatus(ctx context.Context, id keychain.ReleaseID) (*protocol.ReleaseStatus, error) {
	var st protocol.ReleaseStatus
	if err := c.Do(ctx, protocol.CmdReleaseGet, protocol.ReleaseArgs{Release: id}, &st); err != nil {
		return nil, err
	}
	return &st, nil
}

// Watch calls fn with every message on the status topics (retained ones first) until ctx
// is done. fn runs on one goroutine at a time.
func (c *Client) Watch(ctx context.Context, filters []string, fn func(topic string, payload []byte)) error {
	var mu sync.Mutex
	h := func(_ mqtt.Client, m mqtt.Message) {
		mu.Lock()
		defer mu.Unlock()
		fn(m.Topic(), m.Payload())
	}
	subs := map[string]byte{}
	for _, f := range filters {
		subs[f] = 1
	}
	if err := c.wait(ctx, c.c.SubscribeMultiple(subs, h)); err != nil {
		if ctx.Err() != nil {
			// The caller stopped watching, possibly from fn: retained messages can arrive
			// before the SUBACK is processed, and fn may have had all it wanted.
			c.c.Unsubscribe(filters...)
			return nil
		}
		return fmt.Errorf("subscribing to %s: %w", strings.Join(filters, ", "), err)
	}
	<-ctx.Done()
	c.c.Unsubscribe(filters...)
	return nil
}
