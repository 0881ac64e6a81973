package updater

import (
	"crypto/ed25519"
	"fmt"
	"sync"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// keys holds what the updater derives from the fleet root secret and the signing key. It
// is read-only after New, so every part of the updater may share it.
type keys struct {
	root        keychain.RootSecret
	sealK       [keychain.Size]byte    // seals content keys (AES-GCM)
	rekeyK      [keychain.Size]byte    // derives re-key ids (HMAC)
	sealer      *keychain.StateSealer  // opens and seals chain states
	auth        keychain.BrokerAuthKey // derives device passwords
	signing     ed25519.PrivateKey
	public      ed25519.PublicKey
	chainLength uint32 // of new devices
}

func newKeys(root keychain.RootSecret, signing ed25519.PrivateKey, chainLength uint32) *keys {
	return &keys{
		root: root, sealK: root.StateSealKey(), rekeyK: root.RekeyIDKey(), sealer: keychain.NewStateSealer(root), auth: root.BrokerAuth(),
		signing: signing, public: signing.Public().(ed25519.PublicKey), chainLength: chainLength,
	}
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
	f := protocol.DeviceFile{
		Serial: serial, UnitData: ud[:], Seq: length, ChainLength: length,
		ReleasePublicKey: protocol.HexBytes(k.public),
		Broker:           protocol.BrokerConfig{URL: brokerURL, Username: serial, Password: pw},
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
