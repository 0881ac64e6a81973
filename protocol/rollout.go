package protocol

import (
	"bytes"
	"crypto/sha256"
	"math"
	"slices"
	"strconv"
	"strings"

	"github.com/sealcast/sealcast/keychain"
)

// Rollout reasons a release was paused (ReleaseStatus.PauseReason).
const (
	PausedByOperator  = "operator"
	PausedByThreshold = "failure_threshold"
	maxWaves          = 32
)

// WaveSizes turns wave specs ([SC-12.5]) into cumulative wave sizes for n targets: "P%"
// (0 < P <= 100, rounded up), a count, or "all". Sizes never go down and the last wave
// always holds every target, so "1%,10%" means 1 %, 10 %, then all.
func WaveSizes(specs []string, n int) ([]int, error) {
	if len(specs) > maxWaves {
		return nil, Errorf(ErrBadRequest, "%d waves; at most %d", len(specs), maxWaves)
	}
	var sizes []int
	prev := 0
	for _, s := range specs {
		var size int
		switch {
		case s == "all":
			size = n
		case strings.HasSuffix(s, "%"):
			p, err := strconv.ParseFloat(strings.TrimSuffix(s, "%"), 64)
			if err != nil || p <= 0 || p > 100 {
				return nil, Errorf(ErrBadRequest, "wave %q: a percentage must be above 0 and at most 100", s)
			}
			size = int(math.Ceil(p * float64(n) / 100))
		default:
			c, err := strconv.Atoi(s)
			if err != nil || c <= 0 {
				return nil, Errorf(ErrBadRequest, "wave %q: give a percentage such as 10%%, a count of devices, or all", s)
			}
			size = c
		}
		size = min(max(size, 1), n)
		if size < prev {
			return nil, Errorf(ErrBadRequest, "wave %q is smaller than the wave before it: waves are cumulative", s)
		}
		if size > prev || len(sizes) == 0 {
			sizes = append(sizes, size)
		}
		prev = size
	}
	if len(sizes) == 0 || sizes[len(sizes)-1] < n {
		sizes = append(sizes, n)
	}
	return sizes, nil
}

// RolloutOrder returns serials in the order waves take them ([SC-12.5]): by
// SHA256(release_id || serial), then by serial. It differs between releases, so the same
// devices are not always first.
func RolloutOrder(id keychain.ReleaseID, serials []string) []string {
	type keyed struct {
		h [32]byte
		s string
	}
	ks := make([]keyed, len(serials))
	for i, s := range serials {
		ks[i] = keyed{sha256.Sum256(append(id[:], s...)), s}
	}
	slices.SortFunc(ks, func(a, b keyed) int {
		if c := bytes.Compare(a.h[:], b.h[:]); c != 0 {
			return c
		}
		return strings.Compare(a.s, b.s)
	})
	out := make([]string, len(ks))
	for i, k := range ks {
		out[i] = k.s
	}
	return out
}

// FailureLimit reads a failure threshold ([SC-12.5]): "P%" of the devices in opened waves,
// or a count. It returns the largest number of counted failures allowed out of admitted.
func FailureLimit(spec string, admitted int) (int, error) {
	if spec == "" {
		return -1, nil // no threshold
	}
	if p, ok := strings.CutSuffix(spec, "%"); ok {
		f, err := strconv.ParseFloat(p, 64)
		if err != nil || f < 0 || f > 100 {
			return 0, Errorf(ErrBadRequest, "max_failures %q: a percentage from 0 to 100", spec)
		}
		return int(f * float64(admitted) / 100), nil
	}
	c, err := strconv.Atoi(spec)
	if err != nil || c < 0 {
		return 0, Errorf(ErrBadRequest, "max_failures %q: give a percentage such as 5%%, or a count", spec)
	}
	return c, nil
}

// CanaryPlan applies canaries to a rollout ([SC-12.5]): the canaries that are targets,
// in the order given and each once, form a first wave of their own ahead of the rollout
// order of the other targets, and every later wave holds at least them. It returns the
// order and the cumulative wave sizes.
func CanaryPlan(id keychain.ReleaseID, targets, canary []string, specs []string) ([]string, []int, error) {
	isTarget := make(map[string]bool, len(targets))
	for _, s := range targets {
		isTarget[s] = true
	}
	var first []string
	seen := map[string]bool{}
	for _, s := range canary {
		if isTarget[s] && !seen[s] {
			seen[s] = true
			first = append(first, s)
		}
	}
	var rest []string
	for _, s := range targets {
		if !seen[s] {
			rest = append(rest, s)
		}
	}
	sizes, err := WaveSizes(specs, len(targets))
	if err != nil || len(first) == 0 {
		return RolloutOrder(id, targets), sizes, err
	}
	order := append(first, RolloutOrder(id, rest)...)
	out := []int{len(first)}
	for _, s := range sizes {
		if s > out[len(out)-1] {
			out = append(out, s)
		}
	}
	return order, out, nil
}
