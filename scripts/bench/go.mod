// The benchmark tools (docs/BENCHMARKS.md): their own module, so that what only they need
// (gonum/plot) stays out of the product's module graph.
module github.com/sealcast/sealcast/scripts/bench

go 1.26.0

require (
	github.com/eclipse/paho.mqtt.golang v1.5.1
	github.com/rs/zerolog v1.35.1
	github.com/sealcast/sealcast v0.0.0
	gonum.org/v1/plot v0.17.0
)

require (
	codeberg.org/go-fonts/liberation v0.5.0 // indirect
	codeberg.org/go-latex/latex v0.2.0 // indirect
	codeberg.org/go-pdf/fpdf v0.11.1 // indirect
	git.sr.ht/~sbinet/gg v0.7.0 // indirect
	github.com/ajstarks/svgo v0.0.0-20211024235047-1546f124cd8b // indirect
	github.com/golang/freetype v0.0.0-20170609003504-e2365dfdc4a0 // indirect
	github.com/gorilla/websocket v1.5.3 // indirect
	github.com/mattn/go-colorable v0.1.14 // indirect
	github.com/mattn/go-isatty v0.0.22 // indirect
	golang.org/x/image v0.30.0 // indirect
	golang.org/x/net v0.62.0 // indirect
	golang.org/x/sync v0.25.0 // indirect
	golang.org/x/sys v0.50.0 // indirect
	golang.org/x/text v0.44.0 // indirect
)

// The product, from this checkout; and its patched mochi (docs/BROKER.md), since a
// dependency's replace directives do not apply here.
replace (
	github.com/mochi-mqtt/server/v2 => ../../third_party/mochi
	github.com/sealcast/sealcast => ../..
)
