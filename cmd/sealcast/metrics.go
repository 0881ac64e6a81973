package main

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sealcast/sealcast/protocol"
)

// histograms are the timings the updater measures (updater.Observer).
type histograms struct {
	ack, install prometheus.Histogram
}

func newHistograms() *histograms {
	return &histograms{
		ack: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "sealcast_ack_seconds",
			Help:    "Time from an ack's or report's arrival to its answer (receipt published, or dropped).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10), // 0.5 ms to 131 s
		}),
		install: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "sealcast_install_seconds",
			Help:    "Time from the opening of a device's wave (its release's creation, without waves) to the server accepting its install.",
			Buckets: prometheus.ExponentialBuckets(1, 4, 10), // 1 s to 3 days
		}),
	}
}

func (h *histograms) AckHandled(d time.Duration) { h.ack.Observe(d.Seconds()) }
func (h *histograms) Installed(d time.Duration)  { h.install.Observe(d.Seconds()) }

// buildInfo is sealcast_build_info: 1, labelled with the version, VCS revision and Go
// version (the Prometheus convention).
func buildInfo() prometheus.Collector {
	v, rev, gov := buildVersion()
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "sealcast_build_info",
		Help:        "The running sealcast's version, VCS revision and Go version; always 1.",
		ConstLabels: prometheus.Labels{"version": v, "revision": rev, "goversion": gov},
	})
	g.Set(1)
	return g
}

// collector exposes the updater's and broker's counters to Prometheus, read at scrape
// time so that nothing is counted twice.
type collector struct {
	s     *stack
	descs map[string]*prometheus.Desc
}

func newCollector(s *stack) *collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("sealcast_"+name, help, labels, nil)
	}
	return &collector{s: s, descs: map[string]*prometheus.Desc{
		"keys":      d("keys_published_total", "Key messages (wrapped keys and re-keys) published."),
		"rekeys":    d("rekeys_total", "Re-key messages published."),
		"accepted":  d("acks_accepted_total", "Acks that moved a device's counter."),
		"duplicate": d("acks_duplicate_total", "Acks answered again as duplicates."),
		"rejected":  d("acks_rejected_total", "Acks that changed nothing, by reason.", "reason"),
		"shed":      d("acks_shed_total", "Acks dropped because the queue was full (devices re-send)."),
		"reports":   d("install_failures_total", "Failure reports recorded from devices."),
		"resyncs":   d("resyncs_total", "Counters moved down to meet a device that was ahead."),
		"reoffers":  d("reoffers_total", "Key messages published again for a device that got an outdated one."),
		"waves":     d("waves_opened_total", "Waves opened after a release's first (PROTOCOL.md 12.5)."),
		"stops":     d("rollout_stops_total", "Releases paused or cancelled by their failure threshold."),
		"retries":   d("fanout_retries_total", "Batches of a key fan-out wrapped again after a store or broker error."),
		"claims":    d("claims_total", "Acks and stale_key reports whose version or device_seq differs from what the server recorded; a claim is never believed."),
		"connected": d("broker_clients_connected", "MQTT clients connected to the embedded broker."),
		"authfail":  d("broker_auth_failures_total", "Connections refused."),
		"acl":       d("broker_acl_denials_total", "Subscriptions, publishes and deliveries refused."),
		"dropped":   d("broker_dropped_total", "Deliveries the broker dropped, by reason.", "reason"),
		"slow":      d("broker_slow_consumers_total", "Clients disconnected because they did not read what they were sent."),
		"releases":  d("releases", "Releases by state.", "state"),
		"devices":   d("devices", "Provisioned devices."),
		"online":    d("devices_online", "Devices whose retained presence is online."),
		"storelat":  d("store_latency_seconds", "Time of one store read at scrape time."),
		"queue":     d("updater_queue_depth", "Messages waiting for the updater's workers, by queue.", "queue"),
	}}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	counter := func(name string, v int64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(c.descs[name], prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(name string, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(c.descs[name], prometheus.GaugeValue, v, labels...)
	}
	st := c.s.upd.Stats()
	counter("keys", st.KeysPublished)
	counter("rekeys", st.Rekeys)
	counter("accepted", st.AcksAccepted)
	counter("duplicate", st.AcksDuplicate)
	counter("shed", st.AcksShed)
	counter("reports", st.ReportsRecorded)
	counter("resyncs", st.Resyncs)
	counter("reoffers", st.Reoffers)
	counter("claims", st.Claims)
	counter("waves", st.WavesOpened)
	counter("retries", st.FanoutRetries)
	counter("stops", st.RolloutStops)
	gauge("online", float64(st.Online))
	gauge("queue", float64(st.AckQueue), "acks")
	gauge("queue", float64(st.AdminQueue), "admin")
	for _, r := range []string{"malformed", "unknown_device", "forged", "stale", "unassigned", "internal"} {
		counter("rejected", st.AcksRejected[r], r)
	}
	if b := c.s.broker; b != nil {
		bs := b.Stats()
		gauge("connected", float64(bs.Connected))
		counter("authfail", bs.AuthFailures)
		counter("acl", bs.ACLDenials)
		counter("dropped", bs.DroppedQueueFull, "queue_full")
		counter("dropped", bs.DroppedInflight, "inflight")
		counter("dropped", bs.DroppedDeviceQueue, "device_queue")
		counter("slow", bs.SlowConsumers)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	if serials, err := c.s.store.Serials(ctx); err == nil {
		gauge("storelat", time.Since(start).Seconds())
		gauge("devices", float64(len(serials)))
	}
	if rels, err := c.s.store.Releases(ctx); err == nil {
		by := map[protocol.ReleaseState]int{}
		for _, r := range rels {
			by[r.State]++
		}
		for _, state := range protocol.ReleaseStates {
			gauge("releases", float64(by[state]), string(state))
		}
	}
}
