package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/peterbourgon/ff/v3/ffcli"

	"github.com/sealcast/sealcast/broker"
)

// accountsCommand manages the embedded broker's accounts in the data directory, as
// mosquitto_passwd does: whoever can write the data directory is the authority. A
// running serve picks the change up within a second.
func accountsCommand(e *env) *ffcli.Command {
	sub := func(name, usage, short, long string, run func(dir string, args []string, pw passwordFlags) error) *ffcli.Command {
		fs := newFlags("accounts "+name, e)
		dir := fs.String("data", defaultDataDir(), "serve's data directory (its -data)")
		var pw passwordFlags
		if name == "add" || name == "passwd" {
			pw.register(fs)
		}
		return &ffcli.Command{
			Name: name, ShortUsage: "sealcast accounts " + usage, ShortHelp: short, LongHelp: long, FlagSet: fs,
			Exec: func(_ context.Context, args []string) error {
				args, err := positional(fs, args)
				if err != nil {
					return err
				}
				return run(*dir, args, pw)
			},
		}
	}
	return &ffcli.Command{
		Name:       "accounts",
		ShortUsage: "sealcast accounts list|add|passwd|remove [flags]",
		ShortHelp:  "manage the broker's accounts (operators and dashboards) in the data directory",
		LongHelp: `Manages the accounts of serve's embedded broker, kept in DATA/accounts.json (bcrypt
hashes): admin accounts can do everything, monitor accounts only read status topics
(PROTOCOL.md 9.2). Whoever can write the data directory decides, as with
mosquitto_passwd; a running serve takes the change within a second.

  sealcast accounts list
  sealcast accounts passwd admin            a new admin password, generated and printed
  sealcast accounts add dashboard -role monitor
  sealcast accounts remove dashboard

A password is generated and printed once unless -password-stdin gives one (one line on
standard input, so that it appears in no process list).`,
		FlagSet: newFlags("accounts", e),
		Subcommands: []*ffcli.Command{
			sub("list", "list [-data DIR]", "list the accounts", "Lists the accounts: name and role.", func(dir string, args []string, _ passwordFlags) error {
				if len(args) > 0 {
					return usagef("accounts list takes no arguments (got %q)", args)
				}
				accounts, err := loadAccounts(dir)
				if err != nil {
					return err
				}
				w := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(w, "ACCOUNT\tROLE")
				for _, a := range accounts {
					fmt.Fprintf(w, "%s\t%s\n", a.Username, a.Role)
				}
				return w.Flush()
			}),
			sub("add", "add NAME [-role admin|monitor] [-password-stdin] [-data DIR]", "add an account", "Adds an account; its password is generated and printed unless -password-stdin gives one.", func(dir string, args []string, pw passwordFlags) error {
				if len(args) != 1 {
					return usagef("accounts add takes one account name (got %d arguments)", len(args))
				}
				accounts, err := loadAccounts(dir)
				if err != nil {
					return err
				}
				if slices.ContainsFunc(accounts, func(a broker.Account) bool { return a.Username == args[0] }) {
					return exitCodeError{fmt.Errorf("account %q exists; change its password with: sealcast accounts passwd %s", args[0], args[0]), exitConflict}
				}
				a, secret, err := pw.account(args[0], broker.Role(*pw.role), e)
				if err != nil {
					return err
				}
				if err := broker.SaveAccounts(accountsPath(dir), append(accounts, a)); err != nil {
					return err
				}
				return pw.report(e, a, secret, "added")
			}),
			sub("passwd", "passwd NAME [-password-stdin] [-data DIR]", "set an account's password", "Sets an account's password; a new one is generated and printed unless -password-stdin gives one.", func(dir string, args []string, pw passwordFlags) error {
				if len(args) != 1 {
					return usagef("accounts passwd takes one account name (got %d arguments)", len(args))
				}
				accounts, err := loadAccounts(dir)
				if err != nil {
					return err
				}
				i := slices.IndexFunc(accounts, func(a broker.Account) bool { return a.Username == args[0] })
				if i < 0 {
					return exitCodeError{fmt.Errorf("no account %q in %s (sealcast accounts list names them)", args[0], accountsPath(dir)), exitNotFound}
				}
				a, secret, err := pw.account(args[0], accounts[i].Role, e)
				if err != nil {
					return err
				}
				accounts[i] = a
				if err := broker.SaveAccounts(accountsPath(dir), accounts); err != nil {
					return err
				}
				return pw.report(e, a, secret, "changed the password of")
			}),
			sub("remove", "remove NAME [-data DIR]", "remove an account", "Removes an account. The last admin account cannot be removed.", func(dir string, args []string, _ passwordFlags) error {
				if len(args) != 1 {
					return usagef("accounts remove takes one account name (got %d arguments)", len(args))
				}
				accounts, err := loadAccounts(dir)
				if err != nil {
					return err
				}
				i := slices.IndexFunc(accounts, func(a broker.Account) bool { return a.Username == args[0] })
				if i < 0 {
					return exitCodeError{fmt.Errorf("no account %q in %s", args[0], accountsPath(dir)), exitNotFound}
				}
				rest := slices.Delete(slices.Clone(accounts), i, i+1)
				if accounts[i].Role == broker.RoleAdmin && !slices.ContainsFunc(rest, func(a broker.Account) bool { return a.Role == broker.RoleAdmin }) {
					return exitCodeError{fmt.Errorf("%q is the last admin account; add another admin first", args[0]), exitConflict}
				}
				if err := broker.SaveAccounts(accountsPath(dir), rest); err != nil {
					return err
				}
				fmt.Fprintf(e.stdout, "removed account %s\n", args[0])
				return nil
			}),
		},
		Exec: func(context.Context, []string) error { return flag.ErrHelp },
	}
}

