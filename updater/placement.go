package updater

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// batchSize is how many devices one store round trip and one publish burst cover.
const batchSize = 512

// placer decides what is wrapped for which device at which index, records it and
// publishes it: the fan-out of a release to its targets, and what a device sees next
// once it has moved ([SC-10.2]). It owns the fan-out goroutines.
type placer struct {
	store   Store
	bus     Bus
	keys    *keys
	runs    *registry
	status  *statusPublisher
	stats   *counters
	log     zerolog.Logger
	workers int
	// acksOnly: this updater's view of the releases may be behind the store's; it is
	// read again before a key topic is cleared.
	acksOnly bool

	ctx  context.Context // ends every fan-out at close
	stop context.CancelFunc
	wg   sync.WaitGroup
}

// init readies a placer built with its fields set.
func (p *placer) init() *placer {
	p.ctx, p.stop = context.WithCancel(context.Background())
	return p
}

// close stops every fan-out and waits for them.
func (p *placer) close() {
	p.stop()
	p.wg.Wait()
}

// start wraps the release's content key for every target that has not installed it, in
// the background, until the fan-out is done, halt is called, or close.
func (p *placer) start(r *run) {
	ctx, cancel := context.WithCancel(p.ctx)
	r.cancel = cancel
	r.done = make(chan struct{})
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		defer close(r.done)
		defer cancel()
		start := time.Now()
		n, err := p.fanout(ctx, r)
		ev := p.log.Info()
		if err != nil && ctx.Err() == nil {
			ev = p.log.Error().Err(err)
		}
		ev.Str("release", r.release().ID.String()).Int("wrapped", n).Dur("took", time.Since(start)).Msg("key fan-out finished")
	}()
}

// halt stops the release's fan-out, if one runs, and waits for it to end.
func (p *placer) halt(r *run) {
	if r.cancel != nil {
		r.cancel()
		<-r.done
	}
}

// fanout wraps for all targets in batches, on the workers' goroutines.
func (p *placer) fanout(ctx context.Context, r *run) (int, error) {
	serials := r.sorted[min(r.fanFrom, r.open()):r.open()]
	batches := make(chan []string)
	var (
		wg      sync.WaitGroup
		total   atomic.Int64
		errOnce sync.Once
		ferr    error
	)
	for w := 0; w < p.workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for b := range batches {
				n, err := p.wrapBatchRetrying(ctx, r, b)
				total.Add(int64(n))
				if err != nil {
					errOnce.Do(func() { ferr = err })
				}
			}
		}()
	}
	for i := 0; i < len(serials) && ctx.Err() == nil && !r.paused.Load(); i += batchSize {
		select {
		case batches <- serials[i:min(i+batchSize, len(serials))]:
		case <-ctx.Done():
		}
	}
	close(batches)
	wg.Wait()
	return int(total.Load()), ferr
}

// Fan-out retries: a batch whose store or broker call failed (a Redis failover, a broker
// restart) is wrapped again after a pause that doubles from retryMin to retryMax, until
// it succeeds or the fan-out ends. Wrapping a batch again is harmless: the assignments
// are idempotent and the key messages the same.
const (
	retryMin = 100 * time.Millisecond
	retryMax = 5 * time.Second
)

// wrapBatchRetrying is wrapBatch, tried again until it succeeds or ctx ends: a batch
// given up would leave its devices without a key until the updater restarts.
func (p *placer) wrapBatchRetrying(ctx context.Context, r *run, serials []string) (int, error) {
	for pause := retryMin; ; pause = min(2*pause, retryMax) {
		n, err := p.wrapBatch(ctx, r, serials)
		if err == nil || ctx.Err() != nil {
			return n, err
		}
		p.stats.fanoutRetries.Add(1)
		p.log.Warn().Err(err).Str("release", r.release().ID.String()).Int("devices", len(serials)).Dur("retry_in", pause).Msg("wrapping a batch of keys failed; retrying")
		select {
		case <-ctx.Done():
			return n, err
		case <-time.After(pause):
		}
	}
}

