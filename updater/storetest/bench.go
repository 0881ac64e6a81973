package storetest

import (
	"fmt"
	"testing"

	"github.com/sealcast/sealcast/updater"
)

// BenchmarkAdvance measures Advance in batches of batch devices: each iteration moves every
// device of the batch down one step, as a burst of acks would. It reports advances/s.
func BenchmarkAdvance(b *testing.B, s updater.Store, batch int) {
	ctx := b.Context()
	devs := benchDevices(b, s, batch)
	as := make([]updater.Advance, batch)
	for i, d := range devs {
		as[i] = updater.Advance{
			Serial: d.Serial, ChainLength: d.ChainLength, Chain: make([]byte, 120), Version: 2,
			LastAck: make([]byte, 90), LastReceipt: make([]byte, 70), State: "installed", LastResult: "ok", At: t0,
		}
	}
	seq := devs[0].Seq
	for b.Loop() {
		for i := range as {
			as[i].From = updater.Position{Seq: seq}
			as[i].To = updater.Position{Seq: seq - 1}
		}
		ok, err := s.Advance(ctx, as)
		if err != nil {
			b.Fatal(err)
		}
		for i := range ok {
			if !ok[i] {
				b.Fatalf("advance of %s from %d did not apply", as[i].Serial, seq)
			}
		}
		seq--
	}
	b.ReportMetric(float64(b.N*batch)/b.Elapsed().Seconds(), "advances/s")
}

// BenchmarkDevices measures reading batch devices with one Devices call. It reports
// devices/s.
func BenchmarkDevices(b *testing.B, s updater.Store, batch int) {
	devs := benchDevices(b, s, batch)
	serials := make([]string, len(devs))
	for i, d := range devs {
		serials[i] = d.Serial
	}
	for b.Loop() {
		got, err := s.Devices(b.Context(), serials)
		if err != nil || len(got) != batch || got[batch-1] == nil {
			b.Fatalf("Devices: %d devices, %v", len(got), err)
		}
	}
	b.ReportMetric(float64(b.N*batch)/b.Elapsed().Seconds(), "devices/s")
}

func benchDevices(b *testing.B, s updater.Store, n int) []*updater.Device {
	devs := make([]*updater.Device, n)
	for i := range devs {
		d := NewDevice(fmt.Sprintf("bench-%06d", i))
		d.Seq, d.ChainLength = 1<<31, 1<<31
		d.Chain = make([]byte, 120)
		d.LastAck, d.LastReceipt = make([]byte, 90), make([]byte, 70)
		devs[i] = d
	}
	if _, err := s.CreateDevices(b.Context(), devs); err != nil {
		b.Fatal(err)
	}
	return devs
}