func accountsPath(dir string) string { return filepath.Join(dir, broker.AccountsFile) }

// loadAccounts reads the accounts file of the data directory dir, with an error that
// says what to do when there is none.
func loadAccounts(dir string) ([]broker.Account, error) {
	accounts, err := broker.LoadAccounts(accountsPath(dir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, exitCodeError{fmt.Errorf("no accounts file in %s: is it serve's data directory (give -data), and has serve started once there?", dir), exitNotFound}
	}
	return accounts, err
}

// passwordFlags choose a new account's role and where its password comes from.
type passwordFlags struct {
	role    *string
	fromStd *bool
}

func (p *passwordFlags) register(fs *flag.FlagSet) {
	p.role = fs.String("role", "admin", "with add: admin (everything) or monitor (read status only)")
	p.fromStd = fs.Bool("password-stdin", false, "read the password from the first line of standard input instead of generating one")
}

// account makes the account name with role and a password: read from standard input, or
// generated (then returned, to be printed once).
func (p *passwordFlags) account(name string, role broker.Role, e *env) (broker.Account, string, error) {
	if role != broker.RoleAdmin && role != broker.RoleMonitor {
		return broker.Account{}, "", usagef("-role %q: give admin or monitor", role)
	}
	var pw, generated string
	if *p.fromStd {
		line, err := bufio.NewReader(e.stdin).ReadString('\n')
		pw = strings.TrimRight(line, "\r\n")
		if pw == "" {
			return broker.Account{}, "", usagef("-password-stdin: no password on standard input (%v)", err)
		}
		if len(pw) < 12 {
			return broker.Account{}, "", usagef("-password-stdin: the password is shorter than 12 characters")
		}
	} else {
		var err error
		if pw, err = broker.GeneratePassword(); err != nil {
			return broker.Account{}, "", err
		}
		generated = pw
	}
	a, err := broker.NewAccount(name, role, pw)
	if err != nil {
		return broker.Account{}, "", usagef("%v", err)
	}
	return a, generated, nil
}

// report says what was done, with a generated password shown once.
func (p *passwordFlags) report(e *env, a broker.Account, generated, did string) error {
	fmt.Fprintf(e.stdout, "%s account %s (%s)\n", did, a.Username, a.Role)
	if generated != "" {
		fmt.Fprintf(e.stdout, "\nIts password is shown only this once:\n\n    export SEALCAST_USER=%s SEALCAST_PASSWORD='%s'\n\n", a.Username, generated)
	}
	return nil
}