// wrapBatch wraps the release for a batch of devices: one store read, one store write,
// one publish burst. Devices that already run this version or newer are skipped.
func (p *placer) wrapBatch(ctx context.Context, r *run, serials []string) (int, error) {
	devs, err := p.store.Devices(ctx, serials)
	if err != nil {
		return 0, fmt.Errorf("reading devices: %w", err)
	}
	var (
		as      []Assignment
		msgs    []protocol.Message
		skipped []string
	)
	for _, d := range devs {
		if d != nil && d.Version >= r.release().Version {
			skipped = append(skipped, d.Serial)
		}
		if d == nil || d.Version >= r.release().Version {
			continue
		}
		a, m, err := p.wrapFor(d, r)
		if err != nil {
			p.log.Error().Err(err).Str("serial", d.Serial).Msg("wrapping key")
			continue
		}
		as = append(as, a)
		msgs = append(msgs, m)
	}
	if err := p.newerAlready(ctx, r.release().ID, skipped); err != nil {
		return 0, err
	}
	return p.assignAndPublish(ctx, as, msgs)
}

// newerAlready records the result rollback for the devices that run the release's version
// or a newer one and have not installed the release: they would refuse it (a cancelled or
// retired release of that version or above reached them), so that the release completes
// ([SC-12.2a]).
func (p *placer) newerAlready(ctx context.Context, id keychain.ReleaseID, serials []string) error {
	if len(serials) == 0 {
		return nil
	}
	results, err := p.store.Results(ctx, id, serials)
	if err != nil {
		return fmt.Errorf("reading results: %w", err)
	}
	var rs []Result
	for i, res := range results {
		if res == ResultNone {
			rs = append(rs, Result{Serial: serials[i], Result: ResultFailed + ":" + protocol.CodeRollback.String()})
		}
	}
	if len(rs) == 0 {
		return nil
	}
	if err := p.store.RecordResults(ctx, id, rs); err != nil {
		return fmt.Errorf("recording %d devices that run a newer version: %w", len(rs), err)
	}
	p.status.releaseChanged(id)
	return nil
}

// assignAndPublish records assignments, then publishes the key messages of those that
// were recorded, followed by extra messages (which need no assignment), in one publish.
// The order matters: a key message is never out before the store knows that its id was
// wrapped at that position, so the device's ack can always be matched. It returns how many
// key messages were published. If the store fails, only the extra messages are published.
func (p *placer) assignAndPublish(ctx context.Context, as []Assignment, msgs []protocol.Message, extra ...protocol.Message) (int, error) {
	if len(as) == 0 && len(extra) == 0 {
		return 0, nil
	}
	var (
		ok   []bool
		aerr error
	)
	if len(as) > 0 {
		if ok, aerr = p.store.Assign(ctx, as); aerr != nil {
			aerr = fmt.Errorf("recording assignments: %w", aerr)
			ok = make([]bool, len(as))
		}
	}
	out := msgs[:0]
	for i, applied := range ok {
		if applied {
			out = append(out, msgs[i])
		}
	}
	keys := len(out)
	out = append(out, extra...)
	if len(out) == 0 {
		return 0, aerr
	}
	if err := p.bus.Publish(ctx, out...); err != nil {
		return 0, errors.Join(aerr, fmt.Errorf("publishing key messages: %w", err))
	}
	p.stats.keys.Add(int64(keys))
	for i, applied := range ok {
		switch {
		case !applied:
		case as[i].State == protocol.DeviceRekeying:
			p.stats.rekeys.Add(1)
		default:
			if r := p.runs.get(as[i].ID); r != nil {
				r.wrapped.Add(1)
				p.status.releaseChanged(as[i].ID)
				if r.offeredAt != nil {
					p.runs.markOffered(as[i].ID, []string{as[i].Serial})
				}
			}
		}
	}
	return keys, aerr
}

