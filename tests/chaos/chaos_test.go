package chaos

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/device/simulate"
	"github.com/sealcast/sealcast/internal/testkit/mqttproxy"
	"github.com/sealcast/sealcast/internal/testkit/redistest"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater"
	"github.com/sealcast/sealcast/updater/redisstore"
)

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		os.Exit(m.Run()) // TestChaos skips; nothing to build
	}
	dir, err := os.MkdirTemp("", "sealcast-chaos-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	sealcastBin, err = buildSealcast(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "chaos: building the sealcast binary:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// The scenario's shape. Chain length 16 keeps every key derivation in the checks cheap;
// releases use indices L and L-1 of it.
const (
	chainLength  = 16
	injectN      = 4  // devices whose acks are duplicated, forged and replayed
	corruptN     = 12 // devices behind the corrupting proxy
	dropFraction = 0.1
	// Release 1 (the warm-up) has two chunks, so that the simulator's connection drop,
	// which fires after chunk 1 when a later chunk follows, happens in release 2.
	warmSize, warmChunk = 2 << 10, 1 << 10
	mainSize, mainChunk = 64 << 10, 4 << 10
)

// Agent settings: short intervals so that recovery takes seconds, not minutes. The
// chunk timeout stays well above what a loaded machine needs to deliver a chunk: no fault
// here is recovered by a timeout, and an agent that reports a timeout retries only after
// a reconnect.
func agentOptions(o *simulate.Options) {
	o.TargetVersion = 2
	o.ChunkTimeout = 10 * time.Second
	o.AckResend, o.AckResendMax = 2*time.Second, 4*time.Second
	o.ReconnectMin, o.ReconnectMax = 100*time.Millisecond, 2*time.Second
	o.StartSpread = time.Second
	o.Logger = zerolog.Nop()
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// TestChaos updates a fleet twice while the server is killed, Redis restarts, devices
// drop their connections, chunks are corrupted in transit and acks are forged, replayed
// and duplicated; then it checks that nothing was installed twice, no counter moved twice,
// no chain index carried two keys, and the server counted exactly what was injected.
func TestChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("the fault suite runs a server process and a fleet; skipped under -short")
	}
	n := envInt("SEALCAST_CHAOS_DEVICES", 500)
	if n < injectN+corruptN+10 {
		t.Fatalf("SEALCAST_CHAOS_DEVICES=%d: need at least %d", n, injectN+corruptN+10)
	}
	began := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 160*time.Second)
	defer cancel()
	phase := func(format string, args ...any) {
		t.Logf("%6.1fs  %s", time.Since(began).Seconds(), fmt.Sprintf(format, args...))
	}

	// --- Real parts: Redis with its append-only file, the serve process, an operator
	// and an admin watcher that records keys, acks and receipts.
	// Redis gets a port below the ephemeral range too: it is bound again after its restart.
	redisArgs := []string{"--appendonly", "yes", "--appendfsync", "always"}
	rds, err := redistest.Launch(redistest.Need(t), t.TempDir(), portOf(t, freePort(t)), redisArgs...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rds.Stop)
	rdb := redis.NewClient(&redis.Options{Addr: rds.Addr, ClientName: "chaos-test"})
	defer rdb.Close()
	store := redisstore.New(rdb, redisstore.Options{})
	srv := startServe(t, rds.URL())
	phase("sealcast serve on %s (http %s), Redis on %s", srv.mqttAddr, srv.httpAddr, rds.Addr)
	op, err := operator.Dial(ctx, operator.Options{URL: srv.URL(), Username: "admin", Password: srv.adminPW, Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer op.Close()
	serials := make([]string, n)
	for i := range serials {
		serials[i] = fmt.Sprintf("chaos-%04d", i)
	}
	w := startWatcher(t, srv.URL(), srv.adminPW, serials)
	files, err := op.Provision(ctx, serials, chainLength)
	if err != nil {
		t.Fatal(err)
	}
	units := map[string]keychain.UnitData{}
	for _, f := range files {
		units[f.Serial] = keychain.UnitData(f.UnitData)
		if f.Seq != chainLength || f.Broker.URL != srv.URL() {
			t.Fatalf("device file of %s: seq %d, broker %s", f.Serial, f.Seq, f.Broker.URL)
		}
	}
	phase("provisioned %d devices, chain length %d", n, chainLength)

	// --- The corrupting proxy: once armed, it flips one byte of the first chunk of a
	// release other than the warm-up that it forwards to each device behind it.
	var (
		armed   atomic.Bool
		warmHex atomic.Value // string: the warm-up release id
		tmu     sync.Mutex
		flipped = map[string]int{}
	)
	proxy, err := mqttproxy.Start(mqttproxy.Options{Listen: "127.0.0.1:0", Target: srv.mqttAddr,
		Tamper: func(client, topic string, payload []byte) bool {
			if !armed.Load() || len(payload) == 0 || !strings.Contains(topic, "/chunks/") ||
				strings.Contains(topic, warmHex.Load().(string)) {
				return false
			}
			tmu.Lock()
			defer tmu.Unlock()
			if flipped[client] > 0 {
				return false
			}
			flipped[client]++
			payload[len(payload)/2] ^= 0x20
			return true
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer proxy.Close()

	// --- The fleet, in three groups that run side by side until each device confirmed
	// version 2.
	injectFiles := files[:injectN]
	corruptFiles := append([]protocol.DeviceFile(nil), files[injectN:injectN+corruptN]...)
	for i := range corruptFiles {
		corruptFiles[i].Broker.URL = "tcp://" + proxy.Addr()
	}
	mainFiles := files[injectN+corruptN:]
	rec := newRecorder()
	type group struct {
		name  string
		files []protocol.DeviceFile
		done  chan struct{}
		sum   simulate.Summary
		err   error
	}
	groups := []*group{
		{name: "inject", files: injectFiles},
		{name: "corrupt", files: corruptFiles},
		{name: "main", files: mainFiles},
	}
	simCtx, stopSim := context.WithCancel(ctx)
	defer stopSim()
	for i, g := range groups {
		g.done = make(chan struct{})
		o := simulate.Options{Devices: g.files, Seed: uint64(i + 1), OnEvent: rec.on}
		agentOptions(&o)
		if g.name == "main" {
			o.DropFraction = dropFraction
		}
		go func() {
			defer close(g.done)
			g.sum, g.err = simulate.Run(simCtx, o)
		}()
	}
	defer func() { // every group stops before the test returns
		stopSim()
		for _, g := range groups {
			<-g.done
		}
	}()
	waitGroup := func(g *group) {
		t.Helper()
		select {
		case <-g.done:
		case <-ctx.Done():
			t.Fatalf("group %s: devices did not all confirm version 2 in time: %v\n%s", g.name, ctx.Err(), rec.progress(n))
		}
		if g.err != nil {
			t.Fatalf("group %s: %v", g.name, g.err)
		}
	}

	// --- Release 1, the warm-up: no faults. Its acks are replayed later.
	rel1 := release(ctx, t, op, 1, warmSize, warmChunk)
	warmHex.Store(rel1.String())
	waitFor(ctx, t, "every device confirmed release 1", func() bool { return rec.confirmedCount(1) == n }, func() string { return rec.progress(n) })
	checkStore(ctx, t, store, serials, chainLength-1, 1)
	st1 := waitReleaseCompleted(ctx, t, op, rel1, n)
	phase("release 1 (%d bytes in %d chunks) installed and confirmed by all %d devices (last receipt %.1fs after the last install); every counter at %d",
		warmSize, st1.ChunkCount, n, rec.lag(1).Seconds(), chainLength-1)
	life1, err := srv.scrape(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if life1.int(mAccepted) != n {
		t.Fatalf("after release 1 the server counted %d accepted acks, want %d (%v)", life1.int(mAccepted), n, life1)
	}

	// --- Release 2, with faults.
	armed.Store(true)
	rel2 := release(ctx, t, op, 2, mainSize, mainChunk)
	phase("release 2 created: %d bytes in %d-byte chunks", mainSize, mainChunk)

	// Fault 1: kill -9 the server while most devices are still downloading: once a
	// fifth of the fleet installed release 2 and the server moved a first counter, and
	// once every corrupted chunk has reached its device (so no corruption is lost in the
	// crash).
	moved := 0
	waitFor(ctx, t, "a fifth of the fleet installed release 2, a counter moved and every proxied device got its corrupted chunk", func() bool {
		if rec.committedCount(2) < n/5 || rec.chunkBadTotal() < corruptN {
			return false
		}
		moved = countAt(ctx, t, store, serials, chainLength-2)
		return moved >= 1
	}, func() string {
		return fmt.Sprintf("%s; %d counters moved; proxy %+v", rec.progress(n), moved, proxy.Stats())
	})
	if m, err := srv.scrape(ctx); err == nil {
		life1 = m
	}
	srv.kill()
	atKill := rec.committedCount(2)
	// What the dead process moved is what Redis holds once it has run every command the
	// process sent before it died, i.e. once the process's connections are gone.
	var clients string
	waitFor(ctx, t, "Redis closed the dead server's connections", func() bool {
		clients, err = rdb.ClientList(ctx).Result()
		return err == nil && strings.Count(clients, "name=chaos-test ") == strings.Count(clients, "\n")
	}, func() string { return clients })
	movedAtKill := countAt(ctx, t, store, serials, chainLength-2)
	phase("killed sealcast serve (SIGKILL) with %d of %d devices installed, %d counters moved; last scrape of that lifetime: %v", atKill, n, movedAtKill, life1)
	srv.start()
	phase("sealcast serve restarted (lifetime 2) on the same data directory and Redis")

	// Fault 2: restart Redis once 60 % installed.
	waitFor(ctx, t, "60 % installed release 2", func() bool { return rec.committedCount(2) >= n*6/10 }, func() string { return rec.progress(n) })
	atRedis := rec.committedCount(2)
	movedAtRedis := countAt(ctx, t, store, serials, chainLength-2)
	rds.Kill()
	waitFor(ctx, t, "the server noticed that Redis is down", func() bool { return !srv.healthy() }, nil)
	rds2, err := redistest.Launch(redistest.Need(t), rds.Dir, portOf(t, rds.Addr), redisArgs...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rds2.Stop)
	waitFor(ctx, t, "the server reaches Redis again", srv.healthy, nil)
	phase("Redis killed and restarted from its append-only file with %d of %d devices installed, %d counters moved", atRedis, n, movedAtRedis)

	// Fault 3: duplicate, forged and replayed acks, published with the devices' own
	// credentials once their agents stopped, while the rest of the fleet is still
	// updating. Only the final server lifetime counts them, and nothing else there is
	// rejected, so the counts must be exact.
	waitGroup(groups[0])
	inj := injectAcks(ctx, t, srv, w, injectFiles, groups[0].sum.States, rel1, rel2)
	phase("injected into lifetime 2 with %d of %d devices installed: %d forged (bad MAC at the current index), %d stale (%d replayed from release 1, %d old acks with a flipped MAC byte), %d duplicates",
		rec.committedCount(2), n, inj.forged, inj.replayed+inj.flipped, inj.replayed, inj.flipped, inj.duplicates)
	waitFor(ctx, t, "the server rejected every injected ack", func() bool {
		m, err := srv.scrape(ctx)
		return err == nil && m.int(mRejected("forged")) >= inj.forged && m.int(mRejected("stale")) >= inj.replayed+inj.flipped
	}, nil)

	for _, g := range groups[1:] {
		waitGroup(g)
	}
	st2 := waitReleaseCompleted(ctx, t, op, rel2, n)
	phase("every device confirmed release 2 (%d chunks)", st2.ChunkCount)

	// Quiet phase: the fleet is stopped, so once the server has worked off the acks the
	// devices sent before they stopped, every duplicate is one we send.
	before := settled(ctx, t, srv)
	quietDup := 0
	for i, f := range injectFiles {
		raw, _ := w.ackFor(f.Serial, rel2)
		k := 1 + i%2
		seen := w.receiptCount(f.Serial)
		payloads := make([][]byte, k)
		for j := range payloads {
			payloads[j] = raw
		}
		if err := publishAs(ctx, srv.URL(), f, payloads...); err != nil {
			t.Fatal(err)
		}
		quietDup += k
		serial := f.Serial
		waitFor(ctx, t, "the receipt of "+serial+" re-published for each duplicate", func() bool { return w.receiptCount(serial) >= seen+k }, nil)
	}
	after := settled(ctx, t, srv)
	phase("quiet phase: %d duplicates sent; duplicates %d -> %d", quietDup, before.int(mDuplicate), after.int(mDuplicate))

	// --- Checks.
	// The server's counters in its final lifetime: exactly what was injected.
	if got := after.int(mDuplicate) - before.int(mDuplicate); got != quietDup {
		t.Errorf("quiet phase: %d duplicates counted, %d sent", got, quietDup)
	}
	if after.int(mAccepted) != before.int(mAccepted) {
		t.Errorf("quiet phase: duplicates moved counters: accepted %d -> %d", before.int(mAccepted), after.int(mAccepted))
	}
	if got := after.int(mRejected("forged")); got != inj.forged {
		t.Errorf("lifetime 2 rejected %d acks as forged, %d were injected (%v)", got, inj.forged, after)
	}
	if got := after.int(mRejected("stale")); got != inj.replayed+inj.flipped {
		t.Errorf("lifetime 2 rejected %d acks as stale, %d were injected (%v)", got, inj.replayed+inj.flipped, after)
	}
	for _, r := range []string{"malformed", "unknown_device", "unassigned", "internal"} {
		if got := after.int(mRejected(r)); got != 0 {
			t.Errorf("lifetime 2 rejected %d acks as %s; none were injected (%v)", got, r, after)
		}
	}
	if got := after.int(mDuplicate) - quietDup; got < inj.duplicates {
		t.Errorf("lifetime 2 counted %d duplicates before the quiet phase, fewer than the %d injected", got, inj.duplicates)
	}
	// Every counter the dead process had not moved, the second lifetime moved, once. One
	// window makes the count inexact, and the log shows when it opened: Redis died after
	// it had run (and synced) an Advance but before it replied, so the server counted no
	// acceptance and the device's re-sent ack became a duplicate.
	unsure := srv.failedAdvances(2)
	if got, want := after.int(mAccepted), n-movedAtKill; got > want || got < want-unsure {
		t.Errorf("lifetime 2 accepted %d acks; %d devices were still at %d when lifetime 1 died, and %d acks met a failed Advance (%v)", got, want, chainLength-1, unsure, after)
	}
	if got := after.int(mShed); got != 0 {
		t.Errorf("lifetime 2 shed %d acks", got)
	}
	if got := after.int(mReports); got != 0 {
		t.Errorf("lifetime 2 recorded %d failure reports: %s", got, rec.codes())
	}

	// The store: every counter moved exactly once per release, each device's record says
	// it installed; both releases complete.
	checkStore(ctx, t, store, serials, chainLength-2, 2)
	if devs, err := store.Devices(ctx, serials); err == nil {
		for _, d := range devs {
			if d.State != protocol.DeviceInstalled || d.LastResult != "ok" || len(d.Assigned) != 0 {
				t.Errorf("store: %s is %s, last result %q, %d ids still assigned; want installed, ok, none", d.Serial, d.State, d.LastResult, len(d.Assigned))
			}
		}
	}
	for _, id := range []keychain.ReleaseID{rel1, rel2} {
		r, err := store.Release(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if r.State != protocol.ReleaseCompleted || r.Installed != n || r.Failed != 0 {
			t.Errorf("release %s in the store: %s, %d installed, %d failed; want completed, %d, 0", id, r.State, r.Installed, r.Failed, n)
		}
	}

	// The devices: one install per release, vaults at L-2 with version 2 confirmed.
	states := map[string]device.State{}
	var total device.Stats
	for _, g := range groups {
		for _, s := range g.sum.States {
			states[s.Serial] = s
		}
		addStats(&total, g.sum.Stats)
		if g.sum.Confirmed != len(g.files) || g.sum.Failed != 0 {
			t.Errorf("group %s: %d of %d confirmed, %d failed %v", g.name, g.sum.Confirmed, len(g.files), g.sum.Failed, g.sum.Codes)
		}
	}
	for _, s := range serials {
		st, ok := states[s]
		if !ok || st.Seq != chainLength-2 || st.Version != 2 || !st.LastAckConfirmed {
			t.Errorf("vault of %s: D=%d version %d confirmed %v; want D=%d, version 2, confirmed", s, st.Seq, st.Version, st.LastAckConfirmed, chainLength-2)
		}
		for _, id := range []keychain.ReleaseID{rel1, rel2} {
			if c := rec.commits(s, id); c != 1 {
				t.Errorf("%s installed release %s %d times, want once", s, id, c)
			}
		}
	}
	var drops int
	for _, g := range groups {
		drops += g.sum.Drops
	}
	if drops == 0 || int(total.Disconnects) < drops {
		t.Errorf("%d devices were to drop their connection mid-download; the agents saw %d disconnects", drops, total.Disconnects)
	}
	if int(total.Installs) != 2*n {
		t.Errorf("the installers committed %d images, want %d", total.Installs, 2*n)
	}

	// Corruption: each device behind the proxy got one flipped chunk, rejected it, fetched
	// it again and installed; no other device saw a bad chunk.
	ps := proxy.Stats()
	tmu.Lock()
	for _, f := range corruptFiles {
		if flipped[f.Serial] != 1 || rec.chunkBad(f.Serial) != 1 {
			t.Errorf("%s: %d chunks corrupted in transit, %d failed authentication on the device; want 1 and 1", f.Serial, flipped[f.Serial], rec.chunkBad(f.Serial))
		}
	}
	tmu.Unlock()
	if ps.Tampered != corruptN || total.ChunksBad != corruptN || rec.chunkBadTotal() != corruptN {
		t.Errorf("%d chunks corrupted in transit, %d failed authentication on devices (%d seen in events); want %d", ps.Tampered, total.ChunksBad, rec.chunkBadTotal(), corruptN)
	}

	// Key indices [SC-10.2]: every (serial, epoch, seq) carried one release and one
	// content key. A restart may wrap again at the same index: then the key message
	// differs (fresh nonce) but must carry the same release, manifest and content key.
	idx, err := w.openKeys(units)
	if err != nil {
		t.Fatal(err)
	}
	rewrapped := 0
	keyOf := map[keychain.ReleaseID]map[[keychain.Size]byte]bool{rel1: {}, rel2: {}}
	for _, s := range serials {
		for seq, id := range map[uint32]keychain.ReleaseID{chainLength: rel1, chainLength - 1: rel2} {
			wr := idx[keyIndex{s, 0, seq}]
			if wr == nil {
				t.Errorf("no key message of %s at index %d was seen", s, seq)
				continue
			}
			if len(wr.ids) != 1 || !wr.ids[id] || len(wr.secrets) != 1 || len(wr.digests) != 1 {
				t.Errorf("%s index %d carried %d release ids, %d content keys, %d manifest digests; want release %s once", s, seq, len(wr.ids), len(wr.secrets), len(wr.digests), id)
			}
			for k := range wr.secrets {
				keyOf[id][k] = true
			}
			if wr.copies > 1 {
				rewrapped++
			}
		}
	}
	for ix := range idx {
		if ix.seq < chainLength-1 {
			t.Errorf("a key message for %s at index %d: nothing should be wrapped there", ix.serial, ix.seq)
		}
	}
	for id, ks := range keyOf {
		if len(ks) != 1 {
			t.Errorf("release %s was wrapped with %d different content keys", id, len(ks))
		}
	}
	// The acks the watcher saw, and each device's last ack from its vault: one release
	// per index too. The watcher can miss an ack that the server accepted: mochi
	// acknowledges a PUBLISH before it delivers it, so a SIGKILL of the broker in between
	// loses the deliveries not yet made (and stored), while the updater, served first,
	// already sent the receipt that stops the device from sending it again. The vault
	// holds that ack, so every device's acks are known from one of the two.
	ackIdx := w.ackIndex(units)
	fromVaults := 0
	for _, s := range serials {
		st := states[s]
		a, err := keychain.ParseAck(st.LastAck)
		if err != nil || a.Kind != keychain.AckInstalled || keychain.VerifyAck(st.LastAck, keychain.Key(units[s], a.Seq), s) != nil {
			t.Errorf("vault of %s holds no valid last ack: %v", s, err)
			continue
		}
		ix := keyIndex{s, a.Epoch, a.Seq}
		if ackIdx[ix] == nil {
			ackIdx[ix] = map[keychain.ReleaseID]bool{}
		}
		if !ackIdx[ix][a.ID] {
			fromVaults++
		}
		ackIdx[ix][a.ID] = true
	}
	for ix, ids := range ackIdx {
		if len(ids) != 1 {
			t.Errorf("acks of %s at index %d name %d releases", ix.serial, ix.seq, len(ids))
		}
	}
	for _, s := range serials {
		if a1, a2 := ackIdx[keyIndex{s, 0, chainLength}][rel1], ackIdx[keyIndex{s, 0, chainLength - 1}][rel2]; !a1 || !a2 {
			t.Errorf("no ack of %s is known (watcher or vault): release 1 %v, release 2 %v", s, a1, a2)
		}
	}
	if fromVaults > 0 {
		t.Logf("  %d acks of release 2 known only from the vaults: the watcher lost them in the SIGKILL", fromVaults)
	}

	// The serve process stops cleanly after all this.
	if err := srv.terminate(); err != nil {
		t.Errorf("sealcast serve did not exit cleanly on SIGTERM: %v\n%s", err, srv.tail(40))
	}

	t.Logf("summary after %.1fs:", time.Since(began).Seconds())
	t.Logf("  devices %d (inject %d, behind proxy %d, main %d); releases: %d+%d chunks", n, injectN, corruptN, len(mainFiles), st1.ChunkCount, st2.ChunkCount)
	t.Logf("  injected: SIGKILL of serve at %d/%d installed (%d counters moved), Redis restart at %d/%d installed (%d moved), %d connection drops, %d corrupted chunks, %d forged, %d replayed, %d flipped-MAC, %d+%d duplicate acks",
		atKill, n, movedAtKill, atRedis, n, movedAtRedis, drops, ps.Tampered, inj.forged, inj.replayed, inj.flipped, inj.duplicates, quietDup)
	t.Logf("  devices: %d installs, %d chunk fetches, %d chunks failed authentication, %d disconnects, %d connects, %d acks sent (with re-sends), %d reports",
		total.Installs, total.ChunkFetches, total.ChunksBad, total.Disconnects, total.Connects, total.AcksSent, total.ReportsSent)
	t.Logf("  key messages: %d indices seen, %d re-wrapped at the same index after the restart (same release and content key); watcher connections made %d (%d shards)", len(idx), rewrapped, w.connections(), len(w.cs))
	t.Logf("  server lifetime 1 (last scrape before SIGKILL): %v", life1)
	t.Logf("  server lifetime 2 (final): %v; %d acks met a failed Advance while Redis restarted", after, unsure)
}

// settled scrapes /metrics until the ack counters have not changed for two seconds:
// the server has processed every ack it had received.
func settled(ctx context.Context, t testing.TB, srv *serveProc) metrics {
	t.Helper()
	var last metrics
	var since time.Time
	sum := func(m metrics) int {
		n := m.int(mAccepted) + m.int(mDuplicate) + m.int(mReports) + m.int(mShed)
		for _, r := range rejectReasons {
			n += m.int(mRejected(r))
		}
		return n
	}
	waitFor(ctx, t, "the server's ack counters settle", func() bool {
		m, err := srv.scrape(ctx)
		if err != nil {
			return false
		}
		if last == nil || sum(m) != sum(last) {
			last, since = m, time.Now()
			return false
		}
		return time.Since(since) >= 2*time.Second
	}, func() string { return last.String() })
	return last
}

func portOf(t testing.TB, addr string) int {
	t.Helper()
	i := strings.LastIndexByte(addr, ':')
	p, err := strconv.Atoi(addr[i+1:])
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func addStats(dst *device.Stats, s device.Stats) {
	dst.Connects += s.Connects
	dst.Disconnects += s.Disconnects
	dst.ChunkFetches += s.ChunkFetches
	dst.ChunksBad += s.ChunksBad
	dst.Installs += s.Installs
	dst.AcksSent += s.AcksSent
	dst.ReportsSent += s.ReportsSent
	dst.Confirmed += s.Confirmed
}

// waitFor polls cond every 100 ms until it holds, failing the test at ctx's deadline
// with what describe says about the state.
func waitFor(ctx context.Context, t testing.TB, what string, cond func() bool, describe func() string) {
	t.Helper()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			msg := ""
			if describe != nil {
				msg = ": " + describe()
			}
			t.Fatalf("waiting until %s: %v%s", what, ctx.Err(), msg)
		case <-tick.C:
		}
	}
}

// release uploads a random image and releases it to every device.
func release(ctx context.Context, t testing.TB, op *operator.Client, version uint64, size int, chunk uint32) keychain.ReleaseID {
	t.Helper()
	img := make([]byte, size)
	r := rand.New(rand.NewPCG(version, 77))
	for i := range img {
		img[i] = byte(r.Uint32())
	}
	res, err := op.Release(ctx, bytes.NewReader(img), int64(size), protocol.ReleaseCreateArgs{
		Version: version, All: true, ChunkSize: chunk, Label: fmt.Sprintf("chaos v%d", version)})
	if err != nil {
		t.Fatalf("release %d: %v", version, err)
	}
	return res.Release
}

// waitReleaseCompleted polls release.get until the release is completed.
func waitReleaseCompleted(ctx context.Context, t testing.TB, op *operator.Client, id keychain.ReleaseID, n int) *protocol.ReleaseStatus {
	t.Helper()
	var st *protocol.ReleaseStatus
	waitFor(ctx, t, "release "+id.String()+" is completed", func() bool {
		s, err := op.ReleaseStatus(ctx, id)
		if err != nil {
			return false
		}
		st = s
		return s.State == protocol.ReleaseCompleted
	}, func() string { return fmt.Sprintf("%+v", st) })
	if st.Installed != n || st.Failed != 0 || st.Targets != n {
		t.Fatalf("release %s completed with %d of %d targets installed, %d failed", id, st.Installed, st.Targets, st.Failed)
	}
	return st
}

// checkStore asserts that every device's counter is at seq with version installed.
func checkStore(ctx context.Context, t testing.TB, s updater.Store, serials []string, seq uint32, version uint64) {
	t.Helper()
	devs, err := s.Devices(ctx, serials)
	if err != nil {
		t.Fatal(err)
	}
	bad := 0
	for i, d := range devs {
		if d == nil || d.Epoch != 0 || d.Seq != seq || d.Version != version {
			if bad++; bad <= 5 {
				t.Errorf("store: %s is %+v; want epoch 0, seq %d, version %d", serials[i], d, seq, version)
			}
		}
	}
	if bad > 0 {
		t.Fatalf("store: %d of %d devices not at seq %d, version %d", bad, len(serials), seq, version)
	}
}

// countAt counts the devices whose counter is at seq.
func countAt(ctx context.Context, t testing.TB, s updater.Store, serials []string, seq uint32) int {
	t.Helper()
	devs, err := s.Devices(ctx, serials)
	if err != nil {
		t.Fatal(err)
	}
	c := 0
	for _, d := range devs {
		if d != nil && d.Seq == seq {
			c++
		}
	}
	return c
}

// injected counts the acks injectAcks published, by what the server must do with them.
type injected struct {
	forged     int // a bad MAC at the device's current index: rejected as forged
	replayed   int // the device's release-1 ack: rejected as stale
	flipped    int // the device's release-2 ack with one MAC byte flipped: rejected as stale
	duplicates int // the device's release-2 ack again: answered as a duplicate
}

// injectAcks publishes, as each stopped inject device, acks the server must not act on.
func injectAcks(ctx context.Context, t testing.TB, srv *serveProc, w *watcher, files []protocol.DeviceFile, states []device.State, rel1, rel2 keychain.ReleaseID) injected {
	t.Helper()
	var inj injected
	for i, f := range files {
		old, ok1 := w.ackFor(f.Serial, rel1)
		cur, ok2 := w.ackFor(f.Serial, rel2)
		if a, err := keychain.ParseAck(states[i].LastAck); !ok2 && err == nil && a.ID == rel2 {
			// The broker died with serve: an ack it took just before, and the re-sends
			// before the watcher subscribed again, can escape the watcher. The device's
			// own vault holds the ack it sent.
			cur, ok2 = states[i].LastAck, true
		}
		if !ok1 || !ok2 {
			t.Fatalf("the watcher did not capture the acks of %s (release 1: %v, release 2: %v)", f.Serial, ok1, ok2)
		}
		if !bytes.Equal(states[i].LastAck, cur) {
			t.Fatalf("the captured release-2 ack of %s is not the one in its vault", f.Serial)
		}
		var payloads [][]byte
		// Forged: a well-formed ack at the index the server expects next (L-2), for a
		// release that does not exist, under a key that is not the device's.
		for j := 0; j < 1+i%2; j++ {
			var id keychain.ReleaseID
			id[0], id[1] = byte(i), byte(j)
			var wrong keychain.ChainKey
			wrong[0] = byte(j + 1)
			a := keychain.Ack{Kind: keychain.AckInstalled, Epoch: 0, Seq: chainLength - 2, ID: id, Version: 3, DeviceSeq: chainLength - 3}
			raw, err := a.Seal(wrong, f.Serial)
			if err != nil {
				t.Fatal(err)
			}
			payloads = append(payloads, raw)
			inj.forged++
		}
		flip := append([]byte(nil), cur...)
		flip[len(flip)-1] ^= 1
		payloads = append(payloads, old, flip, cur)
		inj.replayed++
		inj.flipped++
		inj.duplicates++
		if err := publishAs(ctx, srv.URL(), f, payloads...); err != nil {
			t.Fatal(err)
		}
	}
	return inj
}

// recorder counts the agents' events; OnEvent calls it from every agent goroutine.
type recorder struct {
	mu        sync.Mutex
	installs  map[string]map[keychain.ReleaseID]int
	confirmed map[string]uint64 // highest confirmed version
	byVersion map[uint64]int    // devices that confirmed at least this version
	committed map[uint64]int    // installs by version
	bad       map[string]int
	failures  map[string]int // report codes
	// last install and last first-confirmation of each version
	lastCommit, lastConfirm map[uint64]time.Time
}

func newRecorder() *recorder {
	return &recorder{installs: map[string]map[keychain.ReleaseID]int{}, confirmed: map[string]uint64{},
		byVersion: map[uint64]int{}, committed: map[uint64]int{}, bad: map[string]int{}, failures: map[string]int{},
		lastCommit: map[uint64]time.Time{}, lastConfirm: map[uint64]time.Time{}}
}

func (r *recorder) on(e device.Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch e.Kind {
	case device.EventCommitted:
		m := r.installs[e.Serial]
		if m == nil {
			m = map[keychain.ReleaseID]int{}
			r.installs[e.Serial] = m
		}
		m[e.Release]++
		r.committed[e.Version]++
		r.lastCommit[e.Version] = e.Time
	case device.EventConfirmed:
		for v := r.confirmed[e.Serial] + 1; v <= e.Version; v++ {
			r.byVersion[v]++
			r.lastConfirm[v] = e.Time
		}
		r.confirmed[e.Serial] = max(r.confirmed[e.Serial], e.Version)
	case device.EventChunkBad:
		r.bad[e.Serial]++
	case device.EventFailed:
		r.failures[e.Code.String()]++
	}
}

func (r *recorder) confirmedCount(v uint64) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.byVersion[v]
}

func (r *recorder) committedCount(v uint64) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.committed[v]
}

func (r *recorder) commits(serial string, id keychain.ReleaseID) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.installs[serial][id]
}

func (r *recorder) chunkBad(serial string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.bad[serial]
}

func (r *recorder) chunkBadTotal() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, c := range r.bad {
		n += c
	}
	return n
}

// lag is the time from the last install of version v to its last confirmation: how long
// the server took to answer the last acks.
func (r *recorder) lag(v uint64) time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lastConfirm[v].Sub(r.lastCommit[v])
}

func (r *recorder) codes() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return fmt.Sprint(r.failures)
}

func (r *recorder) progress(n int) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return fmt.Sprintf("of %d devices: %d confirmed v1, %d confirmed v2; installs v1 %d, v2 %d; %d chunks failed authentication; failures %v",
		n, r.byVersion[1], r.byVersion[2], r.committed[1], r.committed[2], len(r.bad), r.failures)
}
