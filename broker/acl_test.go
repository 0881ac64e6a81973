package broker

import "testing"

func TestFilterWithin(t *testing.T) {
	tests := []struct {
		f, p string
		want bool
	}{
		{"sealcast/releases/x/manifest", "sealcast/releases/#", true},
		{"sealcast/releases/+/manifest", "sealcast/releases/#", true},
		{"sealcast/releases/#", "sealcast/releases/#", true},
		{"sealcast/releases", "sealcast/releases/#", true},
		{"sealcast/#", "sealcast/releases/#", false},
		{"#", "sealcast/releases/#", false},
		{"+/releases/x", "sealcast/releases/#", false},
		{"sealcast/+/x", "sealcast/releases/#", false},
		{"sealcast/devices/a/state", "sealcast/devices/+/state", true},
		{"sealcast/devices/+/state", "sealcast/devices/+/state", true},
		{"sealcast/devices/#", "sealcast/devices/+/state", false},
		{"sealcast/devices/+/#", "sealcast/devices/+/state", false},
		{"sealcast/devices/a/state/x", "sealcast/devices/+/state", false},
		{"sealcast/devices/a", "sealcast/devices/+/state", false},
		{"sealcast/devices/+/+", "sealcast/devices/+/state", false},
		{"$SYS/broker/uptime", "#", false},
		{"sealcast", "sealcast/#", true},
		{"sealcastx/a", "sealcast/#", false},
		{"", "sealcast/#", false},
	}
	for _, tt := range tests {
		if got := filterWithin(tt.f, tt.p); got != tt.want {
			t.Errorf("filterWithin(%q, %q) = %v, want %v", tt.f, tt.p, got, tt.want)
		}
	}
}

func TestAllowed(t *testing.T) {
	const A, W, R = "dev-a", true, false
	tests := []struct {
		role  Role
		topic string
		write bool
		want  bool
	}{
		// Devices read releases and their own key and receipt. [SC-9.2]
		{RoleDevice, "sealcast/releases/#", R, true},
		{RoleDevice, "sealcast/releases/+/manifest", R, true},
		{RoleDevice, "sealcast/releases/00/chunks/3", R, true},
		{RoleDevice, "$share/g/sealcast/releases/#", R, true},
		{RoleDevice, "sealcast/devices/dev-a/key", R, true},
		{RoleDevice, "sealcast/devices/dev-a/receipt", R, true},
		{RoleDevice, "sealcast/devices/dev-a/ack", R, false},
		{RoleDevice, "sealcast/devices/dev-b/key", R, false},
		{RoleDevice, "sealcast/devices/dev-a-x/key", R, false},
		{RoleDevice, "sealcast/devices/dev-a/key/x", R, false},
		{RoleDevice, "sealcast/devices/+/key", R, false},
		{RoleDevice, "sealcast/devices/#", R, false},
		{RoleDevice, "sealcast/devices/dev-a/#", R, false},
		{RoleDevice, "sealcast/devices/dev-a/+", R, false},
		{RoleDevice, "#", R, false},
		{RoleDevice, "+/+/+/+", R, false},
		{RoleDevice, "$share/g/sealcast/devices/dev-b/key", R, false},
		{RoleDevice, "$share/g/#", R, false},
		{RoleDevice, "$share//sealcast/releases/#", R, false},
		{RoleDevice, "$share/g", R, false},
		{RoleDevice, "$SYS/#", R, false},
		{RoleDevice, "sealcast/status/fleet", R, false},
		// Devices write only their own ack, state and presence.
		{RoleDevice, "sealcast/devices/dev-a/ack", W, true},
		{RoleDevice, "sealcast/devices/dev-a/state", W, true},
		{RoleDevice, "sealcast/devices/dev-a/presence", W, true},
		{RoleDevice, "sealcast/devices/dev-a/key", W, false},
		{RoleDevice, "sealcast/devices/dev-a/receipt", W, false},
		{RoleDevice, "sealcast/devices/dev-b/ack", W, false},
		{RoleDevice, "sealcast/devices/dev-a", W, false},
		{RoleDevice, "sealcast/devices/dev-a/", W, false},
		{RoleDevice, "sealcast/releases/00/manifest", W, false},
		{RoleDevice, "sealcast/admin/requests", W, false},
		// Admin.
		{RoleAdmin, "sealcast/admin/requests", W, true},
		{RoleAdmin, "sealcast/admin/uploads/u/0", W, true},
		{RoleAdmin, "sealcast/releases/00/manifest", W, false},
		{RoleAdmin, "sealcast/devices/x/ack", W, false},
		{RoleAdmin, "#", R, true},
		{RoleAdmin, "$SYS/#", R, true},
		// Monitor.
		{RoleMonitor, "sealcast/status/#", R, true},
		{RoleMonitor, "sealcast/status/devices/x", R, true},
		{RoleMonitor, "sealcast/devices/+/state", R, true},
		{RoleMonitor, "sealcast/devices/x/presence", R, true},
		{RoleMonitor, "sealcast/devices/x/key", R, false},
		{RoleMonitor, "sealcast/devices/#", R, false},
		{RoleMonitor, "#", R, false},
		{RoleMonitor, "sealcast/status/fleet", W, false},
		{RoleMonitor, "sealcast/devices/x/state", W, false},
		// Updater.
		{RoleUpdater, "sealcast/#", R, true},
		{RoleUpdater, "$share/updater/sealcast/devices/+/ack", R, true},
		{RoleUpdater, "sealcast/devices/x/key", W, true},
		{RoleUpdater, "#", R, false},
		{RoleUpdater, "$SYS/#", R, false},
		{RoleUpdater, "other/topic", W, false},
		// Unknown role.
		{Role("root"), "sealcast/status/fleet", R, false},
	}
	for _, tt := range tests {
		if got := Allowed(tt.role, A, tt.topic, tt.write); got != tt.want {
			t.Errorf("Allowed(%s, %q, %q, write=%v) = %v, want %v", tt.role, A, tt.topic, tt.write, got, tt.want)
		}
	}
}