// wrapFor builds the key message for device d at its current position: the release's
// content key, or, at index 1, a re-key into the next chain ([SC-10.2], 10.3).
func (p *placer) wrapFor(d *Device, r *run) (Assignment, protocol.Message, error) {
	tr, err := p.keys.sealer.Open(d.Serial, d.Epoch, d.Chain)
	if err != nil {
		return Assignment{}, protocol.Message{}, fmt.Errorf("opening chain state: %w", err)
	}
	if tr.Pos() != d.Seq {
		return Assignment{}, protocol.Message{}, fmt.Errorf("chain state is at %d but the counter is at %d", tr.Pos(), d.Seq)
	}
	k := tr.Current()
	p.stats.chainSteps.Add(int64(tr.Steps()))
	if d.Seq == 1 {
		return p.rekeyFor(d, k)
	}
	rel := r.release()
	m := keychain.KeyMessage{Kind: keychain.KindRelease, Epoch: d.Epoch, Seq: d.Seq, ID: rel.ID, ManifestDigest: r.digest}
	b, err := keychain.SealKeyMessage(m, k, d.Serial, r.ck)
	if err != nil {
		return Assignment{}, protocol.Message{}, err
	}
	return Assignment{Serial: d.Serial, From: d.Pos(), ID: rel.ID, State: protocol.DeviceWrapped},
		protocol.Message{Topic: protocol.KeyTopic(d.Serial), Payload: b, Retain: true}, nil
}

func (p *placer) rekeyFor(d *Device, k1 keychain.ChainKey) (Assignment, protocol.Message, error) {
	next, err := keychain.RekeySecret(p.keys.root, d.Serial, d.Epoch+1)
	if err != nil {
		return Assignment{}, protocol.Message{}, err
	}
	id := p.keys.rekeyID(d.Serial, d.Epoch)
	m := keychain.KeyMessage{Kind: keychain.KindRekey, Epoch: d.Epoch, Seq: 1, ID: id, NewLength: rekeyLength(d, p.keys)}
	b, err := keychain.SealKeyMessage(m, k1, d.Serial, next)
	if err != nil {
		return Assignment{}, protocol.Message{}, err
	}
	return Assignment{Serial: d.Serial, From: d.Pos(), ID: id, State: protocol.DeviceRekeying},
		protocol.Message{Topic: protocol.KeyTopic(d.Serial), Payload: b, Retain: true}, nil
}

// next returns the key message device d should see now, and its assignment: a re-key at
// index 1, else its pending release. The assignment is nil when nothing is due (the
// caller clears the key topic).
func (p *placer) next(d *Device) (*Assignment, protocol.Message, error) {
	var (
		a   Assignment
		m   protocol.Message
		err error
	)
	r := p.runs.pendingFor(d)
	switch {
	case d.Seq == 1:
		tr, oerr := p.keys.sealer.Open(d.Serial, d.Epoch, d.Chain)
		if oerr != nil {
			return nil, m, oerr
		}
		a, m, err = p.rekeyFor(d, tr.Current())
		p.stats.chainSteps.Add(int64(tr.Steps()))
	case r != nil:
		a, m, err = p.wrapFor(d, r)
	default:
		return nil, protocol.Message{}, nil
	}
	if err != nil {
		return nil, m, err
	}
	return &a, m, nil
}

