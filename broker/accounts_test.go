package broker_test

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/internal/testkit/brokertest"
)

func TestAccountsFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), broker.AccountsFile)
	if _, err := broker.LoadAccounts(path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("missing file: %v, want fs.ErrNotExist", err)
	}
	admin, err := broker.NewAccount("admin", broker.RoleAdmin, "s3cret")
	if err != nil {
		t.Fatal(err)
	}
	if err := broker.AddAccountToFile(path, admin); err != nil {
		t.Fatal(err)
	}
	mon, _ := broker.NewAccount("monitor", broker.RoleMonitor, "m0n")
	if err := broker.AddAccountToFile(path, mon); err != nil {
		t.Fatal(err)
	}
	got, err := broker.LoadAccounts(path)
	if err != nil || len(got) != 2 || got[0] != admin || got[1] != mon {
		t.Fatalf("LoadAccounts = %v, %v", got, err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("accounts file mode %v, want 0600", fi.Mode().Perm())
	}
	b, _ := os.ReadFile(path)
	if bytes.Contains(b, []byte("s3cret")) {
		t.Fatal("accounts file holds a plaintext password")
	}
	for _, bad := range []broker.Account{
		{Username: "x", Role: "root", PasswordHash: admin.PasswordHash},
		{Username: "bad name", Role: broker.RoleAdmin, PasswordHash: admin.PasswordHash},
		{Username: "x", Role: broker.RoleAdmin, PasswordHash: "plain"},
	} {
		if err := broker.AddAccountToFile(path, bad); !errors.Is(err, broker.ErrBadAccount) {
			t.Errorf("AddAccountToFile(%+v) = %v, want ErrBadAccount", bad, err)
		}
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestAuthFailureLogsNoSecret: refusals are logged with the reason, never the password.
func TestAuthFailureLogsNoSecret(t *testing.T) {
	var logs syncBuffer
	env := brokertest.Start(t, brokertest.WithOptions(func(o *broker.Options) {
		o.Logger = zerolog.New(&logs)
	}))
	const wrong = "not-the-password-4f1c"
	c, code := connectRaw(t, env.Addr, "dev-a", "dev-a", wrong, true)
	c.Close()
	if code != connBadUserOrPwd {
		t.Fatalf("CONNACK %#x", code)
	}
	c, _ = connectRaw(t, env.Addr, "x", env.Admin.Username, wrong, true)
	c.Close()
	env.Broker.Close()
	out := logs.String()
	if strings.Contains(out, wrong) {
		t.Fatalf("a password reached the log:\n%s", out)
	}
	if !strings.Contains(out, "wrong device password") || !strings.Contains(out, "wrong account password") {
		t.Fatalf("refusals not logged:\n%s", out)
	}
}
