package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"
	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

func deviceCommand(e *env) *ffcli.Command {
	fs := newFlags("device", e)
	file := fs.String("file", "", "device file from provisioning (PROTOCOL.md 14); read only to create the vault")
	vault := fs.String("vault", "", "the vault: the device's protected memory, created from -file on first start (default: -file with the extension .vault)")
	installDir := fs.String("install-dir", "", "install into A/B slot files in this directory: slot-a.img, slot-b.img and the pointer file \"active\"")
	installCmd := fs.String("install-cmd", "", "install by running this /bin/sh command line, the image on its standard input; if it contains {image}, the image is a temporary file whose quoted path replaces {image}")
	brokerURL := fs.String("broker", "", "broker URL, replacing the one in the vault, e.g. tcp://127.0.0.1:1883")
	tlsCA := fs.String("tls-ca", "", "PEM CA bundle that signed the broker's certificate, for ssl:// URLs (default: the system's roots)")
	tlsCert := fs.String("tls-cert", "", "PEM client certificate whose CN is the serial, for a broker that admits devices by certificate (serve -client-ca), with -tls-key")
	tlsKey := fs.String("tls-key", "", "PEM private key of -tls-cert")
	window := fs.Int("window", 4, "chunk subscriptions open at once, 1 to 64 (PROTOCOL.md 9.2)")
	chunkTimeout := fs.Duration("chunk-timeout", 30*time.Second, "fetch the manifest or a chunk again after waiting this long; the third timeout fails the update")
	switchCmd := fs.String("switch-cmd", "", "with -install-dir: /bin/sh command line that makes the bootloader boot slot $SEALCAST_SLOT ({slot}), run to start a new image on trial and to go back (it may reboot)")
	healthCmd := fs.String("health-cmd", "", "with -install-dir: /bin/sh command line that checks the image on trial; exit 0 is healthy, and it must fail unless slot $SEALCAST_SLOT runs (default: healthy once started)")
	confirmCmd := fs.String("confirm-cmd", "", "with -install-dir: /bin/sh command line that makes the bootloader keep the slot on trial, run once it is healthy")
	prefetchDir := fs.String("prefetch-dir", "", "download releases announced for prefetch before their key, keeping their chunks in this directory (PROTOCOL.md 9.3; off when empty)")
	prefetchLimit := fs.Uint64("prefetch-limit", 256<<20, "with -prefetch-dir: the most bytes of chunks kept; a larger release is not prefetched")
	trialBoots := fs.Int("trial-boots", 3, "with -install-dir: fail a trial after this many switches to the new image, or starts with it, without a passed health check")
	healthTimeout := fs.Duration("health-timeout", 5*time.Minute, "with -install-dir: a health check that has not passed within this long fails")
	return &ffcli.Command{
		Name:       "device",
		ShortUsage: "sealcast device -file F (-install-dir DIR | -install-cmd CMD) [flags]",
		ShortHelp:  "run one device: receive, verify, install and acknowledge updates",
		LongHelp: strings.TrimSpace(`
Runs the device agent for the device described by a device file from provisioning
("sealcast provision", or device.provision on the admin topic).

The vault is the device's protected memory: its unit data, sequence number, installed
version and last ack, written crash-safely (temporary file, fsync, rename) at every step
that must survive a power loss. On the first start it is created from -file, by default
next to it (sensor-0001.json -> sensor-0001.vault). From then on only the vault is read:
the device file is out of date after the first update and may be removed (it holds the
same secrets). Never copy a vault to another machine or restore an old one on purpose:
it is the device's place in its key chain.

Installs go to A/B slot files (-install-dir) or to a command (-install-cmd), for example
  -install-cmd 'cat > /tmp/firmware.bin'
  -install-cmd 'fw-flash --image {image}'
The command must exit 0 only when it applied the image; it sees SEALCAST_RELEASE,
SEALCAST_VERSION, SEALCAST_IMAGE_SIZE and SEALCAST_IMAGE_SHA256 in its environment. Its
exit status is the image's health: the device acks once it exits 0 (PROTOCOL.md 10.5).

With -install-dir, every new image runs on trial first (PROTOCOL.md 10.5): the device
switches to it (-switch-cmd), checks it (-health-cmd), and only then records the update
and acks it (-confirm-cmd keeps it). A failed check, or -trial-boots starts without a
passed one, switches back to the previous slot and reports "unhealthy"; the trial is
kept in the vault, so a reboot in the middle goes on with it. For example, with U-Boot:
  -switch-cmd 'fw_setenv boot_slot {slot} && fw_setenv upgrade_available 1 && reboot'
  -health-cmd 'test "$(cat /run/booted-slot)" = {slot} && systemctl is-system-running'
  -confirm-cmd 'fw_setenv upgrade_available 0'

With -prefetch-dir, a release announced for prefetch (release -prefetch) is downloaded
before its key comes, within the period the server gives, and kept there (at most
-prefetch-limit bytes); the key then installs it from there (PROTOCOL.md 9.3).

Each install is printed on standard output. Stops cleanly on SIGINT or SIGTERM.`),
		FlagSet: fs,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return usagef("device takes no arguments (got %q); flags go before them", args)
			}
			c := deviceConfig{
				file: *file, vault: *vault, installDir: *installDir, installCmd: *installCmd,
				brokerURL: *brokerURL, tlsCA: *tlsCA, tlsCert: *tlsCert, tlsKey: *tlsKey, window: *window, chunkTimeout: *chunkTimeout,
				switchCmd: *switchCmd, healthCmd: *healthCmd, confirmCmd: *confirmCmd,
				trialBoots: *trialBoots, healthTimeout: *healthTimeout,
				prefetchDir: *prefetchDir, prefetchLimit: *prefetchLimit,
			}
			return runDevice(ctx, e, c)
		},
	}
}

