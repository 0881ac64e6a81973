package storetest

// Releases, their targets and their results.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater"
)

// NewRelease returns a release with every field PutRelease takes set.
func NewRelease(id keychain.ReleaseID, created time.Time) *updater.Release {
	return &updater.Release{
		ID:             id,
		Version:        1<<64 - 1,
		Label:          "spring \"fixes\" ✓",
		State:          "active",
		All:            true,
		Select:         map[string]string{"region": "eu", "hw": ""},
		Follow:         true,
		Waves:          []string{"1%", "10", "all"},
		Canary:         []string{"c-2", "c-1"},
		MaxFailures:    "5%",
		Abort:          true,
		Wave:           2,
		PauseReason:    "failure_threshold",
		Tolerated:      3,
		MaxConcurrent:  500,
		Soak:           90 * time.Second,
		Approve:        true,
		ToleratedWaves: 2,
		WaveLog: []updater.WaveRecord{
			{Opened: created, Closed: created.Add(time.Hour)},
			{Opened: created.Add(61 * time.Minute)},
		},
		Approved:       1,
		StartAt:        created.Add(2 * time.Hour),
		Window:         "Mon-Fri 01:00-05:00 Europe/Berlin",
		DeviceTimeout:  30 * time.Minute,
		Prefetch:       true,
		PrefetchJitter: 90 * time.Minute,
		Admitted:       1234,
		Created:        created,
		Manifest:       []byte{0, 1, 0xff, '{'},
		ContentKey:     bytes.Repeat([]byte{0, 0x80}, 30),
		ImageSize:      1<<40 + 3,
		ChunkSize:      1<<32 - 1,
		ChunkCount:     77,
	}
}

func sameWaveRecord(a, b updater.WaveRecord) bool {
	return sameTime(a.Opened, b.Opened) && sameTime(a.Closed, b.Closed)
}

func diffRelease(got, want *updater.Release) string {
	if got == nil {
		return "got nil"
	}
	var d []string
	add := func(field string, g, w any) { d = append(d, fmt.Sprintf("%s = %v, want %v", field, g, w)) }
	if got.ID != want.ID {
		add("ID", got.ID, want.ID)
	}
	if got.Version != want.Version {
		add("Version", got.Version, want.Version)
	}
	if got.Label != want.Label {
		add("Label", got.Label, want.Label)
	}
	if got.State != want.State {
		add("State", got.State, want.State)
	}
	if got.All != want.All {
		add("All", got.All, want.All)
	}
	if !slices.Equal(got.Waves, want.Waves) || !slices.Equal(got.Canary, want.Canary) || got.MaxFailures != want.MaxFailures || got.Abort != want.Abort ||
		got.Wave != want.Wave || got.PauseReason != want.PauseReason || got.Tolerated != want.Tolerated ||
		got.MaxConcurrent != want.MaxConcurrent || got.DefaultBound != want.DefaultBound || got.Admitted != want.Admitted || got.Soak != want.Soak ||
		got.Approve != want.Approve || got.ToleratedWaves != want.ToleratedWaves || !slices.EqualFunc(got.WaveLog, want.WaveLog, sameWaveRecord) || got.Approved != want.Approved ||
		!sameTime(got.StartAt, want.StartAt) || got.Window != want.Window || got.DeviceTimeout != want.DeviceTimeout ||
		got.Prefetch != want.Prefetch || got.PrefetchJitter != want.PrefetchJitter {
		add("rollout", fmt.Sprint(got.Waves, got.MaxFailures, got.Abort, got.Wave, got.PauseReason, got.Tolerated, got.ToleratedWaves, got.WaveLog),
			fmt.Sprint(want.Waves, want.MaxFailures, want.Abort, want.Wave, want.PauseReason, want.Tolerated, want.ToleratedWaves, want.WaveLog))
	}
	if !maps.Equal(got.Select, want.Select) || got.Follow != want.Follow {
		add("Select, Follow", fmt.Sprint(got.Select, got.Follow), fmt.Sprint(want.Select, want.Follow))
	}
	if !sameTime(got.Created, want.Created) {
		add("Created", got.Created, want.Created)
	}
	if !bytes.Equal(got.Manifest, want.Manifest) {
		add("Manifest", got.Manifest, want.Manifest)
	}
	if !bytes.Equal(got.ContentKey, want.ContentKey) {
		add("ContentKey", got.ContentKey, want.ContentKey)
	}
	if got.ImageSize != want.ImageSize {
		add("ImageSize", got.ImageSize, want.ImageSize)
	}
	if got.ChunkSize != want.ChunkSize {
		add("ChunkSize", got.ChunkSize, want.ChunkSize)
	}
	if got.ChunkCount != want.ChunkCount {
		add("ChunkCount", got.ChunkCount, want.ChunkCount)
	}
	if got.Installed != want.Installed || got.Failed != want.Failed {
		add("Installed/Failed", [2]int{got.Installed, got.Failed}, [2]int{want.Installed, want.Failed})
	}
	if !slices.Equal(got.InstallTimes, want.InstallTimes) {
		add("InstallTimes", got.InstallTimes, want.InstallTimes)
	}
	if len(d) == 0 {
		return ""
	}
	return fmt.Sprint(d)
}

