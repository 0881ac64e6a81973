package device

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/sealcast/sealcast/keychain"
)

// Installer applies images. The agent calls Begin once the manifest verified, streams the
// plaintext into the returned Install chunk by chunk, in order, then calls Commit only
// after both manifest hashes matched [SC-4.2], or Abort on any failure. Plaintext written
// before Commit is not yet authenticated as a whole: an Install must not make it live
// before Commit.
//
// Installers MUST tolerate installing the same image twice: after a power loss between
// Commit and the vault write, the device redoes the update [SC-10.1].
type Installer interface {
	Begin(m *keychain.Manifest) (Install, error)
}

// Install is one image being installed.
type Install interface {
	io.Writer
	// Commit makes the image live, or, for a TrialInstaller, stages it (Switch makes it
	// run). It is called at most once, after all plaintext.
	Commit() error
	// Abort discards the image. It may be called after a failed Write or Commit.
	Abort() error
}

// ---------------------------------------------------------------------------------------

// SlotInstaller installs into two slot files, slot-a.img and slot-b.img, in a directory
// (A/B updates), and runs each new image on trial before the device confirms it
// [SC-10.5]. The inactive slot is written; Commit fsyncs it and records it as staged.
// Switch makes the staged slot active, on trial, by an atomic rename of the "active"
// pointer file (so a power loss leaves either the old or the new slot active) and runs
// SwitchCmd; Health runs HealthCmd; Confirm clears the trial mark and runs ConfirmCmd;
// Revert makes the previous slot active again and runs SwitchCmd for it. Re-installing
// the release that is already active only verifies the stream and keeps both slots, so
// the fallback image survives a redone update.
//
// The commands are the integrator's: SwitchCmd tells the bootloader which slot to boot
// (and may reboot into it), HealthCmd checks that the new image works and MUST fail
// unless it is the one running; ConfirmCmd tells the bootloader to keep it. An argument
// may hold {slot} (a or b), {image} (the slot file), {release} and {version}, which are
// also in the environment as SEALCAST_SLOT, SEALCAST_IMAGE, SEALCAST_RELEASE and
// SEALCAST_VERSION; success is exit status 0. Empty commands do nothing (HealthCmd:
// healthy). Set them before the first Begin.
//
// A SlotInstaller is safe for concurrent use, but installs one image at a time.
type SlotInstaller struct {
	SwitchCmd, HealthCmd, ConfirmCmd []string

	dir  string
	mu   sync.Mutex
	busy bool
}

// ActiveSlot is the content of the "active" (and "staged") pointer file.
type ActiveSlot struct {
	Slot        string             `json:"slot"` // "a" or "b"
	Release     keychain.ReleaseID `json:"release"`
	Version     uint64             `json:"version"`
	ImageSHA256 string             `json:"image_sha256"`
	ImageSize   uint64             `json:"image_size"`
	// Trial is set while the image runs on trial; Previous is the slot active before
	// it, which Revert makes active again (nil if there was none).
	Trial    bool        `json:"trial,omitempty"`
	Previous *ActiveSlot `json:"previous,omitempty"`
}

// ErrInstallBusy is returned by Begin while another install is open.
var ErrInstallBusy = errors.New("device: an install is already in progress")

// NewSlotInstaller uses dir, creating it (mode 0700) if needed.
func NewSlotInstaller(dir string) (*SlotInstaller, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("device: creating slot directory: %w", err)
	}
	return &SlotInstaller{dir: dir}, nil
}

// SlotPath returns the path of slot "a" or "b".
func (s *SlotInstaller) SlotPath(slot string) string {
	return filepath.Join(s.dir, "slot-"+slot+".img")
}

// Active returns the active slot, or ok = false if nothing was ever installed.
func (s *SlotInstaller) Active() (a ActiveSlot, ok bool, err error) {
	return s.pointer("active")
}

