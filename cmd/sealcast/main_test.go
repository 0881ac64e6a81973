package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/rogpeppe/go-internal/testscript"
	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/device/simulate"
	"github.com/sealcast/sealcast/protocol"
)

// The scripts in testdata/script run the sealcast binary, as a user would: the test
// binary installs itself as "sealcast" in $PATH and runs main when called by that name.
func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){"sealcast": main})
}

func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{
		Dir:                 "testdata/script",
		RequireExplicitExec: true,
		Setup: func(env *testscript.Env) error {
			// Scripts start from an empty environment: no SEALCAST_* of the developer's
			// leaks in. Under -race every exit of the binary would sleep a second to let
			// other goroutines report; scripts run it dozens of times.
			if os.Getenv("GORACE") == "" {
				env.Setenv("GORACE", "atexit_sleep_ms=10")
			}
			return nil
		},
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			"waitserve":  cmdWaitServe,
			"waitfile":   cmdWaitFile,
			"httpget":    cmdHTTPGet,
			"setenvfrom": cmdSetenvFrom,
			"jsonget":    cmdJSONGet,
			"jsonvalid":  cmdJSONValid,
			"errline":    cmdErrLine,
			"emptydir":   cmdEmptyDir,
			"asdevice":   cmdAsDevice,
			"simulate":   cmdSimulate,
			"gencert":    cmdGenCert,
		},
	})
}

// waitFor is how long the commands below wait for something a server does. Generous:
// the machine may be loaded and everything runs under -race.
const waitFor = 60 * time.Second

// poll calls f every 50 ms until it returns true or waitFor passes.
func poll(ts *testscript.TestScript, what string, f func() (bool, string)) {
	deadline := time.Now().Add(waitFor)
	for {
		ok, last := f()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			ts.Fatalf("gave up after %s waiting for %s; last seen:\n%s", waitFor, what, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitserve LOG: waits until the serve whose stderr goes to LOG is ready, and sets MQTT
// (the broker URL for clients), TCP, TLS (empty without) and HTTP from the addresses its "sealcast serving"
// line names.
func cmdWaitServe(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 1 {
		ts.Fatalf("usage: waitserve LOG")
	}
	var serving map[string]any
	poll(ts, "serve to start", func() (bool, string) {
		b, _ := os.ReadFile(ts.MkAbs(args[0]))
		if bytes.Contains(b, []byte("\nsealcast: ")) || bytes.HasPrefix(b, []byte("sealcast: ")) {
			ts.Fatalf("serve failed:\n%s", b)
		}
		ready := false
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			var m map[string]any
			if json.Unmarshal(sc.Bytes(), &m) != nil {
				continue
			}
			switch m["message"] {
			case "sealcast serving; stop with Ctrl-C":
				serving = m
			case "updater running": // admin requests are read from here on
				ready = true
			}
		}
		return serving != nil && ready, string(b)
	})
	mqttURL, _ := serving["mqtt"].(string)
	tcp, _ := serving["tcp"].(string)
	httpAddr, _ := serving["http"].(string)
	if mqttURL == "" || tcp == "" || httpAddr == "" || strings.HasSuffix(tcp, ":0") || strings.HasSuffix(httpAddr, ":0") {
		ts.Fatalf("serving line lacks bound addresses: %v", serving)
	}
	ts.Setenv("MQTT", mqttURL)
	ts.Setenv("TCP", tcp)
	tlsAddr, _ := serving["tls"].(string)
	ts.Setenv("TLS", tlsAddr)
	ts.Setenv("HTTP", httpAddr)
}

// waitfile PATTERN FILE: waits until FILE matches the regular expression.
func cmdWaitFile(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 2 {
		ts.Fatalf("usage: waitfile PATTERN FILE")
	}
	re := regexp.MustCompile("(?m)" + args[0])
	poll(ts, fmt.Sprintf("%s to match %q", args[1], args[0]), func() (bool, string) {
		b, _ := os.ReadFile(ts.MkAbs(args[1]))
		return re.Match(b), string(b)
	})
}

// httpget URL FILE [PATTERN...]: fetches URL until it answers 200 with a body matching
// every pattern, and writes the body to FILE.
func cmdHTTPGet(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 2 {
		ts.Fatalf("usage: httpget URL FILE [PATTERN...]")
	}
	var res []*regexp.Regexp
	for _, p := range args[2:] {
		res = append(res, regexp.MustCompile("(?m)"+p))
	}
	var body []byte
	poll(ts, fmt.Sprintf("%s to match %q", args[0], args[2:]), func() (bool, string) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, args[0], nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return false, err.Error()
		}
		defer resp.Body.Close()
		body, _ = io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			return false, resp.Status + "\n" + string(body)
		}
		for _, re := range res {
			if !re.Match(body) {
				return false, string(body)
			}
		}
		return true, ""
	})
	ts.Check(os.WriteFile(ts.MkAbs(args[1]), body, 0o644))
}