func checkRelease(t *testing.T, s updater.Store, want *updater.Release) {
	t.Helper()
	got, err := s.Release(t.Context(), want.ID)
	if err != nil {
		t.Fatalf("Release(%v): %v", want.ID, err)
	}
	if diff := diffRelease(got, want); diff != "" {
		t.Errorf("release %v: %s", want.ID, diff)
	}
}

func testRelease(t *testing.T, s updater.Store) {
	ctx := t.Context()
	r := NewRelease(rid(1), t0.Add(123456789*time.Nanosecond))
	if err := s.PutRelease(ctx, r); err != nil {
		t.Fatal(err)
	}
	checkRelease(t, s, r)
	bare := &updater.Release{ID: rid(2)}
	if err := s.PutRelease(ctx, bare); err != nil {
		t.Fatal(err)
	}
	checkRelease(t, s, bare)

	// Replacing keeps the counts, which PutRelease ignores.
	if err := s.RecordResults(ctx, r.ID, []updater.Result{{Serial: "a", Result: updater.ResultInstalled}, {Serial: "b", Result: "failed:x"}}); err != nil {
		t.Fatal(err)
	}
	r2 := NewRelease(r.ID, r.Created)
	r2.State, r2.Label, r2.Manifest, r2.Installed, r2.Failed, r2.InstallTimes = "paused", "", nil, 50, 60, []int{7}
	if err := s.PutRelease(ctx, r2); err != nil {
		t.Fatal(err)
	}
	r2.Installed, r2.Failed, r2.InstallTimes = 1, 1, []int{1}
	checkRelease(t, s, r2)
	if got, err := s.Results(ctx, r.ID, []string{"a", "b"}); err != nil || !slices.Equal(got, []string{"installed", "failed:x"}) {
		t.Errorf("Results after PutRelease = %q, %v", got, err)
	}
}

