//go:build unix

package broker

import (
	"errors"
	"net"
	"syscall"
)

// rawWriter writes to a TCP socket without blocking: what the kernel's send buffer takes
// now, and no more.
type rawWriter struct{ rc syscall.RawConn }

// newRawWriter returns a rawWriter for c if writes to c are plain TCP (no TLS or
// WebSocket framing between mochi and the socket), else nil.
func newRawWriter(c net.Conn) *rawWriter {
	tc, ok := netConn(c).(*net.TCPConn)
	if !ok {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	return &rawWriter{rc: rc}
}

// tryWrite writes what the socket takes without waiting and returns how much that was.
func (w *rawWriter) tryWrite(p []byte) (int, error) {
	var n int
	var werr error
	err := w.rc.Write(func(fd uintptr) bool {
		for len(p) > 0 {
			m, err := syscall.Write(int(fd), p)
			if m > 0 {
				n += m
				p = p[m:]
			}
			switch {
			case errors.Is(err, syscall.EINTR):
				continue
			case errors.Is(err, syscall.EAGAIN):
				return true // full: the rest is kept
			case err != nil:
				werr = err
				return true
			case m == 0:
				return true
			}
		}
		return true // never wait for the socket
	})
	if err == nil {
		err = werr
	}
	return n, err
}
