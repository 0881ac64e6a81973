package main

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"
)

// repoRoot is where docker-compose.yml, Dockerfile and .dockerignore live.
const repoRoot = "../.."

// loadCompose loads docker-compose.yml with the Compose specification's own loader
// (interpolation, merge keys, normalization, schema validation), seeing only env.
func loadCompose(t *testing.T, env ...string) (*types.Project, error) {
	t.Helper()
	opts, err := cli.NewProjectOptions([]string{filepath.Join(repoRoot, "docker-compose.yml")},
		cli.WithWorkingDirectory(repoRoot), cli.WithName("sealcast"), cli.WithEnv(env))
	if err != nil {
		t.Fatal(err)
	}
	return opts.LoadProject(context.Background())
}

// flagPairs reads a command written as "sub -flag value -flag value ...", the shape every
// sealcast command line in docker-compose.yml keeps so that it can be checked here.
func flagPairs(t *testing.T, service string, cmd []string) (sub string, flags map[string]string) {
	t.Helper()
	if len(cmd) == 0 || len(cmd)%2 != 1 {
		t.Fatalf("%s: command %q is not a subcommand followed by -flag value pairs", service, cmd)
	}
	flags = map[string]string{}
	for i := 1; i < len(cmd); i += 2 {
		name, ok := strings.CutPrefix(cmd[i], "-")
		if !ok || name == "" || strings.HasPrefix(name, "-") {
			t.Fatalf("%s: command %q: %q is not a -flag", service, cmd, cmd[i])
		}
		if _, dup := flags[name]; dup {
			t.Fatalf("%s: command %q sets -%s twice", service, cmd, name)
		}
		flags[name] = cmd[i+1]
	}
	return cmd[0], flags
}

// volumeAt returns the named volume a service mounts at target.
func volumeAt(t *testing.T, s types.ServiceConfig, target string) string {
	t.Helper()
	for _, v := range s.Volumes {
		if v.Target == target {
			if v.Type != types.VolumeTypeVolume {
				t.Errorf("%s: %s is a %s mount; want a named volume", s.Name, target, v.Type)
			}
			return v.Source
		}
	}
	t.Errorf("%s: nothing is mounted at %s", s.Name, target)
	return ""
}