func testReleases(t *testing.T, s updater.Store) {
	ctx := t.Context()
	rs, err := s.Releases(ctx)
	if err != nil || len(rs) != 0 {
		t.Fatalf("Releases on an empty store = %v, %v; want none", rs, err)
	}
	// Put out of order; ids sort differently from creation times.
	created := []time.Duration{3 * time.Hour, time.Hour, 2 * time.Hour, 0}
	for i, c := range created {
		if err := s.PutRelease(ctx, NewRelease(rid(byte(10-i)), t0.Add(c))); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.RecordResults(ctx, rid(9), []updater.Result{{Serial: "s", Result: "failed:x"}}); err != nil {
		t.Fatal(err)
	}
	rs, err = s.Releases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	wantIDs := []keychain.ReleaseID{rid(7), rid(9), rid(8), rid(10)}
	if len(rs) != len(wantIDs) {
		t.Fatalf("Releases returned %d, want %d", len(rs), len(wantIDs))
	}
	for i, r := range rs {
		if r.ID != wantIDs[i] {
			t.Errorf("Releases[%d] = %v, want %v (oldest first)", i, r.ID, wantIDs[i])
		}
	}
	want := NewRelease(rid(9), t0.Add(time.Hour))
	want.Failed = 1
	if diff := diffRelease(rs[1], want); diff != "" {
		t.Errorf("Releases[1]: %s", diff)
	}
}

func testTargets(t *testing.T, s updater.Store) {
	ctx := t.Context()
	id := rid(1)
	if err := s.PutRelease(ctx, NewRelease(id, t0)); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Targets(ctx, id); err != nil || len(got) != 0 {
		t.Fatalf("Targets of a new release = %q, %v; want none", got, err)
	}
	if err := s.AddTargets(ctx, id, []string{"q", "b", "q", "a"}); err != nil {
		t.Fatal(err)
	}
	if err := s.AddTargets(ctx, id, []string{"b", "c", "A"}); err != nil {
		t.Fatal(err)
	}
	if err := s.AddTargets(ctx, id, nil); err != nil {
		t.Fatal(err)
	}
	got, err := s.Targets(ctx, id)
	if want := []string{"A", "a", "b", "c", "q"}; err != nil || !slices.Equal(got, want) {
		t.Errorf("Targets = %q, %v; want %q", got, err, want)
	}
	// Targets are per release.
	if err := s.PutRelease(ctx, NewRelease(rid(2), t0)); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Targets(ctx, rid(2)); err != nil || len(got) != 0 {
		t.Errorf("Targets of another release = %q, %v; want none", got, err)
	}
}

func testRemoveTarget(t *testing.T, s updater.Store) {
	ctx := t.Context()
	id := rid(1)
	r := NewRelease(id, t0)
	if err := s.PutRelease(ctx, r); err != nil {
		t.Fatal(err)
	}
	if err := s.AddTargets(ctx, id, []string{"a", "b", "c", "d"}); err != nil {
		t.Fatal(err)
	}
	if err := s.RecordResults(ctx, id, []updater.Result{{Serial: "a", Result: updater.ResultInstalled}, {Serial: "b", Result: "failed:rollback"}}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		serial            string
		was               bool
		installed, failed int
		targets           []string
	}{
		{"a", true, 0, 1, []string{"b", "c", "d"}}, // an install leaves the counts
		{"b", true, 0, 0, []string{"c", "d"}},      // and a failure
		{"c", true, 0, 0, []string{"d"}},           // no result: the counts stay
		{"c", false, 0, 0, []string{"d"}},          // not a target any more
		{"x", false, 0, 0, []string{"d"}},
	} {
		was, err := s.RemoveTarget(ctx, id, c.serial)
		if err != nil || was != c.was {
			t.Fatalf("RemoveTarget(%s) = %v, %v; want %v", c.serial, was, err, c.was)
		}
		r.Installed, r.Failed = c.installed, c.failed
		r.InstallTimes = []int{1} // the curve keeps a removed target's install
		checkRelease(t, s, r)
		if got, err := s.Targets(ctx, id); err != nil || !slices.Equal(got, c.targets) {
			t.Fatalf("Targets after removing %s = %q, %v; want %q", c.serial, got, err, c.targets)
		}
	}
	if got, err := s.Results(ctx, id, []string{"a", "b"}); err != nil || !slices.Equal(got, []string{updater.ResultNone, updater.ResultNone}) {
		t.Fatalf("Results of removed targets = %q, %v; want none", got, err)
	}
}

// testInstallTimes: a first install counts in the bucket of its Took, once; a repeated
// install, a failure and an unknown time (negative Took) count in none; a later
// PutRelease keeps the counts.
func testInstallTimes(t *testing.T, s updater.Store) {
	ctx := t.Context()
	id := rid(1)
	r := NewRelease(id, t0)
	if err := s.PutRelease(ctx, r); err != nil {
		t.Fatal(err)
	}
	last := len(protocol.InstallTimeBounds)
	rs := []updater.Result{
		{Serial: "a", Result: updater.ResultInstalled, Took: 3 * time.Second},                        // bucket 0 (5 s)
		{Serial: "b", Result: updater.ResultInstalled, Took: 5 * time.Second},                        // 0: bounds are inclusive
		{Serial: "c", Result: updater.ResultInstalled, Took: 5*time.Second + 1},                      // 1 (10 s)
		{Serial: "d", Result: updater.ResultInstalled, Took: 45 * 24 * time.Hour},                    // beyond the last bound
		{Serial: "e", Result: updater.ResultInstalled, Took: -1},                                     // no time: no bucket
		{Serial: "f", Result: "failed:hash_mismatch", Took: time.Second},                             // not an install
		{Serial: "a", Result: updater.ResultInstalled, Took: time.Hour},                              // repeated: counted once
		{Serial: "f", Result: updater.ResultInstalled, Took: protocol.InstallTimeBounds[last-1] - 1}, // failed -> installed
	}
	if err := s.RecordResults(ctx, id, rs); err != nil {
		t.Fatal(err)
	}
	r.Installed = 6
	r.InstallTimes = make([]int, last+1)
	r.InstallTimes[0], r.InstallTimes[1], r.InstallTimes[last-1], r.InstallTimes[last] = 2, 1, 1, 1
	checkRelease(t, s, r)
	r.Label = "relabelled"
	if err := s.PutRelease(ctx, r); err != nil {
		t.Fatal(err)
	}
	checkRelease(t, s, r)
}

func testRecordResults(t *testing.T, s updater.Store) {
	ctx := t.Context()
	id := rid(1)
	r := NewRelease(id, t0)
	if err := s.PutRelease(ctx, r); err != nil {
		t.Fatal(err)
	}
	step := func(rs []updater.Result, installed, failed int) {
		t.Helper()
		if err := s.RecordResults(ctx, id, rs); err != nil {
			t.Fatalf("RecordResults(%v): %v", rs, err)
		}
		r.Installed, r.Failed = installed, failed
		r.InstallTimes = []int{installed} // every Took is 0: the first bucket
		checkRelease(t, s, r)
	}
	step([]updater.Result{{Serial: "a", Result: updater.ResultInstalled}}, 1, 0)
	step([]updater.Result{{Serial: "a", Result: updater.ResultInstalled}}, 1, 0)                       // repeated
	step([]updater.Result{{Serial: "b", Result: "failed:hash_mismatch"}}, 1, 1)                        // first failure
	step([]updater.Result{{Serial: "b", Result: "failed:unwrap_failed"}}, 1, 1)                        // repeated failure counts once
	step([]updater.Result{{Serial: "b", Result: updater.ResultInstalled}}, 2, 0)                       // failed -> installed
	step([]updater.Result{{Serial: "a", Result: "failed:stale_key"}}, 2, 0)                            // installed is final
	step([]updater.Result{{Serial: "c", Result: "failed:x"}, {Serial: "c", Result: "failed:y"}}, 2, 1) // in one batch
	step([]updater.Result{{Serial: "d", Result: "failed:x"}, {Serial: "d", Result: updater.ResultInstalled}, {Serial: "e", Result: "failed:z"}}, 3, 2)

	got, err := s.Results(ctx, id, []string{"a", "b", "c", "d", "e", "none", "a"})
	want := []string{"installed", "installed", "failed:y", "installed", "failed:z", updater.ResultNone, "installed"}
	if err != nil || !slices.Equal(got, want) {
		t.Errorf("Results = %q, %v; want %q", got, err, want)
	}

	// Results are per release.
	if err := s.PutRelease(ctx, NewRelease(rid(2), t0)); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Results(ctx, rid(2), []string{"a"}); err != nil || !slices.Equal(got, []string{updater.ResultNone}) {
		t.Errorf("Results of another release = %q, %v", got, err)
	}

	// A malformed result is rejected and nothing of its batch is recorded.
	for _, bad := range []string{"", "ok", "failedx", "installed:"} {
		err := s.RecordResults(ctx, id, []updater.Result{{Serial: "f", Result: "failed:x"}, {Serial: "g", Result: bad}})
		if err == nil {
			t.Errorf("RecordResults with result %q: no error", bad)
		}
	}
	checkRelease(t, s, r)
	if got, err := s.Results(ctx, id, []string{"f"}); err != nil || got[0] != updater.ResultNone {
		t.Errorf("Results(f) after a rejected batch = %q, %v; want none", got, err)
	}
}

func testRecordResultsConcurrent(t *testing.T, s updater.Store) {
	const workers, perWorker = 20, 25
	id := rid(1)
	if err := s.PutRelease(t.Context(), NewRelease(id, t0)); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 2*workers)
	for w := range workers {
		wg.Go(func() {
			var rs []updater.Result
			for i := range perWorker {
				res := updater.ResultInstalled
				if i%5 == 0 {
					res = "failed:x"
				}
				rs = append(rs, updater.Result{Serial: fmt.Sprintf("w%d-%d", w, i), Result: res})
			}
			// And every worker reports the same two devices: one fails, one fails then installs.
			rs = append(rs, updater.Result{Serial: "shared-failed", Result: fmt.Sprintf("failed:w%d", w)},
				updater.Result{Serial: "shared-installed", Result: "failed:x"})
			if err := s.RecordResults(context.Background(), id, rs); err != nil {
				errs <- err
			}
			if err := s.RecordResults(context.Background(), id, []updater.Result{{Serial: "shared-installed", Result: updater.ResultInstalled}}); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("RecordResults: %v", err)
	}
	r, err := s.Release(t.Context(), id)
	if err != nil {
		t.Fatal(err)
	}
	wantFailed := workers*perWorker/5 + 1
	wantInstalled := workers*perWorker - workers*perWorker/5 + 1
	if r.Installed != wantInstalled || r.Failed != wantFailed {
		t.Errorf("counts = %d installed, %d failed; want %d, %d", r.Installed, r.Failed, wantInstalled, wantFailed)
	}
}

func testUnknownRelease(t *testing.T, s updater.Store) {
	ctx := t.Context()
	id := rid(99)
	check := func(method string, err error) {
		t.Helper()
		if !errors.Is(err, updater.ErrNotFound) {
			t.Errorf("%s of an unknown release: error %v, want one wrapping ErrNotFound", method, err)
		}
	}
	_, err := s.Release(ctx, id)
	check("Release", err)
	check("AddTargets", s.AddTargets(ctx, id, []string{"a"}))
	_, err = s.Targets(ctx, id)
	check("Targets", err)
	_, err = s.RemoveTarget(ctx, id, "a")
	check("RemoveTarget", err)
	check("RecordResults", s.RecordResults(ctx, id, []updater.Result{{Serial: "a", Result: updater.ResultInstalled}}))
	_, err = s.Results(ctx, id, []string{"a"})
	check("Results", err)
	if rs, err := s.Releases(ctx); err != nil || len(rs) != 0 {
		t.Errorf("Releases after calls for an unknown release = %v, %v; want none", rs, err)
	}
}
