package protocol

import (
	"fmt"
	"strings"
	"time"
)

// Window is a weekly maintenance window ([SC-12.6]): the days it opens on, its start and
// end as times of day, and the time zone they are read in. An end at or before the start
// closes the window on the next day.
type Window struct {
	days       [7]bool // by time.Weekday
	from, to   time.Duration
	loc        *time.Location
	spec       string
	crossesDay bool
}

var weekdays = map[string]time.Weekday{
	"sun": time.Sunday, "mon": time.Monday, "tue": time.Tuesday, "wed": time.Wednesday,
	"thu": time.Thursday, "fri": time.Friday, "sat": time.Saturday,
}

// ParseWindow reads "DAYS HH:MM-HH:MM [ZONE]": DAYS is "*" or comma-separated days and
// ranges of days (Mon-Fri,Sun), times are 24-hour, and ZONE is an IANA time zone name
// (default UTC), e.g. "Mon-Fri 01:00-05:00 Europe/Berlin".
func ParseWindow(s string) (*Window, error) {
	bad := func(format string, args ...any) (*Window, error) {
		return nil, Errorf(ErrBadRequest, "window %q: %s; write DAYS HH:MM-HH:MM [ZONE], e.g. Mon-Fri 01:00-05:00 Europe/Berlin", s, fmt.Sprintf(format, args...))
	}
	f := strings.Fields(s)
	if len(f) < 2 || len(f) > 3 {
		return bad("three parts at most")
	}
	w := &Window{loc: time.UTC, spec: s}
	if f[0] == "*" {
		w.days = [7]bool{true, true, true, true, true, true, true}
	} else {
		for _, part := range strings.Split(f[0], ",") {
			a, b, isRange := strings.Cut(strings.ToLower(part), "-")
			da, ok1 := weekdays[a]
			db, ok2 := weekdays[b]
			if !ok1 || isRange && !ok2 {
				return bad("unknown day in %q", part)
			}
			if !isRange {
				db = da
			}
			for d := da; ; d = (d + 1) % 7 {
				w.days[d] = true
				if d == db {
					break
				}
			}
		}
	}
	from, to, ok := strings.Cut(f[1], "-")
	var err1, err2 error
	w.from, err1 = timeOfDay(from)
	w.to, err2 = timeOfDay(to)
	if !ok || err1 != nil || err2 != nil {
		return bad("times must be HH:MM-HH:MM")
	}
	w.crossesDay = w.to <= w.from
	if len(f) == 3 {
		loc, err := time.LoadLocation(f[2])
		if err != nil {
			return bad("unknown time zone %q", f[2])
		}
		w.loc = loc
	}
	return w, nil
}

func timeOfDay(s string) (time.Duration, error) {
	t, err := time.Parse("15:04", s)
	if err != nil {
		return 0, err
	}
	return time.Duration(t.Hour())*time.Hour + time.Duration(t.Minute())*time.Minute, nil
}

// Contains reports whether the window is open at t.
func (w *Window) Contains(t time.Time) bool {
	t = t.In(w.loc)
	tod := time.Duration(t.Hour())*time.Hour + time.Duration(t.Minute())*time.Minute + time.Duration(t.Second())*time.Second
	if !w.crossesDay {
		return w.days[t.Weekday()] && tod >= w.from && tod < w.to
	}
	// Open from `from` on an opening day until `to` on the day after.
	if w.days[t.Weekday()] && tod >= w.from {
		return true
	}
	return w.days[(t.Weekday()+6)%7] && tod < w.to
}

// String returns the window as it was written.
func (w *Window) String() string { return w.spec }
