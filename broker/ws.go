package broker

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	"github.com/mochi-mqtt/server/v2/listeners"
)

// wsListener serves MQTT over WebSocket (subprotocol "mqtt") on a listener the broker
// bound itself (mochi's own Websocket listener binds in Serve, which hides the port when
// the address is ":0"), or, in handler mode (ln nil), through handle, which another
// HTTP server mounts (the dashboard's same-origin /mqtt).
type wsListener struct {
	id             string
	ln             net.Listener // nil in handler mode
	connectTimeout time.Duration
	wrap           func(net.Conn) *clientConn
	srv            *http.Server
	upgrader       websocket.Upgrader
	log            *slog.Logger
	closeOnce      sync.Once
	done           chan struct{}
	stop           chan struct{} // closed by Close in handler mode

	mu        sync.Mutex
	establish listeners.EstablishFn // set by Serve, cleared by Close
}

func newWSListener(id string, ln net.Listener, connectTimeout time.Duration, wrap func(net.Conn) *clientConn) *wsListener {
	return &wsListener{
		id: id, ln: ln, connectTimeout: connectTimeout, wrap: wrap, done: make(chan struct{}), stop: make(chan struct{}),
		upgrader: websocket.Upgrader{
			Subprotocols: []string{"mqtt"},
			// Devices and tools are not browsers; a browser dashboard would be served by
			// the same operator, so origins are not restricted.
			CheckOrigin: func(*http.Request) bool { return true },
		},
	}
}

func (l *wsListener) ID() string { return l.id }
func (l *wsListener) Address() string {
	if l.ln == nil {
		return "handler" // handler mode: the address is the mounting server's
	}
	return l.ln.Addr().String()
}
func (l *wsListener) Protocol() string { return "ws" }

func (l *wsListener) Init(log *slog.Logger) error {
	l.log = log
	if l.ln == nil {
		return nil // handler mode: another server's mux calls handle
	}
	l.srv = &http.Server{
		Handler:           http.HandlerFunc(l.handle),
		ReadHeaderTimeout: l.connectTimeout,
	}
	return nil
}

func (l *wsListener) handle(w http.ResponseWriter, r *http.Request) {
	l.mu.Lock()
	establish := l.establish
	l.mu.Unlock()
	if establish == nil {
		http.Error(w, "the broker is not serving yet", http.StatusServiceUnavailable)
		return
	}
	c, err := l.upgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	defer c.Close()
	conn := l.wrap(&wsConn{Conn: c.UnderlyingConn(), c: c})
	_ = conn.SetDeadline(time.Now().Add(l.connectTimeout))
	if err := establish(l.id, conn); err != nil {
		l.log.Debug("websocket client ended", "error", err)
	}
}

func (l *wsListener) Serve(establish listeners.EstablishFn) {
	defer close(l.done)
	l.mu.Lock()
	l.establish = establish
	l.mu.Unlock()
	if l.ln == nil {
		<-l.stop // handler mode: serve until Close
		return
	}
	if err := l.srv.Serve(l.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		l.log.Error("websocket listener stopped", "error", err)
	}
}

func (l *wsListener) Close(closeClients listeners.CloseFn) {
	l.closeOnce.Do(func() {
		l.mu.Lock()
		l.establish = nil
		l.mu.Unlock()
		closeClients(l.id)
		if l.ln == nil {
			close(l.stop)
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = l.srv.Shutdown(ctx)
		_ = l.ln.Close() // Shutdown closes it only if Serve ran
	})
}

func (l *wsListener) wait() {
	select {
	case <-l.done:
	case <-time.After(time.Second):
	}
}

// wsConn is a net.Conn over binary WebSocket messages; an MQTT packet may span messages.
type wsConn struct {
	net.Conn
	c        *websocket.Conn
	r        io.Reader                 // current message
	deadline atomic.Pointer[time.Time] // the write deadline, for Write to give gorilla
}

var errWSText = errors.New("broker: websocket text message; MQTT needs binary messages")

func (ws *wsConn) Read(p []byte) (int, error) {
	for {
		if ws.r == nil {
			op, r, err := ws.c.NextReader()
			if err != nil {
				return 0, err
			}
			if op != websocket.BinaryMessage {
				return 0, errWSText
			}
			ws.r = r
		}
		n, err := ws.r.Read(p)
		if errors.Is(err, io.EOF) {
			ws.r = nil
			if n == 0 {
				continue
			}
			err = nil
		}
		return n, err
	}
}

// SetWriteDeadline sets the deadline of the next writes. gorilla applies its own deadline
// to the socket on every write, and may only be told it from the writing goroutine, so
// the deadline is kept here for Write to pass on; it is also set on the socket at once,
// which ends a write already blocked past it.
func (ws *wsConn) SetWriteDeadline(t time.Time) error {
	ws.deadline.Store(&t)
	return ws.Conn.SetWriteDeadline(t)
}

func (ws *wsConn) SetDeadline(t time.Time) error {
	if err := ws.SetWriteDeadline(t); err != nil {
		return err
	}
	return ws.Conn.SetReadDeadline(t)
}

func (ws *wsConn) Write(p []byte) (int, error) {
	var d time.Time
	if t := ws.deadline.Load(); t != nil {
		d = *t
	}
	_ = ws.c.SetWriteDeadline(d)
	if err := ws.c.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}
