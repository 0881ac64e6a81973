package broker

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"golang.org/x/crypto/bcrypt"

	"github.com/sealcast/sealcast/internal/atomicfile"
	"github.com/sealcast/sealcast/keychain"
)

// Role is what an authenticated client may do (PROTOCOL.md 9, [SC-9.2]).
type Role string

// Roles. Accounts hold one of the first three; RoleDevice is given to clients that
// authenticate as a device.
const (
	RoleAdmin   Role = "admin"   // operators: publish sealcast/admin/#, subscribe to everything
	RoleMonitor Role = "monitor" // dashboards: read status, device state and presence
	RoleUpdater Role = "updater" // the updater process: everything under sealcast/
	RoleDevice  Role = "device"  // a device: username = client id = serial

	roleHealth Role = "health" // the broker's own health probe (Check): no rights at all
)

// AccountsFile is the name of the accounts file in the broker's data directory.
const AccountsFile = "accounts.json"

// ErrBadAccount is returned for an account with a malformed username, role or hash.
var ErrBadAccount = errors.New("broker: invalid account")

// Account is a non-device MQTT user. Account usernames take precedence over serials: a
// device whose serial equals an account name cannot connect.
type Account struct {
	Username string `json:"username"`
	Role     Role   `json:"role"`
	// PasswordHash is a bcrypt hash (golang.org/x/crypto/bcrypt) of the password.
	PasswordHash string `json:"password_hash"`
}

// NewAccount returns an account whose password hash is computed at bcrypt.DefaultCost.
func NewAccount(username string, role Role, password string) (Account, error) {
	return newAccount(username, role, password, bcrypt.DefaultCost)
}

func newAccount(username string, role Role, password string, cost int) (Account, error) {
	if password == "" {
		return Account{}, fmt.Errorf("%w: account %q needs a non-empty password", ErrBadAccount, username)
	}
	h, err := bcrypt.GenerateFromPassword([]byte(password), cost)
	if err != nil {
		return Account{}, fmt.Errorf("broker: hashing password of account %q: %w", username, err)
	}
	a := Account{Username: username, Role: role, PasswordHash: string(h)}
	return a, a.validate()
}

func (a Account) validate() error {
	if !keychain.ValidSerial(a.Username) {
		return fmt.Errorf("%w: username %q: use 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit", ErrBadAccount, a.Username)
	}
	switch a.Role {
	case RoleAdmin, RoleMonitor, RoleUpdater:
	default:
		return fmt.Errorf("%w: account %q has role %q; use admin, monitor or updater", ErrBadAccount, a.Username, a.Role)
	}
	if _, err := bcrypt.Cost([]byte(a.PasswordHash)); err != nil {
		return fmt.Errorf("%w: account %q has no valid bcrypt password hash", ErrBadAccount, a.Username)
	}
	return nil
}

// checkPassword reports whether password matches; bcrypt compares in constant time.
func (a Account) checkPassword(password []byte) bool {
	return bcrypt.CompareHashAndPassword([]byte(a.PasswordHash), password) == nil
}

// GeneratePassword returns a random password with 192 bits of entropy, for accounts
// created by a program (the first admin, the embedded updater).
func GeneratePassword() (string, error) {
	var b [24]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("broker: reading random password: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b[:]), nil
}

type accountsDoc struct {
	Accounts []Account `json:"accounts"`
}

// LoadAccounts reads an accounts file. A missing file returns an error wrapping
// fs.ErrNotExist, so that a caller can tell a first start (errors.Is(err, fs.ErrNotExist)).
func LoadAccounts(path string) ([]Account, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("broker: reading accounts: %w", err)
	}
	var doc accountsDoc
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("broker: accounts file %s is not valid JSON (fix or remove it): %w", path, err)
	}
	seen := make(map[string]bool, len(doc.Accounts))
	for _, a := range doc.Accounts {
		if err := a.validate(); err != nil {
			return nil, fmt.Errorf("broker: accounts file %s: %w", path, err)
		}
		if seen[a.Username] {
			return nil, fmt.Errorf("%w: accounts file %s lists %q twice", ErrBadAccount, path, a.Username)
		}
		seen[a.Username] = true
	}
	return doc.Accounts, nil
}

// SaveAccounts writes accounts to path atomically (temporary file and rename), readable
// only by the owner: the hashes are offline-guessable.
func SaveAccounts(path string, accounts []Account) error {
	for _, a := range accounts {
		if err := a.validate(); err != nil {
			return err
		}
	}
	b, err := json.MarshalIndent(accountsDoc{Accounts: accounts}, "", "  ")
	if err != nil {
		return fmt.Errorf("broker: encoding accounts: %w", err)
	}
	if err := atomicfile.Write(path, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("broker: saving accounts: %w", err)
	}
	return nil
}

// AddAccountToFile adds a to the accounts file at path, replacing an account of the same
// username, and creates the file if it does not exist.
func AddAccountToFile(path string, a Account) error {
	if err := a.validate(); err != nil {
		return err
	}
	accounts, err := LoadAccounts(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	replaced := false
	for i := range accounts {
		if accounts[i].Username == a.Username {
			accounts[i], replaced = a, true
		}
	}
	if !replaced {
		accounts = append(accounts, a)
	}
	return SaveAccounts(path, accounts)
}
