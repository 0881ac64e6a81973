package mqttbus_test

import (
	"testing"

	"github.com/sealcast/sealcast/internal/testkit/brokertest"
	"github.com/sealcast/sealcast/internal/testkit/bustest"
)

// TestContract: mqttbus passes the contract suite that the embedded broker's in-process
// client passes too (broker's TestInlineContract).
func TestContract(t *testing.T) {
	bustest.Run(t, func(t *testing.T, env *brokertest.Env) bustest.Bus {
		return dial(t, env, "updater-"+t.Name())
	})
}
