package broker

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/sealcast/sealcast/keychain"
)

// identity is who an authenticated client is.
type identity struct {
	role   Role
	serial string // RoleDevice only
	name   string // account username, or the serial
	cert   bool   // authenticated by a client certificate
}

// hook is the mochi hook for authentication [SC-3.5] [SC-9.3], access rules [SC-9.2],
// connection logging and drop counting.
type hook struct {
	mqtt.HookBase
	b *Broker
}

func (h *hook) ID() string { return "sealcast-auth" }

func (h *hook) Provides(e byte) bool {
	switch e {
	case mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnACLCheck,
		mqtt.OnSessionEstablish, mqtt.OnSessionEstablished, mqtt.OnWill, mqtt.OnWillSent,
		mqtt.OnDisconnect, mqtt.OnPublishDropped, mqtt.OnPublish, mqtt.OnSelectSubscribers,
		mqtt.OnPacketRead, mqtt.OnPacketProcessed:
		return true
	}
	return false
}

// errRefused is what OnConnect returns after it has sent its own CONNACK.
var errRefused = errors.New("broker: connection refused")

// OnConnect authenticates the client. mochi calls it after parsing CONNECT and before
// OnConnectAuthenticate; doing the work here lets the broker answer "not authorized"
// (0x05) where that is the truth, since OnConnectAuthenticate can only answer "bad
// username or password" (0x04).
func (h *hook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	var (
		id     identity
		code   packets.Code
		reason string
	)
	if h.b.logins.blocked(cl.Net.Remote) {
		code, reason = packets.ErrNotAuthorized, "too many failed logins from this address; refused for a minute"
	} else if id, code, reason = h.b.authenticate(cl, pk); code != packets.CodeSuccess && h.b.logins.failed(cl.Net.Remote) {
		reason += fmt.Sprintf("; more than %d failed logins from this address within %v: refused for %v", loginFailures, loginWindow, loginBlock)
	}
	ev := h.b.log.With().Str("client", cl.ID).Str("remote", cl.Net.Remote).
		Str("listener", cl.Net.Listener).Logger()
	if code != packets.CodeSuccess {
		h.b.authFailures.Add(1)
		// The username is what the client sent; the password is never logged.
		ev.Warn().Str("username", string(pk.Connect.Username)).Str("reason", reason).
			Uint8("code", code.Code).Msg("connection refused")
		_ = h.b.srv.SendConnack(cl, connackCode(cl, code), false, nil)
		return errRefused
	}
	h.b.idents.Store(cl, id)
	if c, ok := cl.Net.Conn.(*clientConn); ok {
		c.setClient(cl.ID)
	}
	return nil
}

// connackCode returns the CONNACK code for a refusal. mochi maps v5 codes to MQTT 3.1.1
// ones itself, but maps "bad username or password" to 3.1.1's "not authorized" and leaves
// "not authorized" as 0x87, which 3.1.1 does not define; codes below 0x80 pass unmapped.
func connackCode(cl *mqtt.Client, code packets.Code) packets.Code {
	if cl.Properties.ProtocolVersion >= 5 {
		return code
	}
	if code == packets.ErrBadUsernameOrPassword {
		return packets.ErrMalformedUsernameOrPassword // 0x04, "bad user name or password"
	}
	return packets.Err3NotAuthorized // 0x05
}

// OnConnectAuthenticate admits exactly the clients OnConnect authenticated.
func (h *hook) OnConnectAuthenticate(cl *mqtt.Client, _ packets.Packet) bool {
	_, ok := h.b.idents.Load(cl)
	return ok
}

func (h *hook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	id := h.b.identityOf(cl)
	if id.role == roleHealth {
		return // Check's probe, every few seconds: not worth a log line
	}
	h.b.log.Info().Str("client", cl.ID).Str("role", string(id.role)).Str("user", id.name).
		Bool("cert", id.cert).Str("remote", cl.Net.Remote).Str("listener", cl.Net.Listener).
		Bool("clean", cl.Properties.Clean).Msg("client connected")
}

func (h *hook) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	h.b.guard.forget(cl)
	h.b.superseded.CompareAndDelete(cl.ID, cl)
	v, ok := h.b.idents.LoadAndDelete(cl)
	if !ok || v.(identity).role == roleHealth {
		return // a session restored from the store, a refused client, or Check's probe
	}
	ev := h.b.log.Info()
	if err != nil && !errors.Is(err, packets.CodeDisconnect) {
		ev = ev.Err(err)
	}
	ev.Str("client", cl.ID).Str("remote", cl.Net.Remote).Bool("session_kept", !expire).
		Msg("client disconnected")
}

func (h *hook) OnPublishDropped(cl *mqtt.Client, pk packets.Packet) {
	h.b.queueDrops.Add(1)
	h.b.log.Warn().Str("client", cl.ID).Str("topic", pk.TopicName).
		Msg("delivery dropped: client's outbound queue is full")
}

// OnSelectSubscribers lets the in-process client take its turn in shared subscriptions.
func (h *hook) OnSelectSubscribers(subs *mqtt.Subscribers, _ packets.Packet) *mqtt.Subscribers {
	h.b.inline.selectShared(subs)
	return subs
}

