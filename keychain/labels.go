package keychain

// Derivation labels, spelled exactly as in docs/PROTOCOL.md section 2.1. Each derivation has
// its own label so that no two ever share an input.
const (
	LabelUnitData     = "sealcast/v1 unit-data"
	LabelChainStep    = "sealcast/v1 chain-step"
	LabelWrap         = "sealcast/v1 wrap"
	LabelAck          = "sealcast/v1 ack"
	LabelReceipt      = "sealcast/v1 receipt"
	LabelPayload      = "sealcast/v1 payload"
	LabelManifest     = "sealcast/v1 manifest"
	LabelBrokerAuth   = "sealcast/v1 broker-auth"
	LabelMQTTPassword = "sealcast/v1 mqtt-password"
	LabelStateSeal    = "sealcast/v1 state-seal"
	LabelRekeyID      = "sealcast/v1 rekey-id"      // the key that derives re-key ids (3.6)
	LabelRekey        = "sealcast/v2 rekey"         // the next unit data from the current one and the re-key secret (3.2)
	LabelKeyStatement = "sealcast/v2 key-statement" // signed by the previous release key (5.1)
	LabelPrefetch     = "sealcast/v2 prefetch"      // PK, the key of prefetch notices (6.4)

	// AES-GCM associated data of a release's content key sealed under the state-seal key
	// (server only): this, then the release id in hex. It predates the sealcast/v1 naming
	// and keeps its bytes, since stores hold what it sealed.
	LabelSealedRelease = "release "
)

// ProtocolVersion is the major version of the wire (PROTOCOL.md 1): the fourth byte of
// every magic is its ASCII digit.
const ProtocolVersion = 2

// Message magics (PROTOCOL.md sections 5-8).
const (
	MagicManifest = "SCM2"
	MagicKey      = "SCK2"
	MagicAck      = "SCA2"
	MagicReceipt  = "SCR2"
	// MagicKeyStatement begins a key statement (5.1).
	MagicKeyStatement = "SCS2"
	// MagicPrefetch begins a prefetch notice (6.4).
	MagicPrefetch = "SCP2"
)
