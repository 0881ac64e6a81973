package chaos

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// watcher records every key message, ack and receipt the broker delivers, across
// restarts of the serve process. It is several admin connections, each subscribed to the
// topics of a few devices: the broker drops a delivery, even a QoS 1 one, when a client's
// outbound queue (256 messages) is full, and a fan-out to the whole fleet is a burst that
// one connection for every device could not take. Each connection's session is persistent
// (clean session off) and it re-subscribes after every reconnect, which also delivers the
// retained key messages and receipts again. Each distinct payload is kept once per
// serial; receipts are also counted per delivery.
type watcher struct {
	cs []paho.Client

	mu       sync.Mutex
	keys     map[string][][]byte // serial -> distinct key messages (non-empty)
	acks     map[string][][]byte // serial -> distinct acks and reports
	receipts map[string]int      // serial -> receipt deliveries
	connects int
}

// watchShard is how many devices one watcher connection follows.
const watchShard = 25

func startWatcher(t testing.TB, url, password string, serials []string) *watcher {
	t.Helper()
	w := &watcher{keys: map[string][][]byte{}, acks: map[string][][]byte{}, receipts: map[string]int{}}
	for i := 0; i < len(serials); i += watchShard {
		filters := map[string]byte{}
		for _, s := range serials[i:min(i+watchShard, len(serials))] {
			filters[protocol.KeyTopic(s)] = 1
			filters[protocol.AckTopic(s)] = 1
			filters[protocol.ReceiptTopic(s)] = 1
		}
		o := paho.NewClientOptions().AddBroker(url).SetClientID(fmt.Sprintf("chaos-watcher-%03d", i/watchShard)).
			SetUsername("admin").SetPassword(password).SetProtocolVersion(4).
			SetCleanSession(false).SetAutoReconnect(true).SetConnectRetry(true).
			SetConnectRetryInterval(200 * time.Millisecond).SetMaxReconnectInterval(500 * time.Millisecond).
			SetConnectTimeout(5 * time.Second).SetOrderMatters(false).
			SetDefaultPublishHandler(w.handle).
			SetOnConnectHandler(func(c paho.Client) {
				w.mu.Lock()
				w.connects++
				w.mu.Unlock()
				c.SubscribeMultiple(filters, nil)
			})
		c := paho.NewClient(o)
		if tok := c.Connect(); !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
			t.Fatalf("watcher: connecting: %v", tok.Error())
		}
		// The connect handler subscribes too; this one is waited for, so nothing published
		// after startWatcher returns is missed.
		if tok := c.SubscribeMultiple(filters, nil); !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
			t.Fatalf("watcher: subscribing: %v", tok.Error())
		}
		w.cs = append(w.cs, c)
	}
	t.Cleanup(func() {
		for _, c := range w.cs {
			c.Disconnect(100)
		}
	})
	return w
}

func (w *watcher) handle(_ paho.Client, m paho.Message) {
	serial, leaf, ok := protocol.DeviceOf(m.Topic())
	if !ok {
		return
	}
	p := m.Payload()
	w.mu.Lock()
	defer w.mu.Unlock()
	add := func(set map[string][][]byte) {
		for _, q := range set[serial] {
			if bytes.Equal(q, p) {
				return
			}
		}
		set[serial] = append(set[serial], append([]byte(nil), p...))
	}
	switch leaf {
	case "key":
		if len(p) > 0 {
			add(w.keys)
		}
	case "ack":
		add(w.acks)
	case "receipt":
		if len(p) > 0 {
			w.receipts[serial]++
		}
	}
}

// ackFor returns the captured ack (kind installed) of serial for release id.
func (w *watcher) ackFor(serial string, id keychain.ReleaseID) ([]byte, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, raw := range w.acks[serial] {
		if a, err := keychain.ParseAck(raw); err == nil && a.Kind == keychain.AckInstalled && a.ID == id {
			return raw, true
		}
	}
	return nil, false
}

func (w *watcher) connections() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.connects
}

func (w *watcher) receiptCount(serial string) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.receipts[serial]
}