func TestComposeFile(t *testing.T) {
	const pw = "compose-test-password"
	p, err := loadCompose(t, "SEALCAST_ADMIN_PASSWORD="+pw)
	if err != nil {
		t.Fatalf("docker-compose.yml does not load: %v", err)
	}
	names := p.ServiceNames()
	slices.Sort(names)
	if want := []string{"redis", "sealcast", "simulator"}; !slices.Equal(names, want) {
		t.Fatalf("services %q, want %q", names, want)
	}
	redis, _ := p.GetService("redis")
	sc, _ := p.GetService("sealcast")
	sim, _ := p.GetService("simulator")

	t.Run("redis", func(t *testing.T) {
		if !strings.HasPrefix(redis.Image, "redis:7") {
			t.Errorf("image %q, want redis:7", redis.Image)
		}
		// Counters must not roll back: AOF on, fsync before every reply.
		cmd := []string(redis.Command)
		opt := func(name string) string {
			i := slices.Index(cmd, name)
			if i < 0 || i+1 >= len(cmd) {
				return ""
			}
			return cmd[i+1]
		}
		if len(cmd) == 0 || cmd[0] != "redis-server" {
			t.Errorf("command %q does not run redis-server", cmd)
		}
		if got := opt("--appendonly"); got != "yes" {
			t.Errorf("--appendonly %q, want yes (command %q)", got, cmd)
		}
		if got := opt("--appendfsync"); got != "always" {
			t.Errorf("--appendfsync %q, want always (command %q)", got, cmd)
		}
		if v := volumeAt(t, redis, "/data"); v != "" && p.Volumes[v].Name == "" {
			t.Errorf("volume %q is not declared", v)
		}
		if hc := redis.HealthCheck; hc == nil || hc.Disable || len(hc.Test) == 0 {
			t.Errorf("no healthcheck: sealcast's depends_on waits for it")
		} else if !strings.Contains(strings.Join(hc.Test, " "), "redis-cli ping") {
			t.Errorf("healthcheck %q does not ping Redis", hc.Test)
		}
	})

	_, scFlags := flagPairs(t, "sealcast", sc.Command)
	_, simFlags := flagPairs(t, "simulator", sim.Command)

	t.Run("sealcast", func(t *testing.T) {
		if sc.Build == nil || filepath.Base(sc.Build.Dockerfile) != "Dockerfile" {
			t.Fatalf("build %+v: want the repository's Dockerfile", sc.Build)
		}
		if abs, _ := filepath.Abs(repoRoot); sc.Build.Context != abs {
			t.Errorf("build context %q, want the repository root %q", sc.Build.Context, abs)
		}
		if sc.Image == "" || sim.Image != sc.Image || sim.Build == nil || sim.Build.Context != sc.Build.Context {
			t.Errorf("simulator image %q (build %+v) is not sealcast's %q", sim.Image, sim.Build, sc.Image)
		}
		// -redis names the redis service on its default port.
		u, err := url.Parse(scFlags["redis"])
		if err != nil || u.Scheme != "redis" || u.Hostname() != "redis" || u.Port() != "6379" {
			t.Errorf("-redis %q, want redis://redis:6379/<db>", scFlags["redis"])
		}
		if d := scFlags["data"]; d == "" {
			t.Errorf("-data is not set")
		} else if v := volumeAt(t, sc, d); v != "" && p.Volumes[v].Name == "" {
			t.Errorf("volume %q is not declared", v)
		}
		// Secrets travel in the environment, never on a command line (docker inspect, ps).
		if _, ok := scFlags["admin-password"]; ok {
			t.Errorf("-admin-password is on serve's command line")
		}
		if got := sc.Environment["SEALCAST_ADMIN_PASSWORD"]; got == nil || *got != pw {
			t.Errorf("environment SEALCAST_ADMIN_PASSWORD %v, want the interpolated %q", got, pw)
		}
		// Published on the host's loopback only, where serve listens in the container.
		published := map[uint32]types.ServicePortConfig{}
		for _, port := range sc.Ports {
			published[port.Target] = port
		}
		for _, port := range []uint32{1883, 9883} {
			if p := published[port]; p.Published == "" || p.HostIP != "127.0.0.1" {
				t.Errorf("port %d is not published on 127.0.0.1 (ports %+v)", port, sc.Ports)
			}
		}
		for flag, want := range map[string]string{"listen": "0.0.0.0:1883", "http": "0.0.0.0:9883"} {
			if scFlags[flag] != want {
				t.Errorf("-%s %q: want %q, every interface of the container, set explicitly", flag, scFlags[flag], want)
			}
		}
		if dep, ok := sc.DependsOn["redis"]; !ok || dep.Condition != types.ServiceConditionHealthy {
			t.Errorf("depends_on redis %+v, want condition service_healthy", dep)
		}
		if sc.Restart == "" || sc.Restart == types.RestartPolicyNo {
			t.Errorf("restart %q: a crashed server should come back", sc.Restart)
		}
		// The healthcheck runs this binary's healthcheck command against serve's -http.
		hc := sc.HealthCheck
		if hc == nil || hc.Disable || len(hc.Test) < 3 || hc.Test[0] != "CMD" || hc.Test[2] != "healthcheck" {
			t.Fatalf("healthcheck %+v, want [CMD <sealcast> healthcheck ...]", hc)
		}
		httpAddr := scFlags["http"]
		if httpAddr == "" {
			httpAddr = "127.0.0.1:" + defaultHTTPPort // serve's default
		}
		_, hcFlags := flagPairs(t, "healthcheck", hc.Test[2:])
		_, httpPort, _ := net.SplitHostPort(httpAddr)
		if u, err := url.Parse(hcFlags["url"]); hcFlags["url"] != "" && (err != nil || u.Port() != httpPort || u.Path != "/healthz") {
			t.Errorf("healthcheck -url %q, but serve's /healthz is on port %s", hcFlags["url"], httpPort)
		}
		if err := run(context.Background(), append(slices.Clone(hc.Test[2:]), "-h"), io.Discard, io.Discard); err != nil {
			t.Errorf("healthcheck %q does not parse: %v", hc.Test[2:], err)
		}
	})

	t.Run("simulator", func(t *testing.T) {
		// -broker reaches the sealcast service on the port its broker listens on.
		u, err := url.Parse(simFlags["broker"])
		if err != nil || u.Scheme != "tcp" || u.Hostname() != "sealcast" {
			t.Fatalf("-broker %q, want tcp://sealcast:<port>", simFlags["broker"])
		}
		listen := scFlags["listen"]
		if listen == "" {
			listen = ":1883" // serve's default
		}
		if _, port, _ := net.SplitHostPort(listen); u.Port() != port {
			t.Errorf("-broker port %s, but sealcast listens on %s", u.Port(), listen)
		}
		if pub := scFlags["public-url"]; pub != "" && pub != simFlags["broker"] {
			t.Errorf("device files name %q but the simulator connects to %q", pub, simFlags["broker"])
		}
		if got := sim.Environment["SEALCAST_PASSWORD"]; simFlags["user"] != "admin" || simFlags["password"] != "" || got == nil || *got != pw {
			t.Errorf("-user %q -password %q, environment SEALCAST_PASSWORD %v: want admin, no password on the command line, and the interpolated password in the environment", simFlags["user"], simFlags["password"], got)
		}
		if s := simFlags["state"]; s == "" {
			t.Errorf("-state is not set")
		} else if v := volumeAt(t, sim, s); v != "" && p.Volumes[v].Name == "" {
			t.Errorf("volume %q is not declared", v)
		}
		if dep, ok := sim.DependsOn["sealcast"]; !ok || dep.Condition != types.ServiceConditionHealthy {
			t.Errorf("simulator depends_on sealcast %+v, want condition service_healthy", dep)
		}
		if sim.Restart != types.RestartPolicyOnFailure && sim.Restart != types.RestartPolicyUnlessStopped && sim.Restart != types.RestartPolicyAlways {
			t.Errorf("restart %q: the simulator starts before the broker listens and must try again", sim.Restart)
		}
	})

	// Every sealcast command line must parse with the real CLI: each flag before -h must
	// be known, or the flag package fails before it sees -h. The usage printed must be
	// the subcommand's (an unknown subcommand prints the root's) and list every flag used.
	for _, svc := range []types.ServiceConfig{sc, sim} {
		t.Run("cli/"+svc.Name, func(t *testing.T) {
			sub, flags := flagPairs(t, svc.Name, svc.Command)
			var stdout bytes.Buffer
			err := run(context.Background(), append(slices.Clone([]string(svc.Command)), "-h"), &stdout, io.Discard)
			if err != nil {
				t.Fatalf("sealcast %q -h: %v, want the usage (an unknown flag or subcommand?)\n%s", svc.Command, err, stdout.String())
			}
			usage := stdout.String()
			if strings.Contains(usage, "sealcast <command>") {
				t.Fatalf("sealcast has no subcommand %q: the root usage was printed\n%s", sub, usage)
			}
			for name := range flags {
				if !regexp.MustCompile(`(?m)^\s+-` + regexp.QuoteMeta(name) + `[ =]`).MatchString(usage) {
					t.Errorf("sealcast %s -h does not list -%s\n%s", sub, name, usage)
				}
			}
		})
	}
}

