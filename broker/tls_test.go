package broker_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/internal/testkit/brokertest"
)

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue returns a PEM certificate and key signed by the CA.
func (ca *testCA) issue(t *testing.T, cn string, server bool) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})
}

func TestTLSAndMutualTLS(t *testing.T) {
	serverCA, clientCA := newCA(t, "server CA"), newCA(t, "device CA")
	certPEM, keyPEM := serverCA.issue(t, "broker", true)
	env := brokertest.Start(t, brokertest.WithOptions(func(o *broker.Options) {
		o.TLSAddr = "127.0.0.1:0"
		o.TLSCertPEM, o.TLSKeyPEM, o.ClientCAPEM = certPEM, keyPEM, clientCA.pem
	}))
	addr := env.Broker.Addr(broker.ListenerTLS).String()
	roots := x509.NewCertPool()
	roots.AddCert(serverCA.cert)

	connect := func(clientID string, cr brokertest.Credentials, certs []tls.Certificate) error {
		o := paho.NewClientOptions().AddBroker("ssl://" + addr).SetClientID(clientID).
			SetUsername(cr.Username).SetPassword(cr.Password).SetProtocolVersion(4).
			SetAutoReconnect(false).SetConnectTimeout(5 * time.Second).
			SetTLSConfig(&tls.Config{RootCAs: roots, Certificates: certs})
		c := paho.NewClient(o)
		tok := c.Connect()
		tok.WaitTimeout(10 * time.Second)
		if tok.Error() == nil {
			c.Disconnect(50)
		}
		return tok.Error()
	}
	clientCert := func(cn string, ca *testCA) []tls.Certificate {
		c, k := ca.issue(t, cn, false)
		pair, err := tls.X509KeyPair(c, k)
		if err != nil {
			t.Fatal(err)
		}
		return []tls.Certificate{pair}
	}

	// Password over TLS, no client certificate.
	if err := connect("dev-a", env.Device(t, "dev-a"), nil); err != nil {
		t.Fatalf("device password over TLS: %v", err)
	}
	// Client certificate CN = serial, no password.
	if err := connect("dev-c", brokertest.Credentials{}, clientCert("dev-c", clientCA)); err != nil {
		t.Fatalf("mTLS device: %v", err)
	}
	// The client id must still be the serial in the certificate.
	if err := connect("dev-d", brokertest.Credentials{}, clientCert("dev-c", clientCA)); err == nil {
		t.Fatal("mTLS device connected with a client id other than its CN")
	}
	// A certificate from another CA fails the handshake.
	if err := connect("dev-c", brokertest.Credentials{}, clientCert("dev-c", serverCA)); err == nil {
		t.Fatal("a certificate from an unknown CA was accepted")
	}
	// The certificate identifies the device for the access rules too.
	c, k := clientCA.issue(t, "dev-e", false)
	pair, _ := tls.X509KeyPair(c, k)
	o := paho.NewClientOptions().AddBroker("ssl://" + addr).SetClientID("dev-e").SetProtocolVersion(4).
		SetAutoReconnect(false).SetTLSConfig(&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{pair}})
	dc := paho.NewClient(o)
	if tok := dc.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("mTLS connect: %v", tok.Error())
	}
	defer dc.Disconnect(50)
	if code := subscribe(t, dc, "sealcast/devices/dev-e/key", nil); code != 1 {
		t.Errorf("mTLS device subscribing its own key: %#x", code)
	}
	if code := subscribe(t, dc, "sealcast/devices/dev-a/key", nil); code != 0x80 {
		t.Errorf("mTLS device subscribing another key: %#x", code)
	}
}
