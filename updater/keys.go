package updater

import (
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// keys holds what the updater derives from the fleet root secret, and the release keys.
// It is read-only after New but for release, which has its own lock, so every part of
// the updater may share it.
type keys struct {
	root        keychain.RootSecret
	sealK       [keychain.Size]byte    // seals content keys (AES-GCM)
	rekeyK      [keychain.Size]byte    // derives re-key ids (HMAC)
	sealer      *keychain.StateSealer  // opens and seals chain states
	auth        keychain.BrokerAuthKey // derives device passwords
	release     *releaseKeys
	chainLength uint32 // of new devices
}

func newKeys(root keychain.RootSecret, release *releaseKeys, chainLength uint32) *keys {
	return &keys{
		root: root, sealK: root.StateSealKey(), rekeyK: root.RekeyIDKey(), sealer: keychain.NewStateSealer(root), auth: root.BrokerAuth(),
		release: release, chainLength: chainLength,
	}
}

// KeyStore keeps the release keys that keys.rotate makes (PROTOCOL.md 5.1): AddKey must
// store key and its statement durably before it returns, so that a restart signs with
// the key devices were told of. datadir.Dir is one.
type KeyStore interface {
	AddKey(seq uint32, key ed25519.PrivateKey, statement []byte) error
}

// releaseKeys is the one owner of the current release key and the statements that chain
// it to the key devices were first provisioned with.
type releaseKeys struct {
	mu         sync.Mutex
	seq        uint32
	key        ed25519.PrivateKey
	statements [][]byte // statement n at index n-1
}

// current returns the current release key and its sequence number.
func (r *releaseKeys) current() (uint32, ed25519.PrivateKey) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.seq, r.key
}

// all returns the key statements, statement n at index n-1.
func (r *releaseKeys) all() [][]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.statements)
}

// rotate makes a new release key, signs its statement with the current key, has store
// keep both, and then makes it current.
func (r *releaseKeys) rotate(store KeyStore) (uint32, ed25519.PublicKey, []byte, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return 0, nil, nil, err
	}
	seq := r.seq + 1
	st, err := keychain.KeyStatement{Seq: seq, Key: pub}.Sign(r.key)
	if err != nil {
		return 0, nil, nil, err
	}
	if err := store.AddKey(seq, priv, st); err != nil {
		return 0, nil, nil, err
	}
	r.seq, r.key, r.statements = seq, priv, append(r.statements, st)
	return seq, pub, st, nil
}

// sealContentKey seals a release's content key for the store, bound to the release id.
func (k *keys) sealContentKey(id keychain.ReleaseID, ck keychain.ContentKey) ([]byte, error) {
	return keychain.SealSecret(k.sealK, keychain.LabelSealedRelease+id.String(), ck)
}

func (k *keys) openContentKey(r *Release) (keychain.ContentKey, error) {
	ck, err := keychain.OpenSecret(k.sealK, keychain.LabelSealedRelease+r.ID.String(), r.ContentKey)
	if err != nil {
		return keychain.ContentKey{}, fmt.Errorf("updater: opening the content key of release %s (was the root secret changed?): %w", r.ID, err)
	}
	return keychain.ContentKey(ck), nil
}

// rekeyID is the id of the re-key of serial out of epoch: derived, so that a restarted
// updater re-publishes the same re-key it assigned before.
func (k *keys) rekeyID(serial string, epoch uint32) keychain.ReleaseID {
	return keychain.RekeyID(k.rekeyK, serial, epoch)
}

// newDevice derives a device's unit data and first chain state, and its device file.
func (k *keys) newDevice(serial string, length uint32, brokerURL string, now time.Time) (*Device, protocol.DeviceFile, error) {
	ud, err := keychain.DeriveUnitData(k.root, serial, 0)
	if err != nil {
		return nil, protocol.DeviceFile{}, err
	}
	tr, err := keychain.NewTraversal(ud, length)
	if err != nil {
		return nil, protocol.DeviceFile{}, err
	}
	sealed, err := k.sealer.Seal(serial, 0, tr)
	if err != nil {
		return nil, protocol.DeviceFile{}, err
	}
	pw, err := k.auth.DevicePassword(serial)
	if err != nil {
		return nil, protocol.DeviceFile{}, err
	}
	d := &Device{Serial: serial, Seq: length, ChainLength: length, Chain: sealed, State: protocol.DeviceIdle, Provisioned: now}
	seq, key := k.release.current()
	pub := key.Public().(ed25519.PublicKey)
	f := protocol.DeviceFile{
		Serial: serial, UnitData: ud[:], Seq: length, ChainLength: length,
		ReleasePublicKey: protocol.HexBytes(pub), KeySeq: seq,
		Broker: protocol.BrokerConfig{URL: brokerURL, Username: serial, Password: pw},
	}
	return d, f, nil
}

// newDevices derives the devices' unit data, chain states and device files, on as many
// goroutines as workers.
func (k *keys) newDevices(serials []string, length uint32, brokerURL string, now time.Time, workers int) ([]*Device, []protocol.DeviceFile, error) {
	devs := make([]*Device, len(serials))
	files := make([]protocol.DeviceFile, len(serials))
	errs := make([]error, len(serials))
	var wg sync.WaitGroup
	next := make(chan int)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				devs[i], files[i], errs[i] = k.newDevice(serials[i], length, brokerURL, now)
			}
		}()
	}
	for i := range serials {
		next <- i
	}
	close(next)
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return nil, nil, err
		}
	}
	return devs, files, nil
}