type deviceConfig struct {
	file, vault, installDir, installCmd string
	brokerURL, tlsCA, tlsCert, tlsKey   string
	window                              int
	chunkTimeout                        time.Duration
	// The trial of -install-dir images [SC-10.5].
	switchCmd, healthCmd, confirmCmd string
	trialBoots                       int
	healthTimeout                    time.Duration
	// Prefetch [SC-9.9].
	prefetchDir   string
	prefetchLimit uint64
}

// shellCmd is cmdline run by /bin/sh, or nothing for an empty one.
func shellCmd(cmdline string) []string {
	if cmdline == "" {
		return nil
	}
	return []string{"/bin/sh", "-c", cmdline}
}

func runDevice(ctx context.Context, e *env, c deviceConfig) error {
	if (c.installDir == "") == (c.installCmd == "") {
		return usagef("give exactly one of -install-dir DIR (A/B slot files) and -install-cmd CMD")
	}
	if c.window < 1 || c.window > 64 {
		return usagef("-window %d is outside 1..64", c.window)
	}
	if c.installDir == "" && c.switchCmd+c.healthCmd+c.confirmCmd != "" {
		return usagef("-switch-cmd, -health-cmd and -confirm-cmd go with -install-dir; an -install-cmd's exit status is its health")
	}
	if c.trialBoots < 1 || c.healthTimeout <= 0 {
		return usagef("-trial-boots %d and -health-timeout %v must be positive", c.trialBoots, c.healthTimeout)
	}
	log := e.logger()
	v, err := openDeviceVault(c.file, c.vault, log)
	if err != nil {
		return err
	}
	o := device.Options{
		Vault: v, Logger: log, Window: c.window, ChunkTimeout: c.chunkTimeout, BrokerURL: c.brokerURL,
		TrialBoots: c.trialBoots, HealthTimeout: c.healthTimeout,
	}
	if c.prefetchDir != "" {
		if o.Prefetch, err = device.NewDirChunkStore(c.prefetchDir, c.prefetchLimit); err != nil {
			return err
		}
	}
	if o.TLSConfig, err = clientTLS(c.tlsCA, c.tlsCert, c.tlsKey, "-tls-ca", "-tls-cert", "-tls-key"); err != nil {
		return err
	}
	var slots *device.SlotInstaller
	where := "with the install command"
	if c.installDir != "" {
		if slots, err = device.NewSlotInstaller(c.installDir); err != nil {
			return err
		}
		slots.SwitchCmd, slots.HealthCmd, slots.ConfirmCmd = shellCmd(c.switchCmd), shellCmd(c.healthCmd), shellCmd(c.confirmCmd)
		o.Installer = slots
	} else {
		o.Installer = shellInstaller(c.installCmd)
	}
	var committed keychain.ReleaseID // only touched on the agent's goroutine
	o.OnEvent = func(ev device.Event) {
		switch ev.Kind {
		case device.EventCommitted:
			committed = ev.Release
		case device.EventPersisted:
			if ev.Release != committed {
				return // a re-key, not an install
			}
			if slots != nil {
				if a, ok, err := slots.Active(); err == nil && ok {
					where = "into slot " + a.Slot + " (" + slots.SlotPath(a.Slot) + ")"
				}
			}
			fmt.Fprintf(e.stdout, "installed version %d (release %s) %s; sequence number now %d\n", ev.Version, ev.Release, where, ev.Seq)
		case device.EventConfirmed:
			fmt.Fprintf(e.stdout, "confirmed version %d (release %s) by the server\n", ev.Version, ev.Release)
		}
	}
	a, err := device.New(o)
	if err != nil {
		return err
	}
	st, _ := v.Load()
	log.Info().Str("serial", st.Serial).Uint64("version", st.Version).Uint32("seq", st.Seq).Str("vault", v.Path()).
		Msg("device agent running; stop with Ctrl-C")
	if err := a.Run(ctx); err != nil {
		return err
	}
	log.Info().Str("serial", st.Serial).Msg("stopped")
	return nil
}