func TestAllowedDoesNotAllocate(t *testing.T) {
	n := testing.AllocsPerRun(100, func() {
		Allowed(RoleDevice, "dev-a", "$share/g/sealcast/releases/+/manifest", false)
		Allowed(RoleDevice, "dev-a", "sealcast/devices/dev-a/ack", true)
		Allowed(RoleMonitor, "", "sealcast/devices/x/presence", false)
	})
	if n != 0 {
		t.Fatalf("Allowed allocates %v times per call set; it runs for every delivery", n)
	}
}

func TestRetainAllowed(t *testing.T) {
	for topic, want := range map[string]bool{
		"sealcast/devices/dev-1/ack":      false,
		"sealcast/admin/requests":         false,
		"sealcast/admin/uploads/u/3":      false,
		"sealcast/admin/replies/r1":       false,
		"sealcast/devices/dev-1/key":      true,
		"sealcast/devices/dev-1/receipt":  true,
		"sealcast/devices/dev-1/presence": true,
		"sealcast/devices/dev-1/state":    true,
		"sealcast/releases/x/chunks/0":    true,
		"sealcast/status/fleet":           true,
	} {
		if got := RetainAllowed(topic); got != want {
			t.Errorf("RetainAllowed(%q) = %v, want %v", topic, got, want)
		}
	}
}

func TestHealthProbeHasNoRights(t *testing.T) {
	for _, f := range []string{"#", "sealcast/#", "sealcast/status/fleet", "$SYS/#"} {
		if Allowed(roleHealth, "", f, false) || Allowed(roleHealth, "", f, true) {
			t.Errorf("the health probe may use %s", f)
		}
	}
}

func TestRepublished(t *testing.T) {
	for topic, want := range map[string]bool{
		"sealcast/devices/dev-1/key":      true,
		"sealcast/devices/dev-1/receipt":  true,
		"sealcast/devices/dev-1/presence": false,
		"sealcast/devices/dev-1/state":    false,
		"sealcast/status/fleet":           false,
		"sealcast/releases/x/chunks/0":    false,
		"sealcast/releases/x/manifest":    false,
	} {
		if got := republished(topic); got != want {
			t.Errorf("republished(%q) = %v, want %v", topic, got, want)
		}
	}
}
