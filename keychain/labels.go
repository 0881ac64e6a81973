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

	// Labels under the state-seal key (server only; they predate the sealcast/v1 naming
	// and keep their bytes, since stores hold what they sealed).
	LabelSealedRelease = "release " // AES-GCM associated data: this, then the release id in hex
	LabelRekeyID       = "rekey-id" // HMAC label of a re-key message's id (3.6)
)

// Message magics (PROTOCOL.md sections 5-8).
const (
	magicManifest = "SCM1"
	magicKey      = "SCK1"
	magicAck      = "SCA1"
	magicReceipt  = "SCR1"
)
