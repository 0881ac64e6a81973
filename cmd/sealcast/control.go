package main

import (
	"context"
	"fmt"

	"github.com/peterbourgon/ff/v3/ffcli"

	"github.com/sealcast/sealcast/protocol"
)

// controlCommand is pause, resume, cancel, retire or approve: one admin request on one
// release.
func controlCommand(e *env, verb string) *ffcli.Command {
	fs := newFlags(verb, e)
	var cf clientFlags
	cf.register(fs)
	asJSON := fs.Bool("json", false, "print the release's new status as JSON")
	cmd, help := map[string]string{
		"pause":   protocol.CmdReleasePause,
		"resume":  protocol.CmdReleaseResume,
		"cancel":  protocol.CmdReleaseCancel,
		"retire":  protocol.CmdReleaseRetire,
		"approve": protocol.CmdReleaseApprove,
	}[verb], map[string]string{
		"pause": `Pauses an active release: no more keys are wrapped for devices not yet wrapped. Keys
already published stay, so devices that have one may still install.`,
		"resume": `Resumes a paused release: wrapping goes on where it stopped.`,
		"cancel": `Cancels an active or paused release: the key topics of its targets that have not
installed it are cleared, and they are offered whatever else is pending. Devices that
installed it keep it. A cancelled release's version may be released again.`,
		"retire": `Retires a completed or cancelled release: its version no longer bounds the
versions of later releases (a release created with a mistyped version, cancel it first
if it is active). Devices keep their own floor: a device that installed the retired
release refuses any lower version.`,
		"approve": `Approves the next wave of a release created with -waves and -approve: it opens once
the open waves have settled (and soaked, with -soak).`,
	}[verb]
	return &ffcli.Command{
		Name:       verb,
		ShortUsage: "sealcast " + verb + " RELEASE",
		ShortHelp:  verb + " a release",
		LongHelp: help + `

RELEASE is a release id, or a prefix of one that names a single release (sealcast status
lists them). A release not in a state that allows this exits non-zero with code conflict.
` + clientHelp,
		FlagSet: fs,
		Exec: func(ctx context.Context, args []string) error {
			args, err := positional(fs, args)
			if err != nil {
				return err
			}
			if len(args) != 1 {
				return usagef("%s takes one release id (got %d arguments)", verb, len(args))
			}
			op, err := cf.dial(ctx)
			if err != nil {
				return err
			}
			defer op.Close()
			id, err := resolveRelease(ctx, op, args[0])
			if err != nil {
				return err
			}
			var st protocol.ReleaseStatus
			if err := op.Do(ctx, cmd, protocol.ReleaseArgs{Release: id}, &st); err != nil {
				return adminError(err)
			}
			if *asJSON {
				return printJSON(e.stdout, st)
			}
			fmt.Fprintln(e.stdout, statusLine(st))
			return nil
		},
	}
}