// OnPublish refuses a retained PUBLISH where the protocol retains nothing (RetainAllowed),
// the way a PUBLISH the access rules deny is refused: dropped at QoS 0; at QoS 1 and 2 an
// MQTT 5 client gets "not authorized" in its PUBACK, and an MQTT 3.1.1 client, which has
// no negative PUBACK, is disconnected. [SC-9.2]
func (h *hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if !pk.FixedHeader.Retain || cl.Net.Inline || RetainAllowed(pk.TopicName) {
		return pk, nil
	}
	h.b.aclDenials.Add(1)
	h.b.log.Warn().Str("client", cl.ID).Str("topic", pk.TopicName).
		Msg("retained publish refused: the protocol retains nothing on this topic")
	switch {
	case pk.FixedHeader.Qos == 0:
		return pk, packets.ErrRejectPacket
	case cl.Properties.ProtocolVersion == 5:
		return pk, packets.ErrNotAuthorized
	default:
		_ = h.b.srv.DisconnectClient(cl, packets.ErrNotAuthorized)
		return pk, packets.ErrRejectPacket
	}
}

// OnACLCheck applies [SC-9.2]. mochi calls it with write=true for each PUBLISH a client
// sends, and with write=false both for each filter of a SUBSCRIBE (wildcards and
// $share/ included) and for each delivery to a subscriber (a topic name): Allowed
// handles both since a topic name is a filter without wildcards.
func (h *hook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	id := h.b.identityOf(cl)
	if !Allowed(id.role, id.serial, topic, write) {
		h.b.aclDenials.Add(1)
		return false
	}
	if !write && id.role == RoleDevice && cl.State.Inflight.Len() >= h.b.limits.DeviceMaxInflight {
		// A device that stays offline with a wide subscription (sealcast/releases/#)
		// must not queue every chunk of every release in memory.
		h.b.deviceDrops.Add(1)
		return false
	}
	return true
}

// identityOf returns a client's identity: the one OnConnect recorded, or, for a session
// restored from the store and not yet reconnected, one derived from its stored username
// and client id the same way authenticate would.
func (b *Broker) identityOf(cl *mqtt.Client) identity {
	if v, ok := b.idents.Load(cl); ok {
		return v.(identity)
	}
	if a, ok := b.account(cl.Properties.Username); ok {
		return identity{role: a.Role, name: a.Username}
	}
	u := cl.Properties.Username
	if (len(u) == 0 || string(u) == cl.ID) && keychain.ValidSerial(cl.ID) {
		return identity{role: RoleDevice, serial: cl.ID, name: cl.ID}
	}
	return identity{} // no role: nothing is allowed
}

// authenticate decides whether a CONNECT is admitted. [SC-3.5] [SC-9.3]
func (b *Broker) authenticate(cl *mqtt.Client, pk packets.Packet) (identity, packets.Code, string) {
	username := pk.Connect.Username
	var id identity
	if b.isHealthProbe(username, pk.Connect.Password) {
		return identity{role: roleHealth, name: healthUser}, packets.CodeSuccess, "" // may do nothing
	}
	if a, ok := b.account(username); ok && pk.Connect.UsernameFlag {
		// Account names take precedence over serials.
		if !a.checkPassword(pk.Connect.Password) {
			return id, packets.ErrBadUsernameOrPassword, "wrong account password"
		}
		id = identity{role: a.Role, name: a.Username}
	} else {
		serial, cert := verifiedCertCN(cl)
		switch {
		case cert:
			if !keychain.ValidSerial(serial) {
				return id, packets.ErrNotAuthorized, "client certificate CN is not a valid serial"
			}
			if len(username) > 0 && !bytes.Equal(username, []byte(serial)) {
				return id, packets.ErrNotAuthorized, "username differs from certificate CN"
			}
		default:
			serial = string(username)
			if !keychain.ValidSerial(serial) {
				spendLikeAccount(pk.Connect.Password)
				return id, packets.ErrBadUsernameOrPassword, "unknown user"
			}
			if !b.authKey.CheckDevicePassword(serial, pk.Connect.Password) {
				spendLikeAccount(pk.Connect.Password)
				return id, packets.ErrBadUsernameOrPassword, "wrong device password"
			}
		}
		// The client id must be the serial: otherwise a device could take over another
		// device's session by connecting with its client id.
		if cl.ID != serial {
			return id, packets.ErrNotAuthorized, "client id differs from serial"
		}
		if b.isRevoked(serial) {
			return id, packets.ErrNotAuthorized, "device revoked"
		}
		id = identity{role: RoleDevice, serial: serial, name: serial, cert: cert}
	}
	// mochi publishes wills without an ACL check, so the will topic is checked here.
	if pk.Connect.WillFlag && !Allowed(id.role, id.serial, pk.Connect.WillTopic, true) {
		return id, packets.ErrNotAuthorized, "will topic not allowed"
	}
	return id, packets.CodeSuccess, ""
}

// verifiedCertCN returns the subject CN of a client certificate that the TLS listener
// verified against Options.ClientCAPEM.
func verifiedCertCN(cl *mqtt.Client) (string, bool) {
	tc, ok := netConn(cl.Net.Conn).(*tls.Conn)
	if !ok {
		return "", false
	}
	st := tc.ConnectionState()
	if len(st.VerifiedChains) == 0 || len(st.PeerCertificates) == 0 {
		return "", false
	}
	return st.PeerCertificates[0].Subject.CommonName, true
}

// OnPacketRead and OnPacketProcessed bracket the processing of every inbound packet;
// pidGuard uses them to undo mochi's packet-id collision.
func (h *hook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	h.b.guard.before(cl, pk)
	return pk, nil
}

func (h *hook) OnPacketProcessed(cl *mqtt.Client, pk packets.Packet, _ error) {
	h.b.guard.after(cl, pk)
}
