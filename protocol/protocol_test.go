package protocol

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sealcast/sealcast/keychain"
)

func TestTopics(t *testing.T) {
	id, _ := keychain.NewReleaseID()
	want := map[string]string{
		ManifestTopic(id):         "sealcast/releases/" + id.String() + "/manifest",
		ChunkTopic(id, 0):         "sealcast/releases/" + id.String() + "/chunks/0",
		ChunkTopic(id, 17):        "sealcast/releases/" + id.String() + "/chunks/17",
		KeyTopic("d-1"):           "sealcast/devices/d-1/key",
		ReceiptTopic("d-1"):       "sealcast/devices/d-1/receipt",
		AckTopic("d-1"):           "sealcast/devices/d-1/ack",
		StateTopic("d-1"):         "sealcast/devices/d-1/state",
		PresenceTopic("d-1"):      "sealcast/devices/d-1/presence",
		ReleaseStatusTopic(id):    "sealcast/status/releases/" + id.String(),
		DeviceStatusTopic("d-1"):  "sealcast/status/devices/d-1",
		ReplyTopic("r.1"):         "sealcast/admin/replies/r.1",
		UploadTopic("u-1", 3):     "sealcast/admin/uploads/u-1/3",
		FleetStatusTopic:          "sealcast/status/fleet",
		AdminRequests:             "sealcast/admin/requests",
		AckFilter:                 "sealcast/devices/+/ack",
		ReleaseFilter(id):         "sealcast/releases/" + id.String() + "/#",
		UploadFilter + "|":        "sealcast/admin/uploads/+/+|",
		StatusFilter + "|":        "sealcast/status/#|",
		fmt.Sprint(MaxPacketSize): "1052672",
	}
	for got, w := range want {
		if got != w {
			t.Errorf("got %q, want %q", got, w)
		}
	}
}

func TestDeviceOf(t *testing.T) {
	if s, leaf, ok := DeviceOf("sealcast/devices/d-1/ack"); !ok || s != "d-1" || leaf != "ack" {
		t.Errorf("DeviceOf = %q %q %v", s, leaf, ok)
	}
	for _, bad := range []string{"sealcast/devices/d-1", "sealcast/devices/d-1/ack/x", "sealcast/devices/-x/ack", "other/devices/d/ack", "sealcast/devices//ack"} {
		if _, _, ok := DeviceOf(bad); ok {
			t.Errorf("DeviceOf(%q) ok", bad)
		}
	}
	if u, p, ok := UploadOf("sealcast/admin/uploads/u-1/12"); !ok || u != "u-1" || p != 12 {
		t.Errorf("UploadOf = %q %d %v", u, p, ok)
	}
	for _, bad := range []string{"sealcast/admin/uploads/u-1/012", "sealcast/admin/uploads/u-1/-1", "sealcast/admin/uploads/u-1/x", "sealcast/admin/uploads/u/1/2", "sealcast/admin/uploads/u-1/4294967296"} {
		if _, _, ok := UploadOf(bad); ok {
			t.Errorf("UploadOf(%q) ok", bad)
		}
	}
}

func TestValidID(t *testing.T) {
	for _, s := range []string{"a", "req-1", "A.b_c-9"} {
		if !ValidID(s) {
			t.Errorf("ValidID(%q) = false", s)
		}
	}
	for _, s := range []string{"", "a/b", "a+", "#", "a b", string(make([]byte, 65))} {
		if ValidID(s) {
			t.Errorf("ValidID(%q) = true", s)
		}
	}
}

func TestCodes(t *testing.T) {
	for c := CodeOK; c <= CodeUnhealthy; c++ {
		b, _ := json.Marshal(c)
		var back Code
		if err := json.Unmarshal(b, &back); err != nil || back != c {
			t.Errorf("code %d: %s -> %d %v", c, b, back, err)
		}
	}
	if CodeChunkCorrupt.String() != "chunk_corrupt" || Code(99).String() != "code_99" {
		t.Error("code names")
	}
	var c Code
	if err := json.Unmarshal([]byte(`"nonsense"`), &c); err == nil {
		t.Error("unknown code name accepted")
	}
}

func TestPermanentCodes(t *testing.T) {
	// PROTOCOL.md 10.1: permanent ones are not retried for the same key message,
	// transient ones are; ok and stale_key are neither.
	var permanent []string
	for c := CodeOK; c <= CodeUnhealthy; c++ {
		if c.Permanent() {
			permanent = append(permanent, c.String())
		}
	}
	if got, want := strings.Join(permanent, " "), "bad_message unwrap_failed bad_manifest rollback unsupported unhealthy"; got != want {
		t.Errorf("permanent codes %q, want %q", got, want)
	}
	if Code(99).Permanent() {
		t.Error("an unknown code is permanent")
	}
}