// nextForAll publishes what each device should see on its key topic now that it has
// moved: a re-key at index 1, else its pending release, else nothing (the topic is
// cleared). One store call for the assignments and one publish, followed by the extra
// messages. A device whose next message cannot be built is skipped, and named in the
// error.
func (p *placer) nextForAll(ctx context.Context, devs []*Device, extra ...protocol.Message) error {
	var (
		as   []Assignment
		keys []protocol.Message
		errs []error
	)
	// place builds the key message of each device with something due and returns the
	// devices with nothing due in this updater's view.
	place := func(ds []*Device) (idle []*Device) {
		for _, d := range ds {
			a, m, err := p.next(d)
			switch {
			case err != nil:
				errs = append(errs, fmt.Errorf("device %s: %w", d.Serial, err))
			case a == nil:
				idle = append(idle, d)
			default:
				as = append(as, *a)
				keys = append(keys, m)
			}
		}
		return idle
	}
	idle := place(devs)
	if len(idle) > 0 && p.acksOnly {
		// An acks-only updater's view of the releases is refreshed now and then; a
		// release created since may have been wrapped for a device at the index it just
		// left, by the other updater, whose fan-out will not come back to it. Ask the
		// store before clearing: it has every release whose wrap preceded this advance.
		if err := p.runs.load(ctx); err != nil {
			// Leave the key topics as they are: a device that finds its old key there
			// reports stale_key, and the answer publishes what is pending then.
			errs = append(errs, fmt.Errorf("refreshing the releases before clearing %d key topics: %w", len(idle), err))
			idle = nil
		} else {
			idle = place(idle)
		}
	}
	clears := make([]protocol.Message, 0, len(idle)+len(extra))
	for _, d := range idle {
		clears = append(clears, protocol.Message{Topic: protocol.KeyTopic(d.Serial), Retain: true})
	}
	_, err := p.assignAndPublish(ctx, as, keys, append(clears, extra...)...)
	return errors.Join(append(errs, err)...)
}

// withdraw clears the key topics of a cancelled release's targets that still hold its key,
// and offers them whatever else is pending ([SC-12.2]).
func (p *placer) withdraw(ctx context.Context, id keychain.ReleaseID) error {
	targets, err := p.store.Targets(ctx, id)
	if err != nil {
		return unavailable(err)
	}
	for i := 0; i < len(targets); i += batchSize {
		devs, err := p.store.Devices(ctx, targets[i:min(i+batchSize, len(targets))])
		if err != nil {
			return unavailable(err)
		}
		var held []*Device
		for _, d := range devs {
			if d != nil && assigned(d, id) {
				held = append(held, d)
			}
		}
		if err := p.nextForAll(ctx, held); err != nil {
			return fmt.Errorf("withdrawing the keys of release %s: %w", id, err)
		}
	}
	return nil
}

// announce publishes, in the background, a prefetch notice for every target of a release
// that prefetches, at the target's current position, so that devices can download the
// release before its key ([SC-9.9], 12.7). Devices that already run its version or a
// newer one get none.
func (p *placer) announce(r *run) {
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		rel := r.release()
		n, err := p.announceAll(p.ctx, r)
		ev := p.log.Info()
		if err != nil && p.ctx.Err() == nil {
			ev = p.log.Error().Err(err)
		}
		ev.Str("release", rel.ID.String()).Int("notices", n).Msg("prefetch notices published")
	}()
}

func (p *placer) announceAll(ctx context.Context, r *run) (int, error) {
	rel := r.release()
	jitter := uint32(rel.PrefetchJitter / time.Second)
	total := 0
	for i := 0; i < len(r.sorted) && ctx.Err() == nil; i += batchSize {
		devs, err := p.store.Devices(ctx, r.sorted[i:min(i+batchSize, len(r.sorted))])
		if err != nil {
			return total, fmt.Errorf("reading devices: %w", err)
		}
		var msgs []protocol.Message
		for _, d := range devs {
			if d == nil || d.Version >= rel.Version {
				continue
			}
			tr, err := p.keys.sealer.Open(d.Serial, d.Epoch, d.Chain)
			if err != nil || tr.Pos() != d.Seq {
				p.log.Error().Err(err).Str("serial", d.Serial).Msg("opening chain state for a prefetch notice")
				continue
			}
			p.stats.chainSteps.Add(int64(tr.Steps()))
			b, err := keychain.PrefetchNotice{Epoch: d.Epoch, Seq: d.Seq, ID: rel.ID, ManifestDigest: r.digest, Jitter: jitter}.Seal(tr.Current(), d.Serial)
			if err != nil {
				return total, err
			}
			msgs = append(msgs, protocol.Message{Topic: protocol.PrefetchTopic(d.Serial), Payload: b, Retain: true})
		}
		if len(msgs) == 0 {
			continue
		}
		if err := p.bus.Publish(ctx, msgs...); err != nil {
			return total, fmt.Errorf("publishing prefetch notices: %w", err)
		}
		total += len(msgs)
	}
	return total, nil
}
