package protocol

import (
	"fmt"
	"maps"
	"slices"
	"strings"
)

// Device tags (PROTOCOL.md 12.4): key=value labels that releases select devices by.
const (
	MaxTags        = 16 // per device
	maxTagKeyLen   = 32
	maxTagValueLen = 64
)

// CheckTag reports whether key=value is a valid tag ([SC-12.4]): a key of 1 to 32
// characters of a-z 0-9 . _ -, starting with a letter or digit, and a value of 0 to 64
// characters of A-Z a-z 0-9 . _ - : /.
func CheckTag(key, value string) error {
	if len(key) == 0 || len(key) > maxTagKeyLen || !lowerDigit(key[0]) {
		return Errorf(ErrBadRequest, "tag key %q: use 1 to %d characters of a-z 0-9 . _ -, starting with a letter or digit", key, maxTagKeyLen)
	}
	for i := 0; i < len(key); i++ {
		if c := key[i]; !lowerDigit(c) && c != '.' && c != '_' && c != '-' {
			return Errorf(ErrBadRequest, "tag key %q: use 1 to %d characters of a-z 0-9 . _ -, starting with a letter or digit", key, maxTagKeyLen)
		}
	}
	if len(value) > maxTagValueLen {
		return Errorf(ErrBadRequest, "tag %s: value of %d characters; at most %d", key, len(value), maxTagValueLen)
	}
	for i := 0; i < len(value); i++ {
		if c := value[i]; !lowerDigit(c) && !(c >= 'A' && c <= 'Z') && !strings.ContainsRune("._-:/", rune(c)) {
			return Errorf(ErrBadRequest, "tag %s: value %q: use A-Z a-z 0-9 . _ - : /", key, value)
		}
	}
	return nil
}

func lowerDigit(c byte) bool { return c >= 'a' && c <= 'z' || c >= '0' && c <= '9' }

// CheckTags checks every tag of a device and their number.
func CheckTags(tags map[string]string) error {
	if len(tags) > MaxTags {
		return Errorf(ErrBadRequest, "%d tags; a device has at most %d", len(tags), MaxTags)
	}
	for _, k := range slices.Sorted(maps.Keys(tags)) {
		if err := CheckTag(k, tags[k]); err != nil {
			return err
		}
	}
	return nil
}

// FormatTags writes tags as k=v pairs separated by commas, sorted by key: the form the
// CLI takes and prints, and ParseTags reads.
func FormatTags(tags map[string]string) string {
	var b strings.Builder
	for i, k := range slices.Sorted(maps.Keys(tags)) {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(k + "=" + tags[k])
	}
	return b.String()
}

// ParseTags reads k=v pairs separated by commas ("" is no tag). A key given twice is an
// error.
func ParseTags(s string) (map[string]string, error) {
	tags := map[string]string{}
	if s == "" {
		return tags, nil
	}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, Errorf(ErrBadRequest, "tag %q: write key=value", kv)
		}
		if _, dup := tags[k]; dup {
			return nil, Errorf(ErrBadRequest, "tag key %q given twice", k)
		}
		if err := CheckTag(k, v); err != nil {
			return nil, err
		}
		tags[k] = v
	}
	return tags, nil
}

// Matches reports whether a device with tags is selected by sel: every pair of sel is
// one of the device's tags ([SC-12.4]). An empty selector matches every device.
func Matches(tags, sel map[string]string) bool {
	for k, v := range sel {
		if got, ok := tags[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// TagArgs are the arguments of device.tag: tags to set (added or replaced) and keys to
// remove, on one device.
type TagArgs struct {
	Serial string            `json:"serial"`
	Set    map[string]string `json:"set,omitempty"`
	Unset  []string          `json:"unset,omitempty"`
}

// String is for logs.
func (a TagArgs) String() string {
	return fmt.Sprintf("%s +%s -%v", a.Serial, FormatTags(a.Set), a.Unset)
}
