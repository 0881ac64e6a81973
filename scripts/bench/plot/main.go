// Command plot draws the end-to-end benchmark's time-to-percent-installed curves
// (scripts/bench/e2e writes them to e2e.csv) as a PNG, one line per scenario:
//
//	go run ./scripts/bench/plot -in docs/bench/e2e.csv -out docs/bench/e2e.png
package main

import (
	"encoding/csv"
	"flag"
	"fmt"
	"os"
	"strconv"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

func main() {
	in := flag.String("in", "docs/bench/e2e.csv", "curves written by scripts/bench/e2e")
	out := flag.String("out", "docs/bench/e2e.png", "PNG to write")
	title := flag.String("title", "Time to installed and acked", "chart title")
	flag.Parse()
	if err := draw(*in, *out, *title); err != nil {
		fmt.Fprintln(os.Stderr, "plot:", err)
		os.Exit(1)
	}
}

func draw(in, out, title string) error {
	f, err := os.Open(in)
	if err != nil {
		return err
	}
	defer f.Close()
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil {
		return fmt.Errorf("%s: %w", in, err)
	}
	// Rows are scenario,title,seconds,percent with a header; keep the scenarios' order.
	var order []string
	curves := map[string]plotter.XYs{}
	for i, r := range rows {
		if i == 0 || len(r) != 4 {
			continue
		}
		x, err1 := strconv.ParseFloat(r[2], 64)
		y, err2 := strconv.ParseFloat(r[3], 64)
		if err1 != nil || err2 != nil {
			return fmt.Errorf("%s line %d: bad numbers %q, %q", in, i+1, r[2], r[3])
		}
		if _, ok := curves[r[1]]; !ok {
			order = append(order, r[1])
		}
		curves[r[1]] = append(curves[r[1]], plotter.XY{X: x, Y: y})
	}
	if len(order) == 0 {
		return fmt.Errorf("%s holds no curve", in)
	}
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = "seconds since release.create"
	p.Y.Label.Text = "% of devices installed and acked"
	p.Y.Min, p.Y.Max = 0, 100
	// Bottom right, clear of the 0 % line: by the end of the slowest curve the others
	// are at 100 %, and it is past half.
	p.Legend.Top, p.Legend.Left, p.Legend.YOffs = false, false, vg.Centimeter
	p.Add(plotter.NewGrid())
	var lines []any
	for _, name := range order {
		lines = append(lines, name, curves[name])
	}
	if err := plotutil.AddLines(p, lines...); err != nil {
		return err
	}
	return p.Save(18*vg.Centimeter, 11*vg.Centimeter, out)
}