// setenvfrom VAR FILE [PATTERN]: sets VAR to FILE's content, trimmed, or to the first
// submatch of PATTERN in it. FILE may be stdout or stderr of the last command.
func cmdSetenvFrom(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 2 || len(args) > 3 {
		ts.Fatalf("usage: setenvfrom VAR FILE [PATTERN]")
	}
	s := strings.TrimSpace(ts.ReadFile(args[1]))
	if len(args) == 3 {
		m := regexp.MustCompile("(?m)" + args[2]).FindStringSubmatch(s)
		if len(m) < 2 {
			ts.Fatalf("%q not found in %s:\n%s", args[2], args[1], s)
		}
		s = m[1]
	}
	ts.Setenv(args[0], s)
}

// jsonget VAR FILE PATH: sets VAR to the value at PATH (dot-separated keys and indexes,
// e.g. releases.0.release) in FILE's JSON. A missing value is an error.
func cmdJSONGet(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 3 {
		ts.Fatalf("usage: jsonget VAR FILE PATH")
	}
	var v any
	if err := json.Unmarshal([]byte(ts.ReadFile(args[1])), &v); err != nil {
		ts.Fatalf("%s is not JSON: %v", args[1], err)
	}
	for _, k := range strings.Split(args[2], ".") {
		switch x := v.(type) {
		case map[string]any:
			v = x[k]
		case []any:
			i, err := strconv.Atoi(k)
			if err != nil || i < 0 || i >= len(x) {
				ts.Fatalf("%s: no index %q in an array of %d", args[2], k, len(x))
			}
			v = x[i]
		default:
			v = nil
		}
		if v == nil {
			ts.Fatalf("%s: nothing at %q", args[2], k)
		}
	}
	switch x := v.(type) {
	case string:
		ts.Setenv(args[0], x)
	default:
		b, _ := json.Marshal(x)
		ts.Setenv(args[0], string(b))
	}
}

// jsonvalid [-lines] FILE: FILE holds one JSON value, or with -lines one on every line.
func cmdJSONValid(ts *testscript.TestScript, neg bool, args []string) {
	lines := len(args) == 2 && args[0] == "-lines"
	if neg || len(args) != 1 && !lines {
		ts.Fatalf("usage: jsonvalid [-lines] FILE")
	}
	s := ts.ReadFile(args[len(args)-1])
	if !lines {
		if !json.Valid([]byte(s)) {
			ts.Fatalf("%s is not valid JSON:\n%s", args[0], s)
		}
		return
	}
	n := 0
	for _, l := range strings.Split(strings.TrimSuffix(s, "\n"), "\n") {
		if !json.Valid([]byte(l)) || !strings.HasPrefix(l, "{") {
			ts.Fatalf("line %d of %s is not a JSON object: %q", n+1, args[1], l)
		}
		n++
	}
	if s == "" {
		ts.Fatalf("%s is empty", args[1])
	}
}

// errline [-last] PATTERN: the last command's stderr is exactly one line, "sealcast: ...",
// matching PATTERN; with -last, its last line is (serve logs before it).
func cmdErrLine(ts *testscript.TestScript, neg bool, args []string) {
	last := len(args) == 2 && args[0] == "-last"
	if neg || len(args) != 1 && !last {
		ts.Fatalf("usage: errline [-last] PATTERN")
	}
	s := ts.ReadFile("stderr")
	line := s
	if last {
		line = s[strings.LastIndex(strings.TrimSuffix(s, "\n"), "\n")+1:]
	}
	if strings.Count(line, "\n") != 1 || !strings.HasSuffix(line, "\n") || !strings.HasPrefix(line, "sealcast: ") {
		ts.Fatalf("stderr does not end in one line \"sealcast: ...\":\n%s", s)
	}
	if !regexp.MustCompile(args[len(args)-1]).MatchString(line) {
		ts.Fatalf("stderr does not match %q:\n%s", args[len(args)-1], s)
	}
}