func TestErrors(t *testing.T) {
	err := fmt.Errorf("creating release: %w", Errorf(ErrVersionNotNewer, "version %d", 3))
	if CodeOf(err) != ErrVersionNotNewer || !errors.Is(err, &Error{Code: ErrVersionNotNewer}) {
		t.Errorf("CodeOf = %v", CodeOf(err))
	}
	if CodeOf(errors.New("boom")) != ErrInternal {
		t.Error("plain error is not internal")
	}
	b, _ := json.Marshal(Reply{ID: "r", Error: Errorf(ErrNotFound, "no device %q", "x")})
	if string(b) != `{"id":"r","ok":false,"error":{"code":"not_found","message":"no device \"x\""}}` {
		t.Errorf("reply JSON %s", b)
	}
}

func TestDeviceFileJSON(t *testing.T) {
	f := DeviceFile{Serial: "d", UnitData: HexBytes{0xab, 0x01}, Seq: 16, ChainLength: 16, ReleasePublicKey: HexBytes{1}}
	b, _ := json.Marshal(f)
	var back DeviceFile
	if err := json.Unmarshal(b, &back); err != nil || string(back.UnitData) != string(f.UnitData) {
		t.Fatalf("%s: %v", b, err)
	}
	if err := json.Unmarshal([]byte(`{"unit_data":"zz"}`), &back); err == nil {
		t.Error("bad hex accepted")
	}
}

// TestFiltersMatchTopics: every per-device filter is its topic with the serial replaced
// by '+', and the prefixes and multi-level filters are those of the topic functions.
func TestFiltersMatchTopics(t *testing.T) {
	const serial = "dev-1"
	for filter, topic := range map[string]string{
		AckFilter:          AckTopic(serial),
		KeyFilter:          KeyTopic(serial),
		ReceiptFilter:      ReceiptTopic(serial),
		StateFilter:        StateTopic(serial),
		PresenceFilter:     PresenceTopic(serial),
		DeviceStatusFilter: DeviceStatusTopic(serial),
	} {
		if got := strings.Replace(filter, "+", serial, 1); got != topic {
			t.Errorf("filter %s with %s is %s, want %s", filter, serial, got, topic)
		}
	}
	var id keychain.ReleaseID
	for prefix, topic := range map[string]string{
		DevicesPrefix:                          KeyTopic(serial),
		ReleasesPrefix:                         ManifestTopic(id),
		ReleaseStatusPrefix:                    ReleaseStatusTopic(id),
		DeviceStatusPrefix:                     DeviceStatusTopic(serial),
		UploadsPrefix:                          UploadTopic("u1", 0),
		AllFilter[:len(AllFilter)-1]:           FleetStatusTopic,
		ReleasesFilter[:len(ReleasesFilter)-1]: ChunkTopic(id, 3),
		AdminFilter[:len(AdminFilter)-1]:       ReplyTopic("r1"),
		StatusFilter[:len(StatusFilter)-1]:     FleetStatusTopic,
	} {
		if !strings.HasPrefix(topic, prefix) {
			t.Errorf("%s does not start with %s", topic, prefix)
		}
	}
	if DeviceFilter(serial)[:len(DeviceFilter(serial))-1] != DevicesPrefix+serial+"/" || UploadBase("u1")+"/0" != UploadTopic("u1", 0) {
		t.Errorf("DeviceFilter or UploadBase disagree with the topics: %s, %s", DeviceFilter(serial), UploadBase("u1"))
	}
}

// TestCodeClasses: every failure code is permanent or transient, never both; ok and
// stale_key are neither (PROTOCOL.md 10.1).
func TestCodeClasses(t *testing.T) {
	for c := CodeOK; c <= CodeUnhealthy; c++ {
		p, tr := c.Permanent(), c.Transient()
		neither := c == CodeOK || c == CodeStaleKey
		if p && tr || neither && (p || tr) || !neither && !p && !tr {
			t.Errorf("%s: permanent %v, transient %v", c, p, tr)
		}
	}
}

// TestOrderLane: OrderLane is FNV-1a of the OrderKey modulo n, the same for every topic of
// one device, and allocates nothing.
func TestOrderLane(t *testing.T) {
	for _, n := range []int{1, 4, 16} {
		h := fnv.New32a()
		h.Write([]byte(OrderKey(KeyTopic("dev-7"))))
		want := int(h.Sum32() % uint32(n))
		for _, topic := range []string{KeyTopic("dev-7"), ReceiptTopic("dev-7"), AckTopic("dev-7")} {
			if got := OrderLane(topic, n); got != want {
				t.Errorf("OrderLane(%s, %d) = %d, want %d", topic, n, got, want)
			}
		}
	}
	topic := KeyTopic("dev-7")
	if a := testing.AllocsPerRun(100, func() { OrderLane(topic, 16) }); a != 0 {
		t.Errorf("OrderLane allocates %v times", a)
	}
}

