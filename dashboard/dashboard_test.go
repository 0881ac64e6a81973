package dashboard

import (
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestVendoredPaho: the embedded MQTT client is the file the package documentation
// names, byte for byte, and the page loads it.
func TestVendoredPaho(t *testing.T) {
	b, err := static.ReadFile("static/paho-mqtt.min.js")
	if err != nil {
		t.Fatal(err)
	}
	if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != pahoSHA256 {
		t.Fatalf("static/paho-mqtt.min.js has SHA-256 %x, the documentation says %s: run scripts/update-paho.sh and record what it prints", sum, pahoSHA256)
	}
	index, err := static.ReadFile("static/index.html")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(index), `<script src="paho-mqtt.min.js"></script>`) {
		t.Fatal("index.html does not load paho-mqtt.min.js")
	}
}

// TestHeaders: every page carries the Content-Security-Policy; /mqtt goes to the broker.
func TestHeaders(t *testing.T) {
	mqtt := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusTeapot) })
	h := Handler(mqtt)
	for _, path := range []string{"/", "/app.js", "/paho-mqtt.min.js", "/style.css"} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		if rec.Code != http.StatusOK || rec.Header().Get("Content-Security-Policy") != csp {
			t.Errorf("GET %s: %d, CSP %q", path, rec.Code, rec.Header().Get("Content-Security-Policy"))
		}
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/mqtt", nil))
	if rec.Code != http.StatusTeapot {
		t.Errorf("GET /mqtt: %d, want the broker's handler", rec.Code)
	}
}
