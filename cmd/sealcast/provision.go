package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/peterbourgon/ff/v3/ffcli"

	"github.com/sealcast/sealcast/internal/atomicfile"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

func provisionCommand(e *env) *ffcli.Command {
	fs := newFlags("provision", e)
	var cf clientFlags
	cf.register(fs)
	var p provisionFlags
	fs.StringVar(&p.serial, "serial", "", "provision this one device")
	fs.StringVar(&p.serials, "serials", "", "provision the devices listed in this file: one serial a line, # starts a comment")
	fs.IntVar(&p.count, "count", 0, "provision this many devices, named -prefix followed by a six-digit number from 000001")
	fs.StringVar(&p.prefix, "prefix", "device-", "serial prefix for -count")
	fs.StringVar(&p.out, "out", "", "write the device file here (one device only; default: standard output)")
	fs.StringVar(&p.outDir, "out-dir", "", "write one <serial>.json per device into this directory (created if missing)")
	fs.BoolVar(&p.force, "force", false, "overwrite existing device files")
	fs.Var(&p.tags, "tag", "set a tag key=value on every device (repeat for more; PROTOCOL.md 12.4)")
	fs.UintVar(&p.chainLength, "chain-length", 0, "key chain length: how many updates before a re-key (a power of two, 16 to 1048576; default: the service's)")
	return &ffcli.Command{
		Name:       "provision",
		ShortUsage: "sealcast provision (-serial S | -serials FILE | -count N [-prefix P]) [-out FILE | -out-dir DIR]",
		ShortHelp:  "register devices and write their device files",
		LongHelp: `Registers devices with the service (admin request device.provision) and writes their
device files (PROTOCOL.md 14): the unit data, chain position and broker password that the
device keeps in protected memory. Treat them as secrets; they are written with mode 0600.

One device goes to standard output unless -out or -out-dir is given; several devices need
-out-dir, which gets one <serial>.json per device. Existing files are never overwritten
without -force, and they are checked before anything is sent, so that a device is never
provisioned without a place for its file.

Examples:
  sealcast provision -serial sensor-0001 > sensor-0001.json
  sealcast provision -count 100 -prefix sensor- -out-dir devices
  sealcast provision -serials serials.txt -out-dir devices
` + clientHelp,
		FlagSet: fs,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return usagef("provision takes no arguments (got %q); use -serial, -serials or -count", args)
			}
			return runProvision(ctx, e, &cf, &p)
		},
	}
}

type provisionFlags struct {
	serial, serials, prefix, out, outDir string
	count                                int
	force                                bool
	chainLength                          uint
	tags                                 tagFlag
}

// maxBulk bounds one provision command; operator.Provision sends it in requests of 1,000.
const maxBulk = 1_000_000

func (p *provisionFlags) list() ([]string, error) {
	given := 0
	for _, b := range []bool{p.serial != "", p.serials != "", p.count != 0} {
		if b {
			given++
		}
	}
	if given != 1 {
		return nil, usagef("give exactly one of -serial, -serials and -count")
	}
	var serials []string
	switch {
	case p.serial != "":
		serials = []string{p.serial}
	case p.serials != "":
		var err error
		if serials, err = readSerials(p.serials); err != nil {
			return nil, err
		}
	default:
		if p.count < 1 || p.count > maxBulk {
			return nil, fmt.Errorf("-count must be 1 to %d (got %d)", maxBulk, p.count)
		}
		// The same names device.provision gives with count and prefix (PROTOCOL.md 12.1),
		// made here so that any number of devices goes in requests of 1,000.
		for i := 1; i <= p.count; i++ {
			serials = append(serials, fmt.Sprintf("%s%06d", p.prefix, i))
		}
	}
	for _, s := range serials {
		if err := keychain.CheckSerial(s); err != nil {
			return nil, err
		}
	}
	if p.chainLength != 0 && !keychain.ValidChainLength(uint32(p.chainLength)) {
		return nil, fmt.Errorf("-chain-length %d must be a power of two from %d to %d", p.chainLength, keychain.MinChainLength, keychain.MaxChainLength)
	}
	return serials, nil
}