// TestComposeNeedsAdminPassword checks that Compose refuses to start without the admin
// password instead of passing an empty one.
func TestComposeNeedsAdminPassword(t *testing.T) {
	_, err := loadCompose(t)
	if err == nil || !strings.Contains(err.Error(), "SEALCAST_ADMIN_PASSWORD") {
		t.Fatalf("loading without SEALCAST_ADMIN_PASSWORD: %v, want an error naming it", err)
	}
}

// dockerInstr is one Dockerfile instruction.
type dockerInstr struct{ cmd, args string }

// readDockerfile returns the Dockerfile's instructions, continuation lines joined and
// comments dropped: enough for the checks below, not a full parser.
func readDockerfile(t *testing.T) []dockerInstr {
	t.Helper()
	f, err := os.Open(filepath.Join(repoRoot, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []dockerInstr
	var cur strings.Builder
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if cur.Len() == 0 && (line == "" || strings.HasPrefix(line, "#")) {
			continue
		}
		if l, more := strings.CutSuffix(line, `\`); more {
			cur.WriteString(l + " ")
			continue
		}
		cur.WriteString(line)
		cmd, args, _ := strings.Cut(cur.String(), " ")
		out = append(out, dockerInstr{strings.ToUpper(cmd), strings.TrimSpace(args)})
		cur.Reset()
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestDockerfile checks the basics by reading the instructions: multi-stage, a static
// build, a final stage that runs as a non-root user with sealcast as its entrypoint, and
// mount points the runtime user owns for every volume docker-compose.yml mounts into it.
func TestDockerfile(t *testing.T) {
	instrs := readDockerfile(t)
	stages, last := 0, 0
	for i, in := range instrs {
		if in.cmd == "FROM" {
			stages++
			last = i
		}
	}
	if stages < 2 {
		t.Fatalf("%d FROM stages, want a multi-stage build", stages)
	}
	build, final := instrs[:last], instrs[last:]

	static := false
	for _, in := range build {
		if in.cmd == "RUN" && strings.Contains(in.args, "CGO_ENABLED=0") && strings.Contains(in.args, "go build") {
			static = true
		}
	}
	if !static {
		t.Errorf("no RUN ... CGO_ENABLED=0 go build in the build stage")
	}

	var user, entrypoint string
	var expose []string
	owned := map[string]bool{} // COPY --chown destinations in the final stage
	for _, in := range final {
		switch in.cmd {
		case "USER":
			user = in.args
		case "ENTRYPOINT":
			entrypoint = in.args
		case "EXPOSE":
			expose = append(expose, strings.Fields(in.args)...)
		case "COPY":
			f := strings.Fields(in.args)
			if len(f) > 0 && slices.ContainsFunc(f, func(s string) bool { return strings.HasPrefix(s, "--chown=") }) {
				owned[f[len(f)-1]] = true
			}
		}
	}
	if u, _, _ := strings.Cut(user, ":"); u == "" || u == "root" || u == "0" {
		t.Errorf("final stage USER %q: want a non-root user", user)
	}
	if !strings.Contains(entrypoint, "sealcast") {
		t.Errorf("ENTRYPOINT %q does not run sealcast", entrypoint)
	}
	for _, port := range []string{"1883", "8883", "9883"} {
		if !slices.Contains(expose, port) {
			t.Errorf("EXPOSE %q lacks %s", expose, port)
		}
	}

	p, err := loadCompose(t, "SEALCAST_ADMIN_PASSWORD=x")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"sealcast", "simulator"} {
		s, _ := p.GetService(name)
		for _, v := range s.Volumes {
			if !owned[v.Target] {
				t.Errorf("%s mounts a volume at %s, but the image does not create it owned by its user (COPY --chown): a new volume would be root's", name, v.Target)
			}
		}
	}
}

// TestDockerignore checks that secrets and the VCS never reach the build context.
func TestDockerignore(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(repoRoot, ".dockerignore"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(b), "\n")
	for _, want := range []string{".git", "sealcast-data", "**/*.key"} {
		if !slices.Contains(lines, want) {
			t.Errorf(".dockerignore lacks %q", want)
		}
	}
}
