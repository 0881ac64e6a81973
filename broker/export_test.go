package broker

// SetPIDGuard switches the packet-id collision guard on or off, so that a test can show
// mochi's behaviour without it.
func SetPIDGuard(b *Broker, on bool) { b.guard.off.Store(!on) }

// Inflight returns how many unacknowledged QoS 1 and 2 flows the session of client holds
// in memory (-1 for no session).
func Inflight(b *Broker, client string) int {
	cl, ok := b.srv.Clients.Get(client)
	if !ok {
		return -1
	}
	return cl.State.Inflight.Len()
}