// keyIndex is one chain index of one device: (serial, epoch, seq).
type keyIndex struct {
	serial     string
	epoch, seq uint32
}

// wrapped is what the key messages captured at one index carry.
type wrapped struct {
	ids     map[keychain.ReleaseID]bool
	secrets map[[keychain.Size]byte]bool
	digests map[[32]byte]bool
	copies  int // distinct key messages (a re-wrap has a fresh nonce)
}

// openKeys opens every captured key message with the device's own key (the test holds
// the device files) and groups what they carry by chain index.
func (w *watcher) openKeys(units map[string]keychain.UnitData) (map[keyIndex]*wrapped, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := map[keyIndex]*wrapped{}
	for serial, msgs := range w.keys {
		u, ok := units[serial]
		if !ok {
			return nil, fmt.Errorf("key message for %s, which the suite did not provision", serial)
		}
		for _, raw := range msgs {
			km, err := keychain.ParseKeyMessage(raw)
			if err != nil {
				return nil, fmt.Errorf("key message for %s does not parse: %w", serial, err)
			}
			if km.Epoch != 0 {
				return nil, fmt.Errorf("key message for %s in epoch %d; the suite never re-keys", serial, km.Epoch)
			}
			secret, err := km.Open(keychain.Key(u, km.Seq), serial)
			if err != nil {
				return nil, fmt.Errorf("key message for %s at seq %d does not open under the device's key: %w", serial, km.Seq, err)
			}
			ix := keyIndex{serial, km.Epoch, km.Seq}
			wr := out[ix]
			if wr == nil {
				wr = &wrapped{ids: map[keychain.ReleaseID]bool{}, secrets: map[[keychain.Size]byte]bool{}, digests: map[[32]byte]bool{}}
				out[ix] = wr
			}
			wr.ids[km.ID] = true
			wr.secrets[secret] = true
			wr.digests[km.ManifestDigest] = true
			wr.copies++
		}
	}
	return out, nil
}

// publishAs connects with a device's own credentials and publishes payloads to its ack
// topic, QoS 1, each acknowledged by the broker. The device's agent must be stopped:
// the broker lets one connection per client id live.
func publishAs(ctx context.Context, url string, f protocol.DeviceFile, payloads ...[]byte) error {
	o := paho.NewClientOptions().AddBroker(url).SetClientID(f.Serial).SetUsername(f.Serial).
		SetPassword(f.Broker.Password).SetProtocolVersion(4).SetCleanSession(true).
		SetAutoReconnect(false).SetConnectTimeout(10 * time.Second)
	c := paho.NewClient(o)
	if err := waitToken(ctx, c.Connect()); err != nil {
		return fmt.Errorf("connecting as %s: %w", f.Serial, err)
	}
	defer c.Disconnect(100)
	for _, p := range payloads {
		if err := waitToken(ctx, c.Publish(protocol.AckTopic(f.Serial), 1, false, p)); err != nil {
			return fmt.Errorf("publishing as %s: %w", f.Serial, err)
		}
	}
	return nil
}

func waitToken(ctx context.Context, tok paho.Token) error {
	select {
	case <-tok.Done():
		return tok.Error()
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ackIndex groups the captured authentic acks (kind installed, MAC valid under the
// device's key) by chain index: which releases each index confirmed.
func (w *watcher) ackIndex(units map[string]keychain.UnitData) map[keyIndex]map[keychain.ReleaseID]bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := map[keyIndex]map[keychain.ReleaseID]bool{}
	for serial, acks := range w.acks {
		for _, raw := range acks {
			a, err := keychain.ParseAck(raw)
			if err != nil || a.Kind != keychain.AckInstalled {
				continue
			}
			if keychain.VerifyAck(raw, keychain.Key(units[serial], a.Seq), serial) != nil {
				continue // one of the forged acks the suite injected
			}
			ix := keyIndex{serial, a.Epoch, a.Seq}
			if out[ix] == nil {
				out[ix] = map[keychain.ReleaseID]bool{}
			}
			out[ix][a.ID] = true
		}
	}
	return out
}
