package main

import (
	"context"
	"encoding/hex"
	"fmt"

	"github.com/peterbourgon/ff/v3/ffcli"

	"github.com/sealcast/sealcast/protocol"
)

// keysCommand is "sealcast keys rotate": a new release-signing key (PROTOCOL.md 5.1).
func keysCommand(e *env) *ffcli.Command {
	fs := newFlags("keys rotate", e)
	var cf clientFlags
	cf.register(fs)
	asJSON := fs.Bool("json", false, "print the result as JSON")
	rotate := &ffcli.Command{
		Name:       "rotate",
		ShortUsage: "sealcast keys rotate",
		ShortHelp:  "make a new release-signing key",
		LongHelp: `Makes a new release-signing key on the service, which keeps it in its data directory
(keys/) and publishes a key statement, signed by the current key, on sealcast/keys/N.
Devices follow the statements, and from then on refuse manifests signed by an older key:
use it when a release key may have leaked, or on a schedule. Later releases are signed
with the new key, and devices provisioned from now on start with it.

The service refuses (conflict) while a release is publishing, active or paused: devices
that learn the new key would refuse that release's manifest. Cancel it, or let it
complete, first. Back up the data directory afterwards: its keys/ are new.
` + clientHelp,
		FlagSet: fs,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return usagef("keys rotate takes no arguments (got %q)", args)
			}
			op, err := cf.dial(ctx)
			if err != nil {
				return err
			}
			defer op.Close()
			var res protocol.KeyRotateResult
			if err := op.Do(ctx, protocol.CmdKeysRotate, nil, &res); err != nil {
				return adminError(err)
			}
			if *asJSON {
				return printJSON(e.stdout, res)
			}
			fmt.Fprintf(e.stdout, "release key %d: %s (statement on %s)\n", res.Seq, hex.EncodeToString(res.PublicKey), res.Topic)
			return nil
		},
	}
	return &ffcli.Command{
		Name:        "keys",
		ShortUsage:  "sealcast keys rotate",
		ShortHelp:   "manage the release-signing keys",
		FlagSet:     newFlags("keys", e),
		Subcommands: []*ffcli.Command{rotate},
		Exec: func(context.Context, []string) error {
			return usagef("give a subcommand: sealcast keys rotate")
		},
	}
}