func TestReserved(t *testing.T) {
	for name, want := range map[string]bool{
		"admin": true, "monitor": true, "updater": true, "sealcast": true, "sealcast-updater-2": true,
		"Admin": false, "admins": false, "dev-admin": false, "sensor-0001": false, "seal": false,
	} {
		if got := Reserved(name); got != want {
			t.Errorf("Reserved(%q) = %v, want %v", name, got, want)
		}
	}
}

func TestWaveSizes(t *testing.T) {
	for _, c := range []struct {
		specs []string
		n     int
		want  []int
	}{
		{[]string{"25%", "50%"}, 12, []int{3, 6, 12}},
		{[]string{"1%", "10%", "100%"}, 1000, []int{10, 100, 1000}},
		{[]string{"1%"}, 10, []int{1, 10}}, // rounded up, never empty
		{[]string{"5", "100", "all"}, 50, []int{5, 50}},
		{[]string{"all"}, 7, []int{7}},
	} {
		got, err := WaveSizes(c.specs, c.n)
		if err != nil || !slices.Equal(got, c.want) {
			t.Errorf("WaveSizes(%q, %d) = %v, %v; want %v", c.specs, c.n, got, err, c.want)
		}
	}
	for _, bad := range [][]string{{"0%"}, {"101%"}, {"x"}, {"-3"}, {"50%", "10%"}} {
		if _, err := WaveSizes(bad, 100); CodeOf(err) != ErrBadRequest {
			t.Errorf("WaveSizes(%q): %v, want bad_request", bad, err)
		}
	}
	if n, err := FailureLimit("5%", 40); err != nil || n != 2 {
		t.Errorf("FailureLimit(5%%, 40) = %d, %v; want 2", n, err)
	}
	if n, err := FailureLimit("", 40); err != nil || n != -1 {
		t.Errorf("no threshold: %d, %v", n, err)
	}
	serials := make([]string, 20)
	for i := range serials {
		serials[i] = fmt.Sprintf("dev-%02d", i)
	}
	id := keychain.ReleaseID{1}
	a := RolloutOrder(id, serials)
	reversed := slices.Clone(serials)
	slices.Reverse(reversed)
	if !slices.Equal(a, RolloutOrder(id, reversed)) {
		t.Error("RolloutOrder depends on the input order")
	}
	// By SHA256(release_id || serial): 20! orders, so two releases order them alike
	// with a probability of 4e-19.
	if slices.Equal(a, RolloutOrder(keychain.ReleaseID{2}, serials)) {
		t.Error("two releases order their devices alike")
	}
	if first := sha256.Sum256(append(id[:], a[0]...)); bytes.Compare(first[:], sha256Of(id, a[1])) > 0 {
		t.Error("RolloutOrder is not by SHA256(release_id || serial)")
	}
}

func sha256Of(id keychain.ReleaseID, s string) []byte {
	h := sha256.Sum256(append(id[:], s...))
	return h[:]
}

func TestWindow(t *testing.T) {
	w, err := ParseWindow("Mon-Fri 01:00-05:00 Europe/Berlin")
	if err != nil {
		t.Fatal(err)
	}
	berlin, _ := time.LoadLocation("Europe/Berlin")
	for at, want := range map[string]bool{
		"2026-12-24 01:00": true,  // Thursday
		"2026-12-24 04:59": true,  //
		"2026-12-24 05:00": false, // the end is not in it
		"2026-12-24 00:59": false,
		"2026-12-26 02:00": false, // Saturday
	} {
		tm, _ := time.ParseInLocation("2006-01-02 15:04", at, berlin)
		if got := w.Contains(tm.UTC()); got != want {
			t.Errorf("%s Berlin: %v, want %v", at, got, want)
		}
	}
	night, err := ParseWindow("Fri,Sun 22:00-02:00")
	if err != nil {
		t.Fatal(err)
	}
	for at, want := range map[string]bool{
		"2026-12-25 23:00": true,  // Friday night
		"2026-12-26 01:59": true,  // Saturday morning, still Friday's window
		"2026-12-26 23:00": false, // Saturday night
		"2026-12-28 01:00": true,  // Monday morning, Sunday's window
	} {
		tm, _ := time.Parse("2006-01-02 15:04", at)
		if got := night.Contains(tm); got != want {
			t.Errorf("%s UTC: %v, want %v", at, got, want)
		}
	}
	for _, bad := range []string{"", "Mon", "Funday 01:00-02:00", "Mon 1-2", "Mon 01:00-02:00 Mars/Olympus", "* 25:00-26:00"} {
		if _, err := ParseWindow(bad); CodeOf(err) != ErrBadRequest {
			t.Errorf("ParseWindow(%q): %v, want bad_request", bad, err)
		}
	}
}
