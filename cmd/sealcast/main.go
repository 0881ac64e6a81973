// Command sealcast runs and operates a Sealcast update service: encrypted software updates
// for IoT fleets over MQTT. Run "sealcast help" or "sealcast <command> -h".
//
// Every flag has an environment twin: -redis is SEALCAST_REDIS, -log-level is
// SEALCAST_LOG_LEVEL, and so on.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"
	_ "time/tzdata" // release windows name time zones; the distroless image has no zoneinfo

	"github.com/mattn/go-isatty"
	"github.com/peterbourgon/ff/v3"
	"github.com/peterbourgon/ff/v3/ffcli"
	"github.com/rs/zerolog"
	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		// One line, always: scripts grep for it and people read the last line.
		fmt.Fprintln(os.Stderr, "sealcast:", strings.Join(strings.Fields(err.Error()), " "))
		os.Exit(exitStatus(err))
	}
}

// Exit statuses, the same for every command (sealcast help).
const (
	exitError    = 1 // anything below does not say
	exitUsage    = 2 // bad flags or arguments, or a request the service calls bad_request
	exitTimeout  = 3 // no reply in time, or release -wait-timeout passed
	exitNotFound = 4 // no such device, release or upload
	exitConflict = 5 // not possible in the current state, or a version not newer
	exitConnect  = 6 // cannot reach or log in to the broker, or the service is unavailable
)

// exitCodeError is an error with an exit status of its own.
type exitCodeError struct {
	error
	code int
}

func (e exitCodeError) Unwrap() error { return e.error }

// usagef is a usage error: bad flags or arguments (exit status 2).
func usagef(format string, args ...any) error {
	return exitCodeError{fmt.Errorf(format, args...), exitUsage}
}

// exitStatus is the exit status err calls for.
func exitStatus(err error) int {
	var ec exitCodeError
	if errors.As(err, &ec) {
		return ec.code
	}
	var pe *protocol.Error
	if errors.As(err, &pe) {
		switch pe.Code {
		case protocol.ErrBadRequest, protocol.ErrUnknownCommand, protocol.ErrTooLarge:
			return exitUsage
		case protocol.ErrNotFound:
			return exitNotFound
		case protocol.ErrConflict, protocol.ErrVersionNotNewer:
			return exitConflict
		case protocol.ErrUnavailable:
			return exitConnect
		case protocol.ErrTimeoutWaiting:
			return exitTimeout
		}
	}
	if errors.Is(err, operator.ErrNoReply) {
		return exitTimeout
	}
	return exitError
}

// env is what every command gets: where to print, and the logger.
type env struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	logLevel       *string
	logFormat      *string
	// usage collects what the flag package prints (help, and usage after a bad flag):
	// run shows it for -h and drops it after a bad flag, whose error is one line.
	usage bytes.Buffer
}

func (e *env) logger() zerolog.Logger {
	lvl, err := zerolog.ParseLevel(strings.ToLower(*e.logLevel))
	if err != nil || *e.logLevel == "" {
		lvl = zerolog.InfoLevel
	}
	var w io.Writer = e.stderr
	f, ok := e.stderr.(*os.File)
	tty := ok && isatty.IsTerminal(f.Fd())
	if *e.logFormat == "console" || *e.logFormat != "json" && tty {
		// Humans get readable lines; everything else gets JSON.
		w = zerolog.ConsoleWriter{Out: e.stderr, TimeFormat: time.TimeOnly, NoColor: !tty}
	}
	return zerolog.New(w).Level(lvl).With().Timestamp().Logger()
}

