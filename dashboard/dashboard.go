// Package dashboard is the fleet dashboard that serve hosts on its HTTP listener: a page
// embedded in the binary that reads the retained status topics over MQTT on WebSocket,
// logging in as a broker account, and sends admin requests as that account. The broker's
// access rules stay the only authority: a monitor account sees and can do what the
// broker lets it, no more.
//
// static/paho-mqtt.js is the Eclipse Paho JavaScript client, vendored unchanged from
// github.com/eclipse/paho.mqtt.javascript at commit be026e0305f0ae5ed100015df25bbd20fac0a41b
// (release 1.1.0 and nine commits, src/paho-mqtt.js), under the EPL 1.0 and EDL 1.0
// (static/paho-mqtt.LICENSE-EPL, -EDL). To update it, copy src/paho-mqtt.js of a newer
// commit over it and record the commit here.
package dashboard

import (
	"embed"
	"io/fs"
	"net/http"
)

//go:embed static
var static embed.FS

// csp allows the page its own scripts, styles and MQTT connection, and nothing else: no
// inline script, no other origin, no framing.
const csp = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; " +
	"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// Handler serves the dashboard at / and MQTT over WebSocket at /mqtt (mqtt, from the
// broker), so that the page talks to its own origin only.
func Handler(mqtt http.Handler) http.Handler {
	files, _ := fs.Sub(static, "static")
	fileServer := http.FileServer(http.FS(files))
	mux := http.NewServeMux()
	mux.Handle("GET /mqtt", mqtt)
	mux.HandleFunc("GET /", func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", csp)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-cache")
		fileServer.ServeHTTP(w, r)
	})
	return mux
}