// emptydir DIR: DIR exists and holds no file.
func cmdEmptyDir(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 1 {
		ts.Fatalf("usage: emptydir DIR")
	}
	ents, err := os.ReadDir(ts.MkAbs(args[0]))
	ts.Check(err)
	if len(ents) > 0 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		ts.Fatalf("%s holds %s", args[0], strings.Join(names, ", "))
	}
}

// asdevice DEVICEFILE LEAF PAYLOAD: connects to $SEALCAST_BROKER with the credentials of
// a device file, as that device, and publishes PAYLOAD to its topic
// sealcast/devices/<serial>/LEAF (QoS 1, retained for state and presence).
func cmdAsDevice(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 3 {
		ts.Fatalf("usage: asdevice DEVICEFILE LEAF PAYLOAD")
	}
	var f protocol.DeviceFile
	if err := json.Unmarshal([]byte(ts.ReadFile(args[0])), &f); err != nil {
		ts.Fatalf("%s: %v", args[0], err)
	}
	o := mqtt.NewClientOptions().AddBroker(ts.Getenv("SEALCAST_BROKER")).SetClientID(f.Serial).
		SetUsername(f.Broker.Username).SetPassword(f.Broker.Password).SetCleanSession(true).SetAutoReconnect(false)
	c := mqtt.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(waitFor) || tok.Error() != nil {
		ts.Fatalf("connecting as %s: %v", f.Serial, tok.Error())
	}
	defer c.Disconnect(250)
	leaf := args[1]
	tok = c.Publish(protocol.Root+"/devices/"+f.Serial+"/"+leaf, 1, leaf == "state" || leaf == "presence", args[2])
	if !tok.WaitTimeout(waitFor) || tok.Error() != nil {
		ts.Fatalf("publishing as %s: %v", f.Serial, tok.Error())
	}
}

// simulations are the device fleets started by "simulate start", by script.
var simulations sync.Map // *testscript.TestScript -> chan simResult

// simulate start DIR VERSION | simulate wait: runs the devices whose files are in DIR (as
// provision -out-dir writes them) in this process, over MQTT, until each has confirmed
// VERSION; wait waits for that and fails if any device failed.
func cmdSimulate(ts *testscript.TestScript, neg bool, args []string) {
	switch {
	case !neg && len(args) == 3 && args[0] == "start":
		version, err := strconv.ParseUint(args[2], 10, 64)
		ts.Check(err)
		names, err := filepath.Glob(filepath.Join(ts.MkAbs(args[1]), "*.json"))
		ts.Check(err)
		var files []protocol.DeviceFile
		for _, n := range names {
			var f protocol.DeviceFile
			b, err := os.ReadFile(n)
			ts.Check(err)
			ts.Check(json.Unmarshal(b, &f))
			files = append(files, f)
		}
		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		done := make(chan simResult, 1)
		go func() {
			sum, err := simulate.Run(ctx, simulate.Options{Devices: files, TargetVersion: version, Logger: zerolog.Nop()})
			done <- simResult{sum, err}
		}()
		ts.Defer(cancel)
		simulations.Store(ts, done)
	case !neg && len(args) == 1 && args[0] == "wait":
		v, ok := simulations.LoadAndDelete(ts)
		if !ok {
			ts.Fatalf("simulate wait: no simulation started")
		}
		r := <-v.(chan simResult)
		if r.err != nil {
			ts.Fatalf("simulation: %v", r.err)
		}
		if r.sum.Failed > 0 || r.sum.Confirmed != r.sum.Devices {
			ts.Fatalf("simulation: %s", r.sum)
		}
		ts.Logf("simulation: %s", r.sum)
	default:
		ts.Fatalf("usage: simulate start DIR VERSION | simulate wait")
	}
}

// gencert CERT KEY: writes a self-signed ECDSA certificate for 127.0.0.1 and its key, PEM.
func cmdGenCert(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 2 || len(args) > 3 {
		ts.Fatalf("usage: gencert CERT KEY [CLIENT-CN]")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ts.Check(err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "sealcast test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if len(args) == 3 { // a self-signed client certificate, its own CA for serve -client-ca
		tmpl.Subject.CommonName, tmpl.ExtKeyUsage = args[2], []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	ts.Check(err)
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	ts.Check(err)
	ts.Check(os.WriteFile(ts.MkAbs(args[0]), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644))
	ts.Check(os.WriteFile(ts.MkAbs(args[1]), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600))
}