// readSerials reads one serial a line; blank lines and # comments are skipped.
func readSerials(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading -serials: %w", err)
	}
	defer f.Close()
	var serials []string
	seen := map[string]int{}
	sc := bufio.NewScanner(f)
	for line := 1; sc.Scan(); line++ {
		s, _, _ := strings.Cut(sc.Text(), "#")
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if err := keychain.CheckSerial(s); err != nil {
			return nil, fmt.Errorf("%s:%d: %w", path, line, err)
		}
		if first, ok := seen[s]; ok {
			return nil, fmt.Errorf("%s:%d: serial %q is already on line %d", path, line, s, first)
		}
		seen[s] = line
		serials = append(serials, s)
		if len(serials) > maxBulk {
			return nil, fmt.Errorf("%s lists more than %d serials; split it", path, maxBulk)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading -serials: %w", err)
	}
	if len(serials) == 0 {
		return nil, fmt.Errorf("%s lists no serial", path)
	}
	return serials, nil
}

func runProvision(ctx context.Context, e *env, cf *clientFlags, p *provisionFlags) error {
	serials, err := p.list()
	if err != nil {
		return err
	}
	// Check every destination before anything is provisioned.
	switch {
	case p.out != "" && p.outDir != "":
		return usagef("give -out or -out-dir, not both")
	case len(serials) > 1 && p.outDir == "":
		return fmt.Errorf("%d devices need -out-dir DIR (one <serial>.json each)", len(serials))
	case p.out != "":
		if err := checkFree(p.out, p.force); err != nil {
			return err
		}
	case p.outDir != "":
		if err := os.MkdirAll(p.outDir, 0o700); err != nil {
			return fmt.Errorf("creating -out-dir: %w", err)
		}
		for _, s := range serials {
			if err := checkFree(filepath.Join(p.outDir, s+".json"), p.force); err != nil {
				return err
			}
		}
	}

	op, err := cf.dial(ctx)
	if err != nil {
		return err
	}
	defer op.Close()
	files, perr := op.ProvisionTagged(ctx, serials, uint32(p.chainLength), p.tags.m)
	// Whatever was provisioned gets its file, even when a later request failed: a device
	// file is issued once.
	written, werr := writeDeviceFiles(e, p, files)
	if perr != nil {
		if len(files) > 0 {
			return fmt.Errorf("%w (%d devices were provisioned before that and their files written; the rest were not)", adminError(perr), written)
		}
		return adminError(perr)
	}
	if werr != nil {
		return werr
	}
	if p.outDir != "" || p.out != "" {
		where := p.out
		if p.outDir != "" {
			where = p.outDir
		}
		fmt.Fprintf(e.stderr, "provisioned %d devices (chain length %d); device files in %s\n", len(files), files[0].ChainLength, where)
	}
	return nil
}

// checkFree returns an error if path exists and force is not set.
func checkFree(path string, force bool) error {
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return err
	case fi.IsDir():
		return fmt.Errorf("%s is a directory", path)
	case !force:
		return fmt.Errorf("%s exists; move it away or pass -force to overwrite it", path)
	}
	return nil
}

func writeDeviceFiles(e *env, p *provisionFlags, files []protocol.DeviceFile) (int, error) {
	for i, f := range files {
		b, err := json.MarshalIndent(f, "", "  ")
		if err != nil {
			return i, err
		}
		b = append(b, '\n')
		switch {
		case p.outDir != "":
			err = writeSecret(filepath.Join(p.outDir, f.Serial+".json"), b, p.force)
		case p.out != "":
			err = writeSecret(p.out, b, p.force)
		default:
			_, err = e.stdout.Write(b)
		}
		if err != nil {
			return i, err
		}
	}
	return len(files), nil
}

// writeSecret writes a file readable by its owner only, refusing to replace an existing
// one unless force. It writes a temporary file and renames it, so a reader never sees half
// a device file.
func writeSecret(path string, b []byte, force bool) error {
	if err := checkFree(path, force); err != nil {
		return err
	}
	if force {
		return atomicfile.Write(path, b, 0o600)
	}
	// Not Write: a file that appeared meanwhile must not be replaced.
	return atomicfile.WriteNew(path, b, 0o600)
}