// pointer reads the pointer file name ("active" or "staged").
func (s *SlotInstaller) pointer(name string) (a ActiveSlot, ok bool, err error) {
	path := filepath.Join(s.dir, name)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return a, false, nil
	}
	if err != nil {
		return a, false, fmt.Errorf("device: reading slot pointer %s: %w", path, err)
	}
	if err := json.Unmarshal(b, &a); err != nil || (a.Slot != "a" && a.Slot != "b") {
		return a, false, fmt.Errorf("device: slot pointer %s is damaged: %q", path, b)
	}
	return a, true, nil
}

// setPointer replaces the pointer file name with a, atomically; nil removes it.
func (s *SlotInstaller) setPointer(name string, a *ActiveSlot) error {
	path := filepath.Join(s.dir, name)
	if a == nil {
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("device: removing slot pointer %s: %w", path, err)
		}
		return syncDir(s.dir)
	}
	b, _ := json.Marshal(a)
	if err := writeFileAtomic(path, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("device: writing slot pointer %s: %w", path, err)
	}
	return nil
}

// Switch makes release id's staged slot active, on trial, and runs SwitchCmd for it
// [SC-10.5]. If the command fails, the previous slot stays active.
func (s *SlotInstaller) Switch(id keychain.ReleaseID) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	cur, ok, err := s.Active()
	if err != nil {
		return err
	}
	if ok && cur.Release == id {
		return nil // switched already (a redone switch after a power loss, or a redone update)
	}
	st, staged, err := s.pointer("staged")
	if err != nil {
		return err
	}
	if !staged || st.Release != id {
		return fmt.Errorf("device: no image of release %s is staged", id)
	}
	st.Trial = true
	if ok {
		prev := cur
		prev.Trial, prev.Previous = false, nil
		st.Previous = &prev
	}
	if err := s.setPointer("active", &st); err != nil {
		return err
	}
	if err := s.run(context.Background(), s.SwitchCmd, st); err != nil {
		var back *ActiveSlot
		if ok {
			back = &cur
		}
		if rerr := s.setPointer("active", back); rerr != nil {
			return fmt.Errorf("%w; and restoring the previous slot: %v", err, rerr)
		}
		return err
	}
	return s.setPointer("staged", nil)
}

// Running reports whether release id's image is the active slot.
func (s *SlotInstaller) Running(id keychain.ReleaseID) (bool, error) {
	cur, ok, err := s.Active()
	return ok && cur.Release == id, err
}

// Health runs HealthCmd for release id's image; it fails if that image is not active.
func (s *SlotInstaller) Health(ctx context.Context, id keychain.ReleaseID) error {
	cur, ok, err := s.Active()
	if err != nil {
		return err
	}
	if !ok || cur.Release != id {
		return fmt.Errorf("device: release %s is not the active slot", id)
	}
	return s.run(ctx, s.HealthCmd, cur)
}

// Confirm makes release id's image, on trial, permanent and runs ConfirmCmd.
func (s *SlotInstaller) Confirm(id keychain.ReleaseID) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	cur, ok, err := s.Active()
	if err != nil || !ok || cur.Release != id || !cur.Trial {
		return err // nothing on trial: confirmed already
	}
	cur.Trial, cur.Previous = false, nil
	if err := s.run(context.Background(), s.ConfirmCmd, cur); err != nil {
		return err
	}
	return s.setPointer("active", &cur)
}

// Revert makes the slot active before release id's trial active again and runs
// SwitchCmd for it.
func (s *SlotInstaller) Revert(id keychain.ReleaseID) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	cur, ok, err := s.Active()
	if err != nil || !ok || cur.Release != id || !cur.Trial {
		return err // not on trial: gone back already
	}
	if cur.Previous != nil {
		if err := s.run(context.Background(), s.SwitchCmd, *cur.Previous); err != nil {
			return err
		}
	}
	return s.setPointer("active", cur.Previous)
}

