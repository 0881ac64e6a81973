package main

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"time"
)

// curveCSV is the time-to-percent-installed curve of every scenario, for the plot:
// scenario,title,seconds,percent, at most about 200 points a curve (every step-th device
// and the last), which a chart cannot tell from all of them.
func curveCSV(rs []*result) string {
	var b strings.Builder
	b.WriteString("scenario,title,seconds,percent\n")
	for _, r := range rs {
		fmt.Fprintf(&b, "%s,%q,0,0\n", r.Key, r.Title)
		step := max(1, len(r.Times)/200)
		for i, t := range r.Times {
			if (i+1)%step == 0 || i == len(r.Times)-1 {
				fmt.Fprintf(&b, "%s,%q,%.3f,%.3f\n", r.Key, r.Title, t, 100*float64(i+1)/float64(r.Devices))
			}
		}
	}
	return b.String()
}

// machine describes where the figures were taken.
func machine() string {
	model, cores := "unknown CPU", runtime.NumCPU()
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "model name"); ok {
				model = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	mem := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb int64
		fmt.Sscanf(strings.SplitN(string(b), "\n", 2)[0], "MemTotal: %d kB", &kb)
		mem = fmt.Sprintf(", %d GiB", (kb+512<<10)>>20)
	}
	load := ""
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		load = ", load average " + strings.Join(strings.Fields(string(b))[:3], " ") + " at the end"
	}
	return fmt.Sprintf("%d cores (%s)%s, %s/%s, %s%s", cores, model, mem, runtime.GOOS, runtime.GOARCH, runtime.Version(), load)
}

func mib(kib int64) string { return fmt.Sprintf("%.0f", float64(kib)/1024) }

func mb(n int64) string {
	if n < 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.1f", float64(n)/1e6)
}

func ratio(a, b float64) string {
	if b <= 0 || a < 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.1f×", a/b)
}

// markdown renders the tables of docs/bench/e2e.md.
func markdown(c config, rs []*result) string {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	p("<!-- Written by scripts/bench.sh (scripts/bench/e2e); do not edit by hand. -->\n")
	p("# End-to-end benchmark: latest run\n\n")
	p("%s; %s.\n\n", time.Now().UTC().Format("2006-01-02 15:04 MST"), machine())
	p("Image %d bytes (chunk size %s); every device a separate MQTT connection over TCP on 127.0.0.1, "+
		"all devices in one simulator process; `sealcast serve` with its embedded store. "+
		"Times are seconds from the first release.create (for the activate and prefetch scenarios, from the release's start time, when its keys go out) (the operator uploads the image before, unmeasured); CPU is user+system seconds from then until the last device confirmed; "+
		"peak RSS is the process's VmHWM.\n\n", rs[0].ImageSize, chunkName(c.chunkSize))

	p("| scenario | devices | releases | created in s | t50 s | t90 s | t100 s | confirmed | server counted |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range rs {
		p("| %s | %d | %d | %.1f | %.1f | %.1f | %.1f | %d | %d |\n", r.Title, r.Devices, r.Releases, r.Published, r.T50, r.T90, r.T100, r.Confirmed, r.ServerInstalled)
	}
	p("\n| scenario | server CPU s | server RSS before the release MiB | server peak RSS MiB | simulator CPU s | simulator peak RSS MiB | Mosquitto CPU s | Mosquitto peak RSS MiB |\n|---|---|---|---|---|---|---|---|\n")
	for _, r := range rs {
		mc, mr := "–", "–"
		if r.Mosquitto != nil {
			mc, mr = fmt.Sprintf("%.1f", r.Mosquitto.CPU), mib(r.Mosquitto.PeakRSS)
		}
		p("| %s | %.1f | %s | %s | %.1f | %s | %s | %s |\n", r.Title, r.Server.CPU, mib(r.Server.IdleRSS), mib(r.Server.PeakRSS), r.Sim.CPU, mib(r.Sim.PeakRSS), mc, mr)
	}
	p("\n| scenario | MB into the broker | MB retained | of which image (releases/) | retained messages read back | broker's count ($SYS, incl. its own) | MB in the embedded broker's store |\n|---|---|---|---|---|---|---|\n")
	for _, r := range rs {
		disk := "–"
		if r.BrokerDisk > 0 {
			disk = mb(r.BrokerDisk)
		}
		p("| %s | %s | %s | %s | %d | %d | %s |\n", r.Title, mb(r.BytesIn), mb(r.Retained.Bytes), mb(r.Retained.ImageBytes), r.Retained.Messages, r.Retained.BrokerCount, disk)
	}

	var env, per *result
	for _, r := range rs {
		switch r.Key {
		case "envelope":
			env = r
		case "perdevice":
			per = r
		}
	}
	if env != nil && per != nil {
		// The baseline may run with fewer devices; compare per device.
		k := float64(env.Devices) / float64(per.Devices)
		p("\nPer-device images against the envelope, in the same run")
		if per.Devices != env.Devices {
			p(" (the baseline's figures scaled from %d to %d devices)", per.Devices, env.Devices)
		}
		p(":\n\n")
		p("| figure | ratio |\n|---|---|\n")
		p("| bytes published into the broker | %s |\n", ratio(float64(per.BytesIn)*k, float64(env.BytesIn)))
		p("| bytes retained by the broker | %s |\n", ratio(float64(per.Retained.Bytes)*k, float64(env.Retained.Bytes)))
		p("| server CPU seconds | %s |\n", ratio(per.Server.CPU*k, env.Server.CPU))
		p("| time to 100 %% installed | %s |\n", ratio(per.T100, env.T100))
		perDev := float64(per.Retained.ImageBytes) / float64(per.Devices)
		p("\nRetained image bytes per device in the baseline: %.0f; at 100,000 devices that is %.1f GB, "+
			"against %.1f MB for the envelope's one image (plus %d bytes a device of receipts, states and statuses).\n",
			perDev, perDev*1e5/1e9, float64(env.Retained.ImageBytes)/1e6, (env.Retained.Bytes-env.Retained.ImageBytes)/int64(env.Devices))
	}
	p("\nSimulator summaries:\n\n")
	for _, r := range rs {
		p("- %s: %s\n", r.Key, r.SimSummary)
	}
	return b.String()
}

func chunkName(n uint) string {
	if n == 0 {
		return "the server's default, 64 KiB"
	}
	return fmt.Sprintf("%d bytes", n)
}