// openDeviceVault opens the vault at vaultPath (default: file with the extension
// .vault), creating it from the device file when it does not exist yet. An existing vault
// is the truth; the device file is then read only to catch a vault of another device.
func openDeviceVault(file, vaultPath string, log zerolog.Logger) (*device.FileVault, error) {
	if vaultPath == "" {
		if file == "" {
			return nil, usagef("give -file (the device file from provisioning) or -vault (a vault created earlier)")
		}
		vaultPath = strings.TrimSuffix(file, filepath.Ext(file)) + ".vault"
		if vaultPath == file {
			return nil, fmt.Errorf("-file %s looks like a vault; give the device file (.json) or -vault", file)
		}
	}
	v := device.NewFileVault(vaultPath)
	st, err := v.Load()
	switch {
	case errors.Is(err, device.ErrNoVault):
		if file == "" {
			return nil, fmt.Errorf("vault %s does not exist: give -file with the device file to create it", vaultPath)
		}
		f, err := readDeviceFileJSON(file)
		if err != nil {
			return nil, err
		}
		if v, err = device.CreateFileVault(vaultPath, f); err != nil {
			return nil, err
		}
		log.Info().Str("vault", vaultPath).Str("file", file).Str("serial", f.Serial).Uint32("seq", f.Seq).
			Msg("created the vault from the device file; from now on only the vault is read")
		return v, nil
	case err != nil:
		return nil, err
	}
	if file != "" {
		if f, err := readDeviceFileJSON(file); err == nil && f.Serial != st.Serial {
			return nil, fmt.Errorf("vault %s belongs to %q but -file %s is %q: give each device its own -vault", vaultPath, st.Serial, file, f.Serial)
		}
	}
	return v, nil
}

// readDeviceFileJSON reads one device file (PROTOCOL.md 14) and checks every field.
func readDeviceFileJSON(path string) (protocol.DeviceFile, error) {
	var f protocol.DeviceFile
	b, err := os.ReadFile(path)
	if err != nil {
		return f, fmt.Errorf("reading the device file: %w", err)
	}
	if err := json.Unmarshal(b, &f); err != nil {
		return f, fmt.Errorf("device file %s is not a device file (one JSON object, PROTOCOL.md 14): %w", path, err)
	}
	if _, err := device.StateFromDeviceFile(f); err != nil {
		return f, fmt.Errorf("device file %s: %w", path, err)
	}
	return f, nil
}

// shellInstaller runs cmdline with /bin/sh. A {image} in it becomes "$1", the path of
// the temporary image file; without it the image arrives on standard input.
//
// The command is not tied to the signal context: an install that is committing when
// SIGTERM arrives finishes, and the agent persists and acks it before it stops (one
// still reading the image is killed when the agent aborts the download).
func shellInstaller(cmdline string) *device.CommandInstaller {
	if strings.Contains(cmdline, device.ImageArg) {
		script := strings.ReplaceAll(cmdline, device.ImageArg, `"$1"`)
		return &device.CommandInstaller{Path: "/bin/sh", Args: []string{"-c", script, "sealcast-install", device.ImageArg}}
	}
	return &device.CommandInstaller{Path: "/bin/sh", Args: []string{"-c", cmdline}}
}