// run runs cmd with the placeholders of slot a filled in; an empty cmd succeeds.
func (s *SlotInstaller) run(ctx context.Context, cmd []string, a ActiveSlot) error {
	if len(cmd) == 0 {
		return nil
	}
	r := strings.NewReplacer("{slot}", a.Slot, "{image}", s.SlotPath(a.Slot), "{release}", a.Release.String(), "{version}", strconv.FormatUint(a.Version, 10))
	args := make([]string, len(cmd))
	for i, c := range cmd {
		args[i] = r.Replace(c)
	}
	tail := &tailBuffer{max: stderrTail}
	c := exec.CommandContext(ctx, args[0], args[1:]...)
	c.Env = append(os.Environ(), "SEALCAST_SLOT="+a.Slot, "SEALCAST_IMAGE="+s.SlotPath(a.Slot),
		"SEALCAST_RELEASE="+a.Release.String(), "SEALCAST_VERSION="+strconv.FormatUint(a.Version, 10))
	c.Stderr = tail
	if err := c.Run(); err != nil {
		return fmt.Errorf("device: %s: %w%s", strings.Join(args, " "), err, tail.suffix())
	}
	return nil
}

// Begin opens the inactive slot for writing.
func (s *SlotInstaller) Begin(m *keychain.Manifest) (Install, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.busy {
		return nil, ErrInstallBusy
	}
	cur, ok, err := s.Active()
	if err != nil {
		return nil, err
	}
	sum := hex.EncodeToString(m.ImageSHA256[:])
	want := ActiveSlot{Release: m.Release, Version: m.Version, ImageSHA256: sum, ImageSize: m.ImageSize}
	if ok && cur.Release == m.Release && cur.ImageSHA256 == sum {
		// Redone update [SC-10.1]: the image is live already.
		s.busy = true
		return &verifyOnly{s: s}, nil
	}
	want.Slot = "a"
	if ok && cur.Slot == "a" {
		want.Slot = "b"
	}
	f, err := os.CreateTemp(s.dir, ".slot-"+want.Slot+".tmp-*")
	if err != nil {
		return nil, fmt.Errorf("device: opening slot %s: %w", want.Slot, err)
	}
	s.busy = true
	return &slotInstall{s: s, f: f, want: want}, nil
}

func (s *SlotInstaller) done() {
	s.mu.Lock()
	s.busy = false
	s.mu.Unlock()
}

type verifyOnly struct {
	s    *SlotInstaller
	once sync.Once
}

func (v *verifyOnly) Write(p []byte) (int, error) { return len(p), nil }
func (v *verifyOnly) Commit() error               { v.once.Do(v.s.done); return nil }
func (v *verifyOnly) Abort() error                { v.once.Do(v.s.done); return nil }

type slotInstall struct {
	s    *SlotInstaller
	f    *os.File
	want ActiveSlot
	once sync.Once
}

func (i *slotInstall) Write(p []byte) (int, error) { return i.f.Write(p) }

func (i *slotInstall) Commit() (err error) {
	defer i.once.Do(i.s.done)
	tmp := i.f.Name()
	defer func() {
		if err != nil {
			os.Remove(tmp)
		}
	}()
	if err = i.f.Sync(); err != nil {
		i.f.Close()
		return fmt.Errorf("device: syncing slot %s: %w", i.want.Slot, err)
	}
	if err = i.f.Close(); err != nil {
		return fmt.Errorf("device: closing slot %s: %w", i.want.Slot, err)
	}
	if err = os.Rename(tmp, i.s.SlotPath(i.want.Slot)); err != nil {
		return fmt.Errorf("device: writing slot %s: %w", i.want.Slot, err)
	}
	if err = syncDir(i.s.dir); err != nil {
		return fmt.Errorf("device: syncing slot directory: %w", err)
	}
	if err = i.s.setPointer("staged", &i.want); err != nil {
		return fmt.Errorf("device: staging slot %s: %w (the previous slot stays active)", i.want.Slot, err)
	}
	return nil
}

func (i *slotInstall) Abort() error {
	defer i.once.Do(i.s.done)
	i.f.Close()
	if err := os.Remove(i.f.Name()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("device: removing aborted slot image: %w", err)
	}
	return nil
}

// ---------------------------------------------------------------------------------------

