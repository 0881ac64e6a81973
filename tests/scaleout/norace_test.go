//go:build !race

package scaleout_test

const raceEnabled = false
