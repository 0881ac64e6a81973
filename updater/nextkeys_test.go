package updater_test

import (
	"encoding/json"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// TestNextKeysAfterMixedAcks: acks handled together, after which some devices have a
// release pending and others none. Each device gets exactly what comes next for it: the
// pending release wrapped at its new position (and recorded as assigned there), or a
// cleared key topic; and each gets its receipt and its status.
func TestNextKeysAfterMixedAcks(t *testing.T) {
	for name, open := range stores {
		t.Run(name, func(t *testing.T) {
			e := startEnv(t, open)
			files := e.provision(4)
			devs := make([]*testDevice, len(files))
			for i, f := range files {
				devs[i] = connectDevice(t, e.b.URL, f)
			}
			n := files[0].Seq
			e.release(randomImage(3000), 1)
			// Devices 0 and 1 install release 1 and are confirmed at n-1.
			for _, d := range devs[:2] {
				ack, _, _ := d.install()
				d.publishAck(ack)
				d.receipt(ack, keychain.Key(d.u, n))
			}
			// Devices 2 and 3 install release 1 but have not acked yet.
			late := make([][]byte, 4)
			for i, d := range devs[2:] {
				late[2+i], _, _ = d.install()
			}
			// Release 2 for everyone: wrapped at n-1 for 0 and 1, at n for 2 and 3.
			rid2 := e.release(randomImage(3000), 2)
			for i, d := range devs[:2] {
				late[i], _, _ = d.install() // release 2 at n-1
			}
			// All four acks at once: 0 and 1 have nothing left, 2 and 3 have release 2.
			for i, d := range devs {
				d.publishAck(late[i])
			}
			for i, d := range devs {
				seq := n
				if i < 2 {
					seq = n - 1
				}
				d.receipt(late[i], keychain.Key(d.u, seq))
			}
			for i, d := range devs {
				switch i {
				case 0, 1: // moved by the ack, which the receipt confirms
					got := e.device(d.file.Serial)
					if got.Seq != n-2 || got.Version != 2 || len(got.Assigned) != 0 {
						t.Errorf("%s: at %d, version %d, assigned %v; want %d, 2, nothing", d.file.Serial, got.Seq, got.Version, got.Assigned, n-2)
					}
					// Its key topic, which held release 2 at n-1, is cleared.
					eventually(t, "the key topic of "+d.file.Serial+" cleared", func() bool {
						return e.retained(protocol.KeyTopic(d.file.Serial)) == nil
					})
				case 2, 3:
					// The next key message is release 2 at n-1, and it opens. It is
					// published only once its assignment is stored.
					km := d.nextKey(n - 1)
					if km.ID != rid2 || km.Kind != keychain.KindRelease {
						t.Errorf("%s: next key is %s %s, want release %s", d.file.Serial, km.Kind, km.ID, rid2)
					} else if _, err := km.Open(keychain.Key(d.u, n-1), d.file.Serial); err != nil {
						t.Errorf("%s: next key does not open: %v", d.file.Serial, err)
					}
					got := e.device(d.file.Serial)
					if got.Seq != n-1 || got.Version != 1 || len(got.Assigned) != 1 || got.Assigned[0] != rid2 {
						t.Errorf("%s: at %d, version %d, assigned %v; want %d, 1, [%s]", d.file.Serial, got.Seq, got.Version, got.Assigned, n-1, rid2)
					}
				}
			}
			// The server's view of each device is out, with its new position.
			for i, d := range devs {
				var st protocol.DeviceStatus
				eventually(t, "device status of "+d.file.Serial, func() bool {
					b := e.retained(protocol.DeviceStatusTopic(d.file.Serial))
					return json.Unmarshal(b, &st) == nil && st.State == protocol.DeviceInstalled &&
						(i < 2 && st.Seq == n-2 || i >= 2 && st.Seq == n-1)
				})
			}
			if s := e.u.Stats(); s.AcksAccepted != 6 || len(s.AcksRejected) != 0 {
				t.Errorf("stats %+v", s)
			}
		})
	}
}

// nextKey returns the first key message at seq from the device's key topic, skipping
// older ones still queued.
func (d *testDevice) nextKey(seq uint32) *keychain.KeyMessage {
	d.t.Helper()
	for {
		km, err := keychain.ParseKeyMessage(d.next(d.keys, "key message"))
		if err != nil {
			d.t.Fatal(err)
		}
		if km.Seq == seq {
			return km
		}
	}
}

// retained returns the retained message on topic, or nil if there is none. It reads with
// the updater account, which may read every topic.
func (e *env) retained(topic string) []byte {
	e.t.Helper()
	o := mqtt.NewClientOptions().AddBroker(e.b.URL).SetUsername(e.b.Updater.Username).SetPassword(e.b.Updater.Password).SetClientID("reader-" + topic)
	c := mqtt.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		e.t.Fatalf("monitor connect: %v", tok.Error())
	}
	defer c.Disconnect(0)
	ch := make(chan []byte, 1)
	tok := c.Subscribe(topic, 1, func(_ mqtt.Client, m mqtt.Message) {
		select {
		case ch <- append([]byte(nil), m.Payload()...):
		default:
		}
	})
	if tok.Wait(); tok.(*mqtt.SubscribeToken).Result()[topic] != 1 {
		e.t.Fatalf("subscribing to %s was refused", topic)
	}
	select {
	case b := <-ch:
		return b
	case <-time.After(200 * time.Millisecond):
		return nil
	}
}
