package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/peterbourgon/ff/v3/ffcli"

	"github.com/sealcast/sealcast/protocol"
)

// tagFlag collects key=value tags from a repeated flag.
type tagFlag struct{ m map[string]string }

func (f *tagFlag) String() string { return protocol.FormatTags(f.m) }

func (f *tagFlag) Set(s string) error {
	tags, err := protocol.ParseTags(s)
	if err != nil {
		return err
	}
	if f.m == nil {
		f.m = map[string]string{}
	}
	for k, v := range tags {
		if _, dup := f.m[k]; dup {
			return fmt.Errorf("tag %s given twice", k)
		}
		f.m[k] = v
	}
	return nil
}

// listFlag collects the values of a repeated flag.
type listFlag []string

func (f *listFlag) String() string     { return strings.Join(*f, ",") }
func (f *listFlag) Set(s string) error { *f = append(*f, s); return nil }

func tagCommand(e *env) *ffcli.Command {
	fs := newFlags("tag", e)
	var cf clientFlags
	cf.register(fs)
	var untag listFlag
	fs.Var(&untag, "untag", "remove the tag with this key (repeat for more)")
	return &ffcli.Command{
		Name:       "tag",
		ShortUsage: "sealcast tag SERIAL [key=value...] [-untag key...]",
		ShortHelp:  "set or remove a device's tags",
		LongHelp: `Sets tags on a device and removes others (admin request device.tag), then prints its
tags. Tags are key=value labels that releases select devices by (release -select,
PROTOCOL.md 12.4): keys of a-z 0-9 . _ -, values of A-Z a-z 0-9 . _ - : /, at most 16 a
device. A device that now matches a release in progress that follows its selection
(release -follow) joins it; removing a tag takes a device out of no release.
` + clientHelp,
		FlagSet: fs,
		Exec: func(ctx context.Context, args []string) error {
			args, err := positional(fs, args)
			if err != nil {
				return err
			}
			if len(args) == 0 {
				return usagef("give a serial, then the tags to set as key=value")
			}
			a := protocol.TagArgs{Serial: args[0], Unset: untag}
			var set tagFlag
			for _, kv := range args[1:] {
				if err := set.Set(kv); err != nil {
					return err
				}
			}
			a.Set = set.m
			if len(a.Set) == 0 && len(a.Unset) == 0 {
				return usagef("give tags to set as key=value, or -untag key")
			}
			op, err := cf.dial(ctx)
			if err != nil {
				return err
			}
			defer op.Close()
			var st protocol.DeviceStatus
			if err := op.Do(ctx, protocol.CmdDeviceTag, a, &st); err != nil {
				return adminError(err)
			}
			fmt.Fprintf(e.stdout, "%s %s\n", st.Serial, protocol.FormatTags(st.Tags))
			return nil
		},
	}
}
