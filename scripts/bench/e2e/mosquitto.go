package main

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/sealcast/sealcast/protocol"
)

// mosquittoConf writes a configuration for a loopback-only Mosquitto whose access rules
// mirror the embedded broker's ([SC-9.2], broker/acl.go): devices log in as their serial
// with the password from their device file and may read release topics and their own key
// and receipt, and write their own ack, state and presence.
func mosquittoConf(dir string, port int) (conf string, err error) {
	acl := `# The updater and the operator.
user ` + updaterUser + `
topic readwrite sealcast/#
user admin
topic read #
topic read $SYS/#
topic write sealcast/admin/#

# Every device (%u is the username, which is the serial).
pattern read sealcast/releases/#
pattern read sealcast/devices/%u/key
pattern read sealcast/devices/%u/receipt
pattern write sealcast/devices/%u/ack
pattern write sealcast/devices/%u/state
pattern write sealcast/devices/%u/presence
`
	conf = filepath.Join(dir, "mosquitto.conf")
	lines := []string{
		fmt.Sprintf("listener %d 127.0.0.1", port),
		"allow_anonymous false",
		"password_file " + filepath.Join(dir, "passwd"),
		"acl_file " + filepath.Join(dir, "acl"),
		// Like the embedded broker: no limit on queued messages that a device's
		// subscriptions need, and chunks of up to 1 MiB (PROTOCOL.md 9).
		"max_queued_messages 1000",
		"message_size_limit 0",
		"persistence false",
		"sys_interval 1",
		"log_dest stderr",
		"log_type error",
		"log_type warning",
	}
	if os.Geteuid() == 0 {
		lines = append(lines, "user root") // else it drops to "mosquitto", who cannot read dir
	}
	if err := os.WriteFile(filepath.Join(dir, "acl"), []byte(acl), 0o600); err != nil {
		return "", err
	}
	return conf, os.WriteFile(conf, []byte(strings.Join(lines, "\n")+"\n"), 0o600)
}

// writePasswords writes Mosquitto's password file for the updater, the admin and the
// devices (from their device files), hashed by mosquitto_passwd -U.
func writePasswords(dir string, users map[string]string, devices []protocol.DeviceFile) error {
	var b strings.Builder
	for u, pw := range users {
		fmt.Fprintf(&b, "%s:%s\n", u, pw)
	}
	for _, d := range devices {
		fmt.Fprintf(&b, "%s:%s\n", d.Broker.Username, d.Broker.Password)
	}
	path := filepath.Join(dir, "passwd")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		return err
	}
	passwd, err := exec.LookPath("mosquitto_passwd")
	if err != nil {
		return fmt.Errorf("mosquitto_passwd not found (apt-get install -y mosquitto): %w", err)
	}
	if out, err := exec.Command(passwd, "-U", path).CombinedOutput(); err != nil {
		return fmt.Errorf("mosquitto_passwd -U: %v: %s", err, out)
	}
	return nil
}

// reloadMosquitto makes Mosquitto re-read its password and ACL files.
func reloadMosquitto(c *child) error { return c.cmd.Process.Signal(syscall.SIGHUP) }

func randomPassword() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

const updaterUser = "sealcast-updater"
