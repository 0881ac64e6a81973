package device

import (
	"context"
	"fmt"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// TrialInstaller is an Installer whose images run on trial before the device confirms
// them [SC-10.5]. Its Commit only stages the image (it does not run yet); Switch makes
// the staged image run, on trial; Health checks the image on trial; Confirm makes it
// permanent; Revert makes the image that ran before run again.
//
// Switch may restart the device (a reboot into the new slot): the agent records the
// trial in the vault before it calls Switch, and a new agent on the same vault goes on
// with it. Every method may be called again after a power loss, so each must be
// idempotent: switching to the image already on trial, confirming an image already
// permanent, and reverting an image no longer running are no errors.
type TrialInstaller interface {
	Installer
	// Switch makes release id's staged image the one that runs, on trial.
	Switch(id keychain.ReleaseID) error
	// Running reports whether release id's image, switched to on trial, is the one
	// running now (false once the device went back to the previous one).
	Running(id keychain.ReleaseID) (bool, error)
	// Health checks the image on trial; ctx ends at the health deadline. It MUST fail
	// unless release id's image is the one running.
	Health(ctx context.Context, id keychain.ReleaseID) error
	// Confirm makes release id's image, on trial, permanent.
	Confirm(id keychain.ReleaseID) error
	// Revert makes the image that ran before release id's trial run again.
	Revert(id keychain.ReleaseID) error
}

// Trial is an update on trial, kept in the vault [SC-10.5]: the key message it answers,
// the version it installs, how many times the device switched to it and started with
// it, and, once it failed, the report that says so.
type Trial struct {
	Epoch, Seq uint32
	ID         keychain.ReleaseID
	Version    uint64
	// Switches counts the switches to the image (each recorded before it is made);
	// Boots the agent's starts with the image running on trial.
	Switches, Boots uint32
	// Report is set once the trial failed: the unhealthy report, sent again for the same
	// key message, which is not tried again.
	Report []byte
}

// failed reports whether the trial ended with the device back on its previous image.
func (t *Trial) failed() bool { return t != nil && t.Report != nil }

// answers reports whether the trial is for the key message (epoch, seq, id).
func (t *Trial) answers(epoch, seq uint32, id keychain.ReleaseID) bool {
	return t != nil && t.Epoch == epoch && t.Seq == seq && t.ID == id
}

// healthDone is the result of a health check, handed to the agent's goroutine.
type healthDone struct {
	id  keychain.ReleaseID
	err error
}

// beginTrial records the trial of an image the installer staged, and switches to it
// [SC-10.5 steps 1-2].
func (a *Agent) beginTrial(ti TrialInstaller, km *keychain.KeyMessage, version uint64) {
	tr := &Trial{Epoch: km.Epoch, Seq: km.Seq, ID: km.ID, Version: version}
	a.switchTo(ti, tr)
}

// switchTo records one more switch to the trial's image, makes it, and starts the trial.
func (a *Agent) switchTo(ti TrialInstaller, tr *Trial) {
	if tr.Switches >= uint32(a.opts.TrialBoots) {
		a.endTrial(ti, tr, fmt.Sprintf("the image did not start after %d switches to it", tr.Switches), false)
		return
	}
	next := *tr
	next.Switches++
	if !a.saveTrial(&next) {
		return
	}
	if a.crashAt(CrashStaged, tr.ID, 0) {
		a.crash()
		return
	}
	if err := ti.Switch(tr.ID); err != nil {
		// Nothing runs on trial: the staged image is dropped, and the update is tried
		// again like any failed install.
		a.clearTrial()
		a.fail(tr.Epoch, tr.Seq, tr.ID, keychain.Key(a.st.UnitData, tr.Seq), 0, protocol.CodeInstallFailed, "switching to the new image: "+err.Error())
		return
	}
	a.c.trials.Add(1)
	a.runTrial(ti)
}

// runTrial goes on with the trial in the vault, the image switched to [SC-10.5 step 3]:
// it counts the start and runs the health check.
func (a *Agent) runTrial(ti TrialInstaller) {
	tr := a.st.Trial
	running, err := ti.Running(tr.ID)
	switch {
	case err != nil:
		a.fatal = fmt.Errorf("device: asking the installer which image runs: %w", err)
		return
	case !running:
		// Recorded, but not (or no longer) running: the switch was cut short by a power
		// loss, or the device went back by itself. Switch again, a bounded number of times.
		a.switchTo(ti, tr)
		return
	}
	next := *tr
	next.Boots++
	if !a.saveTrial(&next) {
		return
	}
	if next.Boots > uint32(a.opts.TrialBoots) {
		a.endTrial(ti, &next, fmt.Sprintf("the image on trial started %d times without passing its health check", next.Boots-1), true)
		return
	}
	if a.crashAt(CrashTrial, tr.ID, 0) {
		a.crash()
		return
	}
	id := tr.ID
	a.doc = protocol.DeviceState{State: protocol.AgentTrial, Release: &id}
	a.publishState()
	a.log.Info().Stringer("id", id).Uint32("boot", next.Boots).Msg("image running on trial; checking its health")
	ctx, cancel := context.WithTimeout(a.runCtx, a.opts.HealthTimeout)
	a.trialWait.Add(1)
	go func() {
		defer a.trialWait.Done()
		defer cancel()
		err := ti.Health(ctx, id)
		if err == nil && ctx.Err() != nil {
			err = fmt.Errorf("the health check passed after its deadline (%v)", a.opts.HealthTimeout)
		}
		a.push(inbound{health: &healthDone{id: id, err: err}})
	}()
}

// onHealth ends a trial by its health check [SC-10.5 steps 4-5].
func (a *Agent) onHealth(h *healthDone) {
	tr := a.st.Trial
	if tr == nil || tr.ID != h.id || tr.failed() {
		return
	}
	ti := a.opts.Installer.(TrialInstaller)
	if h.err != nil {
		if a.runCtx.Err() != nil {
			return // stopping: the check was cut short, not failed; the next start runs it again
		}
		a.endTrial(ti, tr, "health check failed: "+h.err.Error(), true)
		return
	}
	if a.crashAt(CrashHealthy, tr.ID, 0) {
		a.crash()
		return
	}
	a.confirm(ti, tr)
}

// confirm persists the update that passed its trial, makes its image permanent and
// acks it [SC-10.5 step 4].
func (a *Agent) confirm(ti TrialInstaller, tr *Trial) {
	n := tr.Seq
	ack := keychain.Ack{Kind: keychain.AckInstalled, Epoch: tr.Epoch, Seq: n, ID: tr.ID, Version: tr.Version, DeviceSeq: n - 1}
	k := keychain.Key(a.st.UnitData, n)
	raw, err := ack.Seal(k, a.serial)
	if err != nil {
		a.fatal = fmt.Errorf("device: sealing the ack: %w", err)
		return
	}
	a.c.installs.Add(1)
	a.emit(Event{Kind: EventCommitted, Release: tr.ID, Version: tr.Version})
	ns := a.st.Clone()
	ns.Seq, ns.Version, ns.Trial = n-1, tr.Version, nil
	ns.LastAck, ns.LastAckConfirmed, ns.LastAckKey = raw, false, k
	if !a.persist(ns, &ack) {
		return
	}
	if err := ti.Confirm(tr.ID); err != nil {
		// The update is the device's now; the next start confirms the image again.
		a.log.Error().Err(err).Msg("making the image permanent failed; trying again at the next start")
	}
	a.log.Info().Uint64("version", ns.Version).Uint32("seq", ns.Seq).Msg("installed: healthy on trial")
	id := tr.ID
	a.doc = protocol.DeviceState{State: protocol.AgentInstalled, Release: &id}
	a.newAck()
	a.releaseHeldKey()
}

// endTrial ends a failed trial: back to the previous image (when the trial's image
// runs), the trial kept as failed with its report, and the report sent [SC-10.5 step 5].
func (a *Agent) endTrial(ti TrialInstaller, tr *Trial, msg string, revert bool) {
	if revert {
		if err := ti.Revert(tr.ID); err != nil {
			a.fatal = fmt.Errorf("device: going back to the previous image after a failed trial: %w", err)
			return
		}
	}
	k := keychain.Key(a.st.UnitData, tr.Seq)
	rep := keychain.Ack{Kind: keychain.AckFailed, Epoch: tr.Epoch, Seq: tr.Seq, ID: tr.ID, Version: a.st.Version, DeviceSeq: a.st.Seq, Code: uint16(protocol.CodeUnhealthy)}
	raw, err := rep.Seal(k, a.serial)
	if err != nil {
		a.fatal = fmt.Errorf("device: sealing the unhealthy report: %w", err)
		return
	}
	done := *tr
	done.Report = raw
	if !a.saveTrial(&done) {
		return
	}
	a.c.unhealthy.Add(1)
	a.fail(tr.Epoch, tr.Seq, tr.ID, k, a.st.Version, protocol.CodeUnhealthy, msg)
	a.releaseHeldKey()
}

// saveTrial persists tr as the vault's trial.
func (a *Agent) saveTrial(tr *Trial) bool {
	ns := a.st.Clone()
	ns.Trial = tr
	if err := a.opts.Vault.Save(ns); err != nil {
		a.fatal = fmt.Errorf("device: cannot persist the trial of release %s: %w", tr.ID, err)
		return false
	}
	a.st = ns
	return true
}

// clearTrial removes the vault's trial.
func (a *Agent) clearTrial() {
	if a.st.Trial == nil {
		return
	}
	ns := a.st.Clone()
	ns.Trial = nil
	if err := a.opts.Vault.Save(ns); err != nil {
		a.fatal = fmt.Errorf("device: cannot clear the trial in the vault: %w", err)
		return
	}
	a.st = ns
}

// resumeTrial, at start, goes on with a trial the vault holds, or confirms the image of
// an update persisted just before a power loss [SC-10.5].
func (a *Agent) resumeTrial() {
	ti, ok := a.opts.Installer.(TrialInstaller)
	if !ok {
		return
	}
	tr := a.st.Trial
	switch {
	case tr == nil:
		if l := a.lastAck; l != nil && l.Kind == keychain.AckInstalled {
			if err := ti.Confirm(l.ID); err != nil {
				a.log.Error().Err(err).Msg("making the installed image permanent failed")
			}
		}
	case tr.failed():
		a.failed = &failure{epoch: tr.Epoch, seq: tr.Seq, id: tr.ID, code: protocol.CodeUnhealthy, attempts: 1}
		a.report = tr.Report
	default:
		a.log.Info().Stringer("id", tr.ID).Uint32("boots", tr.Boots).Msg("going on with the image on trial")
		a.runTrial(ti)
	}
}

// holdKey keeps a key message that arrived during a trial, for when the trial ends.
func (a *Agent) holdKey(p []byte) { a.heldKey = append(a.heldKey[:0], p...) }

// releaseHeldKey processes the key message held during a trial.
func (a *Agent) releaseHeldKey() {
	if p := a.heldKey; p != nil {
		a.heldKey = nil
		a.onKey(p)
	}
}

// trialDeadline is the default health deadline of a trial.
const trialDeadline = 5 * time.Minute
