// Package dashboard is the fleet dashboard that serve hosts on its HTTP listener: a page
// embedded in the binary that reads the retained status topics over MQTT on WebSocket,
// logging in as a broker account, and sends admin requests as that account. The broker's
// access rules stay the only authority: a monitor account sees and can do what the
// broker lets it, no more.
//
// static/paho-mqtt.min.js is the Eclipse Paho JavaScript client, the minified copy of
// release 1.1.0 from the npm registry (paho-mqtt@1.1.0, tarball integrity
// sha512-KPbL9KAB0ASvhSDbOrZBaccXS+/s7/LIofbPyERww8hM5Ko71GUJQ6Nmg0BWqj8phAIT8zdf/Sd/RftHU9i2HA==),
// unchanged, under the EPL 1.0 and EDL 1.0 (static/paho-mqtt.LICENSE-EPL, -EDL). To
// update it, run scripts/update-paho.sh VERSION, which checks the tarball against the
// registry's integrity, and record the version, the integrity and the file's SHA-256
// (pahoSHA256, which a test checks) here.
package dashboard

import (
	"embed"
	"io/fs"
	"net/http"
)

//go:embed static
var static embed.FS

// pahoSHA256 is the SHA-256 of static/paho-mqtt.min.js as vendored.
const pahoSHA256 = "51d88704d4e7fdf972635eb56697d163c5c86af7e02859a05c331eda7f3fb730"

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