// CommandInstaller hands the image to a command. If an argument is exactly "{image}", the
// plaintext is written to a temporary file in Dir and the command runs on Commit with
// that argument replaced by the file's path. Otherwise the command starts at Begin and
// reads the image on its standard input; Commit closes the input and waits, Abort kills
// the command before closing its input, so a command must apply the image only after a
// clean end of input and exit 0.
//
// Success is exit status 0. A failure error carries the tail of the command's standard
// error. The command's environment is the agent's plus SEALCAST_RELEASE, SEALCAST_VERSION,
// SEALCAST_IMAGE_SIZE and SEALCAST_IMAGE_SHA256.
type CommandInstaller struct {
	Path string   // the program
	Args []string // its arguments, possibly with one "{image}"
	Dir  string   // for temporary files; "" is os.TempDir()
	// Context bounds every command; nil is context.Background().
	Context context.Context
}

// ImageArg is the placeholder argument of CommandInstaller.
const ImageArg = "{image}"

const stderrTail = 2048

// Begin starts the command (pipe mode) or the temporary file (file mode).
func (c *CommandInstaller) Begin(m *keychain.Manifest) (Install, error) {
	ctx := c.Context
	if ctx == nil {
		ctx = context.Background()
	}
	env := append(os.Environ(),
		"SEALCAST_RELEASE="+m.Release.String(),
		"SEALCAST_VERSION="+strconv.FormatUint(m.Version, 10),
		"SEALCAST_IMAGE_SIZE="+strconv.FormatUint(m.ImageSize, 10),
		"SEALCAST_IMAGE_SHA256="+hex.EncodeToString(m.ImageSHA256[:]))
	fileMode := false
	for _, a := range c.Args {
		if a == ImageArg {
			fileMode = true
		}
	}
	ci := &cmdInstall{c: c, ctx: ctx, env: env, tail: &tailBuffer{max: stderrTail}}
	if fileMode {
		f, err := os.CreateTemp(c.Dir, "sealcast-image-*")
		if err != nil {
			return nil, fmt.Errorf("device: creating temporary image file: %w", err)
		}
		ci.f = f
		return ci, nil
	}
	cmd := exec.CommandContext(ctx, c.Path, c.Args...)
	cmd.Env = env
	cmd.Stderr = ci.tail
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("device: install command %s: %w", c.Path, err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("device: starting install command %s: %w", c.Path, err)
	}
	ci.cmd, ci.in = cmd, in
	return ci, nil
}

type cmdInstall struct {
	c    *CommandInstaller
	ctx  context.Context
	env  []string
	tail *tailBuffer
	f    *os.File       // file mode
	cmd  *exec.Cmd      // pipe mode
	in   io.WriteCloser // pipe mode
}

func (i *cmdInstall) Write(p []byte) (int, error) {
	if i.f != nil {
		return i.f.Write(p)
	}
	n, err := i.in.Write(p)
	if err != nil {
		return n, fmt.Errorf("device: install command %s stopped reading the image: %w%s", i.c.Path, err, i.tail.suffix())
	}
	return n, nil
}

func (i *cmdInstall) Commit() error {
	if i.f != nil {
		defer os.Remove(i.f.Name())
		if err := i.f.Close(); err != nil {
			return fmt.Errorf("device: writing temporary image file: %w", err)
		}
		args := make([]string, len(i.c.Args))
		for k, a := range i.c.Args {
			if a == ImageArg {
				a = i.f.Name()
			}
			args[k] = a
		}
		cmd := exec.CommandContext(i.ctx, i.c.Path, args...)
		cmd.Env = i.env
		cmd.Stderr = i.tail
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("device: install command %s failed: %w%s", i.c.Path, err, i.tail.suffix())
		}
		return nil
	}
	i.in.Close()
	if err := i.cmd.Wait(); err != nil {
		return fmt.Errorf("device: install command %s failed: %w%s", i.c.Path, err, i.tail.suffix())
	}
	return nil
}

func (i *cmdInstall) Abort() error {
	if i.f != nil {
		i.f.Close()
		return os.Remove(i.f.Name())
	}
	if i.cmd.Process != nil {
		i.cmd.Process.Kill()
	}
	i.in.Close()
	i.cmd.Wait()
	return nil
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append(t.b[:0], t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) suffix() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := strings.TrimSpace(string(bytes.ToValidUTF8(t.b, nil)))
	if s == "" {
		return ""
	}
	return "; stderr: " + s
}
