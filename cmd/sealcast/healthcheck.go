package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"
)

// healthcheckCommand asks a serve's /healthz, for container health checks: the image has
// no shell and no HTTP client of its own.
func healthcheckCommand(e *env) *ffcli.Command {
	fs := newFlags("healthcheck", e)
	url := fs.String("url", "http://127.0.0.1:"+defaultHTTPPort+"/healthz", "the /healthz address of sealcast serve (its -http listener)")
	timeout := fs.Duration("timeout", 3*time.Second, "give up after this long")
	return &ffcli.Command{
		Name:       "healthcheck",
		ShortUsage: "sealcast healthcheck [-url http://127.0.0.1:" + defaultHTTPPort + "/healthz]",
		ShortHelp:  "exit 0 if sealcast serve is healthy, 1 if not (for container health checks)",
		LongHelp: `Asks sealcast serve's /healthz and exits 0 when it answers "ok": the updater is
running (it answers admin requests) and the store answers. Otherwise it prints why and
exits 1. Meant for HEALTHCHECK in the container image and docker-compose's healthcheck.`,
		FlagSet: fs,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return usagef("healthcheck takes no arguments (got %q)", args)
			}
			ctx, cancel := context.WithTimeout(ctx, *timeout)
			defer cancel()
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, *url, nil)
			if err != nil {
				return fmt.Errorf("-url: %w", err)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				return fmt.Errorf("not healthy: %w", err)
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			msg := strings.TrimSpace(string(body))
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("not healthy: %s: %s", resp.Status, msg)
			}
			fmt.Fprintln(e.stdout, msg)
			return nil
		},
	}
}
