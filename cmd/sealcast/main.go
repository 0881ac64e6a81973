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
	"strings"
	"syscall"
	"time"
	_ "time/tzdata" // release windows name time zones; the distroless image has no zoneinfo

	"github.com/mattn/go-isatty"
	"github.com/peterbourgon/ff/v3"
	"github.com/peterbourgon/ff/v3/ffcli"
	"github.com/rs/zerolog"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	var ec exitCodeError
	switch {
	case err == nil:
	case errors.Is(err, flag.ErrHelp):
		os.Exit(2)
	default:
		// One line, always: scripts grep for it and people read the last line.
		fmt.Fprintln(os.Stderr, "sealcast:", strings.Join(strings.Fields(err.Error()), " "))
		if errors.As(err, &ec) {
			os.Exit(ec.code)
		}
		os.Exit(1)
	}
}

// exitCodeError is an error with an exit status of its own (documented by its command).
type exitCodeError struct {
	error
	code int
}

func (e exitCodeError) Unwrap() error { return e.error }

// exitTimeout is the exit status of release -wait when -wait-timeout passes first.
const exitTimeout = 3

// env is what every command gets: where to print, and the logger.
type env struct {
	stdout, stderr io.Writer
	logLevel       *string
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
	if f, ok := e.stderr.(*os.File); ok && isatty.IsTerminal(f.Fd()) {
		// Humans get readable lines; everything else gets JSON.
		w = zerolog.ConsoleWriter{Out: f, TimeFormat: time.TimeOnly}
	}
	return zerolog.New(w).Level(lvl).With().Timestamp().Logger()
}

// newFlags returns a flag set that also reads SEALCAST_* environment variables.
func newFlags(name string, e *env) *flag.FlagSet {
	fs := flag.NewFlagSet("sealcast "+name, flag.ContinueOnError)
	fs.SetOutput(&e.usage)
	fs.StringVar(e.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	return fs
}

var ffOptions = []ff.Option{ff.WithEnvVarPrefix("SEALCAST")}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	e := &env{stdout: stdout, stderr: stderr, logLevel: new(string)}
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

Every flag has an environment twin: -redis is SEALCAST_REDIS, and so on.`),
		FlagSet: flag.NewFlagSet("sealcast", flag.ContinueOnError),
		Subcommands: []*ffcli.Command{
			serveCommand(e), demoCommand(e),
			provisionCommand(e), deprovisionCommand(e), tagCommand(e), releaseCommand(e), statusCommand(e), devicesCommand(e), watchCommand(e),
			controlCommand(e, "pause"), controlCommand(e, "resume"), controlCommand(e, "cancel"), controlCommand(e, "retire"), controlCommand(e, "approve"),
			deviceCommand(e), keysCommand(e), simulateCommand(e), healthcheckCommand(e),
		},
		Exec: func(_ context.Context, args []string) error {
			if len(args) > 0 && args[0] != "help" {
				return fmt.Errorf("unknown command %q; run \"sealcast help\" for the list", args[0])
			}
			return flag.ErrHelp
		},
	}
	root.FlagSet.SetOutput(&e.usage)
	for _, c := range root.Subcommands {
		c.Options = ffOptions
	}
	err := root.ParseAndRun(ctx, args)
	if errors.Is(err, flag.ErrHelp) {
		e.usage.WriteTo(stderr)
	} else if msg, ok := strings.CutPrefix(fmt.Sprint(err), "error parsing commandline arguments: "); ok {
		err = fmt.Errorf("%s; run with -h for help", msg)
	}
	return err
}

const warnLevel = zerolog.WarnLevel
