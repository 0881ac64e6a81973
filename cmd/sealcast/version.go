package main

import (
	"context"
	"fmt"
	"io"
	"runtime"
	"runtime/debug"

	"github.com/peterbourgon/ff/v3/ffcli"
)

func versionCommand(e *env) *ffcli.Command {
	fs := newFlags("version", e)
	return &ffcli.Command{
		Name:       "version",
		ShortUsage: "sealcast version",
		ShortHelp:  "print the version, the source revision and the Go version",
		FlagSet:    fs,
		Exec: func(_ context.Context, args []string) error {
			if len(args) > 0 {
				return usagef("version takes no arguments (got %q)", args)
			}
			printVersion(e.stdout)
			return nil
		},
	}
}

// buildVersion returns the module version, the VCS revision (with "+dirty" for a build
// from modified sources) and the Go version this binary was built with.
func buildVersion() (version, revision, goVersion string) {
	version, revision, goVersion = "(devel)", "unknown", runtime.Version()
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return version, revision, goVersion
	}
	if bi.Main.Version != "" {
		version = bi.Main.Version
	}
	dirty := false
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			revision = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if dirty {
		revision += "+dirty"
	}
	return version, revision, bi.GoVersion
}

func printVersion(w io.Writer) {
	v, rev, gov := buildVersion()
	fmt.Fprintf(w, "sealcast %s (revision %s, %s)\n", v, rev, gov)
}
