package protocol

import (
	"errors"
	"fmt"
)

// Code is a device report code (PROTOCOL.md 15.1), be16 in reports, a name in JSON.
type Code uint16

// Device report codes.
const (
	CodeOK            Code = 0
	CodeBadMessage    Code = 1
	CodeUnwrapFailed  Code = 2
	CodeBadManifest   Code = 3
	CodeRollback      Code = 4
	CodeChunkCorrupt  Code = 5
	CodeImageCorrupt  Code = 6
	CodeInstallFailed Code = 7
	CodeStaleKey      Code = 8
	CodeTimeout       Code = 9
	CodeUnsupported   Code = 10
	// CodeUnhealthy: the image installed, but failed its health check on trial (or its
	// trial boots ran out) and the device went back to the image it ran before (10.5).
	CodeUnhealthy Code = 11
)

var codeNames = [...]string{"ok", "bad_message", "unwrap_failed", "bad_manifest", "rollback",
	"chunk_corrupt", "image_corrupt", "install_failed", "stale_key", "timeout", "unsupported", "unhealthy"}

// String returns the code's name as PROTOCOL.md spells it.
func (c Code) String() string {
	if int(c) < len(codeNames) {
		return codeNames[c]
	}
	return fmt.Sprintf("code_%d", uint16(c))
}

// Permanent reports whether a failure with code c is final for the key message it
// answers: a device does not retry bad_message, unwrap_failed, bad_manifest, rollback,
// unsupported or unhealthy, while it retries timeout, chunk_corrupt, image_corrupt and install_failed
// (PROTOCOL.md 10.1). A release is completed once every target installed it or failed
// permanently (PROTOCOL.md 12.2).
func (c Code) Permanent() bool {
	switch c {
	case CodeBadMessage, CodeUnwrapFailed, CodeBadManifest, CodeRollback, CodeUnsupported, CodeUnhealthy:
		return true
	}
	return false
}

// Transient reports whether a device tries a key message that failed with code c again
// (PROTOCOL.md 10.1): timeout, chunk_corrupt, image_corrupt and install_failed. ok and
// stale_key are neither transient nor permanent: they are no failure of the download.
func (c Code) Transient() bool {
	switch c {
	case CodeTimeout, CodeChunkCorrupt, CodeImageCorrupt, CodeInstallFailed:
		return true
	}
	return false
}

// MarshalText implements encoding.TextMarshaler.
func (c Code) MarshalText() ([]byte, error) { return []byte(c.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (c *Code) UnmarshalText(b []byte) error {
	for i, n := range codeNames {
		if n == string(b) {
			*c = Code(i)
			return nil
		}
	}
	var v uint16
	if _, err := fmt.Sscanf(string(b), "code_%d", &v); err == nil {
		*c = Code(v)
		return nil
	}
	return fmt.Errorf("protocol: unknown report code %q", b)
}

// ErrorCode is a stable admin error code (PROTOCOL.md 15.2).
type ErrorCode string

// Admin error codes.
const (
	ErrBadRequest      ErrorCode = "bad_request"
	ErrUnknownCommand  ErrorCode = "unknown_command"
	ErrNotFound        ErrorCode = "not_found"
	ErrConflict        ErrorCode = "conflict"
	ErrVersionNotNewer ErrorCode = "version_not_newer"
	ErrTooLarge        ErrorCode = "too_large"
	ErrBadUpload       ErrorCode = "bad_upload"
	ErrUnavailable     ErrorCode = "unavailable"
	ErrInternal        ErrorCode = "internal"
	ErrTimeoutWaiting  ErrorCode = "timeout" // client side: no reply arrived
)

// Error is an admin error: what an error reply carries, and what Go callers receive.
type Error struct {
	Code    ErrorCode `json:"code"`
	Message string    `json:"message"`
}

func (e *Error) Error() string { return string(e.Code) + ": " + e.Message }

// Is makes errors.Is(err, &Error{Code: c}) match any Error with code c.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code && (t.Message == "" || t.Message == e.Message)
}

// Errorf returns an *Error with the given code and a formatted message.
func Errorf(code ErrorCode, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// CodeOf returns the admin code of err: its own if it is (or wraps) an *Error, otherwise
// ErrInternal.
func CodeOf(err error) ErrorCode {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return ErrInternal
}
