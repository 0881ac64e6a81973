//go:build !linux

package chaos

import "os/exec"

// setDeathSignal does nothing where the kernel has no parent-death signal; t.Cleanup
// still stops the child.
func setDeathSignal(*exec.Cmd) {}
