package main

import (
	"context"
	"fmt"

	"github.com/peterbourgon/ff/v3/ffcli"

	"github.com/sealcast/sealcast/protocol"
)

func deprovisionCommand(e *env) *ffcli.Command {
	fs := newFlags("deprovision", e)
	var cf clientFlags
	cf.register(fs)
	return &ffcli.Command{
		Name:       "deprovision",
		ShortUsage: "sealcast deprovision SERIAL...",
		ShortHelp:  "forget devices",
		LongHelp: `Deprovisions devices (admin request device.deprovision): the embedded broker refuses
them from then on (an external broker needs their line removed from its password file,
docs/OPERATIONS.md 6.3), they leave the targets of the releases in progress, which can
then complete without them, their counters are forgotten, and their retained key,
receipt and status topics are cleared. Provisioning a serial again issues a new device
file (its epoch-0 unit data).

Every serial is tried; the command names those that failed and exits non-zero if any did.
` + clientHelp,
		FlagSet: fs,
		Exec: func(ctx context.Context, args []string) error {
			args, err := positional(fs, args)
			if err != nil {
				return err
			}
			if len(args) == 0 {
				return usagef("give the serials to deprovision")
			}
			op, err := cf.dial(ctx)
			if err != nil {
				return err
			}
			defer op.Close()
			var failed int
			for _, s := range args {
				if err := op.Do(ctx, protocol.CmdDeprovision, protocol.SerialArgs{Serial: s}, nil); err != nil {
					failed++
					fmt.Fprintf(e.stderr, "%s: %v\n", s, adminError(err))
					continue
				}
				fmt.Fprintf(e.stdout, "deprovisioned %s\n", s)
			}
			if failed > 0 {
				return fmt.Errorf("%d of %d devices were not deprovisioned", failed, len(args))
			}
			return nil
		},
	}
}
