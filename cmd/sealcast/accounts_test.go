package main

import (
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestAccounts: accounts are managed in the data directory with the CLI, and a running
// serve takes each change: a new admin password works and the old one no longer does, a
// monitor account reads status, a removed account is refused, and the last admin cannot
// be removed.
func TestAccounts(t *testing.T) {
	t.Parallel()
	s := startServe(t)
	data := []string{"-data", s.data}
	status := func(user, pw string) int {
		return runProc(t, []string{"SEALCAST_BROKER=" + s.url, "SEALCAST_USER=" + user, "SEALCAST_PASSWORD=" + pw}, "status").exitCode()
	}
	generated := regexp.MustCompile(`SEALCAST_PASSWORD='([^']+)'`)

	p := runProc(t, nil, append([]string{"accounts", "passwd", "admin"}, data...)...)
	m := generated.FindStringSubmatch(p.stdout.String())
	if p.exitCode() != 0 || m == nil {
		t.Fatalf("accounts passwd admin: exit %d\n%s%s", p.exitCode(), p.stdout, p.stderr)
	}
	newPW := m[1]
	eventually(t, "serve takes the new admin password", func() bool { return status("admin", newPW) == 0 })
	if code := status("admin", s.adminPW); code != exitConnect {
		t.Fatalf("the old admin password: exit %d, want %d", code, exitConnect)
	}

	p = startProcInput(t, nil, strings.NewReader("a-long-dashboard-password\n"), append([]string{"accounts", "add", "dash", "-role", "monitor", "-password-stdin"}, data...)...)
	p.wait(t, time.Minute)
	if p.exitCode() != 0 || generated.MatchString(p.stdout.String()) {
		t.Fatalf("accounts add -password-stdin: exit %d\n%s%s", p.exitCode(), p.stdout, p.stderr)
	}
	list := runProc(t, nil, append([]string{"accounts", "list"}, data...)...).stdout.String()
	if !regexp.MustCompile(`(?m)^admin\s+admin$`).MatchString(list) || !regexp.MustCompile(`(?m)^dash\s+monitor$`).MatchString(list) {
		t.Fatalf("accounts list:\n%s", list)
	}
	eventually(t, "the monitor account can log in", func() bool {
		return runProc(t, []string{"SEALCAST_BROKER=" + s.url, "SEALCAST_USER=dash", "SEALCAST_PASSWORD=a-long-dashboard-password"}, "watch", "-for", "100ms").exitCode() == 0
	})
	if code := runProc(t, nil, append([]string{"accounts", "add", "dash"}, data...)...).exitCode(); code != exitConflict {
		t.Fatalf("adding an existing account: exit %d, want %d", code, exitConflict)
	}
	if code := runProc(t, nil, append([]string{"accounts", "remove", "admin"}, data...)...).exitCode(); code != exitConflict {
		t.Fatalf("removing the last admin: exit %d, want %d", code, exitConflict)
	}
	if p := runProc(t, nil, append([]string{"accounts", "remove", "dash"}, data...)...); p.exitCode() != 0 || !strings.Contains(p.stdout.String(), "removed account dash") {
		t.Fatalf("accounts remove dash: exit %d\n%s%s", p.exitCode(), p.stdout, p.stderr)
	}
	eventually(t, "the removed account is refused", func() bool {
		return runProc(t, []string{"SEALCAST_BROKER=" + s.url, "SEALCAST_USER=dash", "SEALCAST_PASSWORD=a-long-dashboard-password"}, "watch", "-for", "100ms").exitCode() == exitConnect
	})
	if code := runProc(t, nil, "accounts", "list", "-data", t.TempDir()).exitCode(); code != exitNotFound {
		t.Fatalf("accounts list on a directory serve never used: exit %d, want %d", code, exitNotFound)
	}
}