// newFlags returns a flag set that also reads SEALCAST_* environment variables.
func newFlags(name string, e *env) *flag.FlagSet {
	fs := flag.NewFlagSet("sealcast "+name, flag.ContinueOnError)
	fs.SetOutput(&e.usage)
	fs.StringVar(e.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.Func("log-format", "log format: json (one object a line), console (readable lines), or auto (the default): console on a terminal, else json", func(s string) error {
		switch s {
		case "auto", "json", "console":
			*e.logFormat = s
			return nil
		}
		return fmt.Errorf("give json, console or auto")
	})
	return fs
}

var ffOptions = []ff.Option{ff.WithEnvVarPrefix("SEALCAST")}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	logFormat := "auto"
	e := &env{stdin: os.Stdin, stdout: stdout, stderr: stderr, logLevel: new(string), logFormat: &logFormat}
	rootFlags := flag.NewFlagSet("sealcast", flag.ContinueOnError)
	showVersion := rootFlags.Bool("version", false, "print the version and exit")
	root := &ffcli.Command{
		Name:       "sealcast",
		ShortUsage: "sealcast <command> [flags]",
		ShortHelp:  "encrypted software updates for IoT fleets over MQTT",
		LongHelp: strings.TrimSpace(`
Sealcast encrypts a release once, wraps its key for every device under that device's
own one-time key, and moves each device's sequence counter only when the device proves
it installed the release. Everything travels over MQTT.

Start here:
  sealcast demo                  everything in one process, on loopback, with 20 devices
  sealcast serve                 the service: embedded broker, embedded store
  sealcast provision -count 10 -prefix sensor- -out-dir devices
                                 register devices and write their device files
  sealcast release -image fw.bin -version 2 -all -wait
  sealcast status                the fleet and its releases
  sealcast watch                 live progress, from the status topics

Every flag has an environment twin: -redis is SEALCAST_REDIS, and so on.
"sealcast help COMMAND" (or "sealcast COMMAND -h") explains a command.

Exit status: 0 success; 1 an error not listed here; 2 bad flags or arguments (also a
request the service refuses as bad_request); 3 no reply in time, or release
-wait-timeout passed; 4 not found; 5 conflict: not possible in the current state, or a
version not newer; 6 the broker cannot be reached or refused the login, or the service
is unavailable.`),
		FlagSet: rootFlags,
		Subcommands: []*ffcli.Command{
			serveCommand(e), demoCommand(e),
			provisionCommand(e), deprovisionCommand(e), tagCommand(e), releaseCommand(e), statusCommand(e), devicesCommand(e), watchCommand(e),
			controlCommand(e, "pause"), controlCommand(e, "resume"), controlCommand(e, "cancel"), controlCommand(e, "retire"), controlCommand(e, "approve"),
			deviceCommand(e), keysCommand(e), accountsCommand(e), simulateCommand(e), healthcheckCommand(e), versionCommand(e),
		},
	}
	root.Exec = func(_ context.Context, args []string) error {
		switch {
		case *showVersion:
			printVersion(stdout)
			return nil
		case len(args) == 0:
			return flag.ErrHelp
		case args[0] != "help":
			return usagef("unknown command %q; run \"sealcast help\" for the list", args[0])
		case len(args) == 1:
			return flag.ErrHelp
		}
		// help CMD [SUB]: that command's help.
		cmd := root
		for _, name := range args[1:] {
			var next *ffcli.Command
			for _, c := range cmd.Subcommands {
				if c.Name == name {
					next = c
				}
			}
			if next == nil {
				return usagef("no command %q; run \"sealcast help\" for the list", strings.Join(args[1:], " "))
			}
			cmd = next
		}
		fmt.Fprintln(stdout, ffcli.DefaultUsageFunc(cmd))
		return nil
	}
	root.FlagSet.SetOutput(&e.usage)
	for _, c := range root.Subcommands {
		c.Options = ffOptions
		if c.Name == "serve" {
			c.Options = append(slices.Clone(ffOptions), ff.WithConfigFileFlag("config"), ff.WithConfigFileParser(ff.PlainParser))
		}
		for _, sub := range c.Subcommands {
			sub.Options = ffOptions
		}
	}
	err := root.ParseAndRun(ctx, args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		// Asked for: help goes to standard output, and is no error.
		e.usage.WriteTo(stdout)
		return nil
	case err == nil:
		return nil
	}
	if msg, ok := strings.CutPrefix(fmt.Sprint(err), "error parsing commandline arguments: "); ok {
		err = usagef("%s; run with -h for help", msg)
	}
	return err
}

const warnLevel = zerolog.WarnLevel
