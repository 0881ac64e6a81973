package keychain

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"testing"
)

// chainOf returns K_0..K_L computed the slow way.
func chainOf(u UnitData, length uint32) []ChainKey {
	c := make([]ChainKey, length+1)
	c[0] = ChainKey(u)
	for i := uint32(1); i <= length; i++ {
		c[i] = Step(c[i-1])
	}
	return c
}

// TestTraversalMatchesChain walks whole chains, checking every key against the naive
// chain, the hash budget of every step, and that the state survives a round trip through
// MarshalBinary at every step.
func TestTraversalMatchesChain(t *testing.T) {
	u := UnitData{1, 2, 3}
	for k := 4; k <= 12; k++ {
		length := uint32(1) << k
		t.Run(fmt.Sprint(length), func(t *testing.T) {
			chain := chainOf(u, length)
			tr, err := NewTraversal(u, length)
			if err != nil {
				t.Fatal(err)
			}
			if tr.hashes != int(length)-1 {
				t.Errorf("setup took %d hashes, want %d", tr.hashes, length-1)
			}
			maxHashes := 0
			for n := length; n >= 1; n-- {
				if tr.Pos() != n {
					t.Fatalf("Pos() = %d, want %d", tr.Pos(), n)
				}
				if got := tr.Current(); got != chain[n] {
					t.Fatalf("Current() at %d differs from K_%d", n, n)
				}
				// Round-trip the state, as the server does between acks.
				b, _ := tr.MarshalBinary()
				var again Traversal
				if err := again.UnmarshalBinary(b); err != nil {
					t.Fatalf("UnmarshalBinary at %d: %v", n, err)
				}
				before := again.hashes
				if err := again.Advance(); err != nil {
					t.Fatalf("Advance at %d: %v", n, err)
				}
				maxHashes = max(maxHashes, again.hashes-before)
				tr = &again
			}
			if tr.Pos() != 0 {
				t.Errorf("after the walk Pos() = %d, want 0", tr.Pos())
			}
			if err := tr.Advance(); err == nil {
				t.Error("Advance past the end succeeded")
			}
			// Schoenmakers' bound: ceil(k/2) hashes per step.
			if limit := (k + 1) / 2; maxHashes > limit {
				t.Errorf("a step took %d hashes, over the bound of %d", maxHashes, limit)
			}
			t.Logf("L=%d: at most %d hashes per step, %d pebbles", length, maxHashes, k)
		})
	}
}

func TestTraversalSealing(t *testing.T) {
	root := RootSecret{9}
	u, _ := DeriveUnitData(root, "dev-1", 0)
	tr, _ := NewTraversal(u, 64)
	for range 5 {
		tr.Advance()
	}
	sealed, err := SealTraversal(root, "dev-1", 0, tr)
	if err != nil {
		t.Fatal(err)
	}
	state, _ := tr.MarshalBinary()
	if bytes.Contains(sealed, state[7:7+Size]) {
		t.Fatal("sealed state contains a pebble in the clear")
	}
	got, err := OpenTraversal(root, "dev-1", 0, sealed)
	if err != nil || got.Current() != tr.Current() || got.Pos() != tr.Pos() {
		t.Fatalf("OpenTraversal = %v, %v", got, err)
	}
	for _, c := range []struct {
		name   string
		root   RootSecret
		serial string
		epoch  uint32
	}{
		{"other root", RootSecret{8}, "dev-1", 0},
		{"other device", root, "dev-2", 0},
		{"other epoch", root, "dev-1", 1},
	} {
		if _, err := OpenTraversal(c.root, c.serial, c.epoch, sealed); !errors.Is(err, ErrAuth) {
			t.Errorf("%s: err = %v, want ErrAuth", c.name, err)
		}
	}
}

func TestTraversalRejectsBadState(t *testing.T) {
	tr, _ := NewTraversal(UnitData{}, 16)
	good, _ := tr.MarshalBinary()
	for i, b := range [][]byte{nil, good[:6], good[:len(good)-1], append(append([]byte{}, good...), 0)} {
		var x Traversal
		if err := x.UnmarshalBinary(b); !errors.Is(err, ErrMalformed) {
			t.Errorf("case %d: err = %v, want ErrMalformed", i, err)
		}
	}
	if _, err := NewTraversal(UnitData{}, 1000); !errors.Is(err, ErrInvalidChainLength) {
		t.Errorf("length 1000: err = %v", err)
	}
}

// TestTraversalSteps: Steps counts what the server spends: L-1 steps to set up, one for
// K_L (the only key not held as a pebble), at most ceil(k/2) per Advance after that, and
// nothing for decoding a sealed state.
func TestTraversalSteps(t *testing.T) {
	const length = 1024
	tr, err := NewTraversal(UnitData{9}, length)
	if err != nil {
		t.Fatal(err)
	}
	if got := tr.Steps(); got != length-1 {
		t.Fatalf("after NewTraversal: %d steps, want %d", got, length-1)
	}
	tr.Current()
	if got := tr.Steps(); got != length {
		t.Fatalf("after Current at L: %d steps, want %d", got, length)
	}
	for range 100 {
		before := tr.Steps()
		if err := tr.Advance(); err != nil {
			t.Fatal(err)
		}
		tr.Current()
		if d := tr.Steps() - before; d > 5 {
			t.Fatalf("an Advance and Current at %d took %d steps, over ceil(log2(L)/2) = 5", tr.Pos(), d)
		}
	}
	b, _ := tr.MarshalBinary()
	var again Traversal
	if err := again.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}
	if again.Steps() != 0 {
		t.Fatalf("a decoded traversal starts at %d steps, want 0", again.Steps())
	}
}

// TestStateSealerConcurrent: one StateSealer used from several goroutines at once (as the
// updater's workers do) seals and opens correctly, and interoperates with
// SealTraversal/OpenTraversal.
func TestStateSealerConcurrent(t *testing.T) {
	root := RootSecret{7}
	s := NewStateSealer(root)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			serial := fmt.Sprintf("dev-%d", g)
			tr, _ := NewTraversal(UnitData{byte(g)}, 16)
			for range 20 {
				sealed, err := s.Seal(serial, 3, tr)
				if err != nil {
					t.Error(err)
					return
				}
				got, err := OpenTraversal(root, serial, 3, sealed)
				if err != nil || got.Current() != tr.Current() {
					t.Errorf("%s: OpenTraversal of a StateSealer seal: %v", serial, err)
					return
				}
				again, _ := SealTraversal(root, serial, 3, got)
				if back, err := s.Open(serial, 3, again); err != nil || back.Pos() != tr.Pos() {
					t.Errorf("%s: StateSealer.Open of a SealTraversal seal: %v", serial, err)
					return
				}
				if _, err := s.Open("dev-other", 3, sealed); !errors.Is(err, ErrAuth) {
					t.Errorf("%s: opened as another device: %v", serial, err)
				}
			}
		}()
	}
	wg.Wait()
}
