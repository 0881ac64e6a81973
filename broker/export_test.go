package broker

// SetPIDGuard switches the packet-id collision guard on or off, so that a test can show
// mochi's behaviour without it.
func SetPIDGuard(b *Broker, on bool) { b.guard.off.Store(!on) }
