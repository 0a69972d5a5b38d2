// A KES client configured the way MinIO's (kms-go v0.3.1) is: TLS >= 1.2, HTTP/2 offered
// (ForceAttemptHTTP2), the client certificate handed out by GetClientCertificate, an LRU
// session cache, and request bodies without a length (so HTTP/1.1 sends them chunked).
// Each request uses a new connection, so that session resumption is exercised.
//
//	goclient URL CA_PEM CERT_PEM KEY_PEM TLS_VERSION(1.2|1.3) REQUESTS BODY
//
// Prints one JSON line per request: status, proto, alpn, version, resumed, body.
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
)

type result struct {
	Status  int    `json:"status"`
	Proto   string `json:"proto"`
	ALPN    string `json:"alpn"`
	Version string `json:"version"`
	Resumed bool   `json:"resumed"`
	Body    string `json:"body"`
}

// bodyReader hides the length of its bytes from net/http, as kms-go's body wrapper does.
type bodyReader struct{ r io.Reader }

func (b *bodyReader) Read(p []byte) (int, error) { return b.r.Read(p) }

func main() {
	if len(os.Args) != 8 {
		fmt.Fprintln(os.Stderr, "usage: goclient URL CA CERT KEY VERSION REQUESTS BODY")
		os.Exit(2)
	}
	url, caFile, certFile, keyFile, version, body := os.Args[1], os.Args[2], os.Args[3], os.Args[4], os.Args[5], os.Args[7]
	n, err := strconv.Atoi(os.Args[6])
	check(err)
	caPEM, err := os.ReadFile(caFile)
	check(err)
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		check(fmt.Errorf("no CA certificate in %s", caFile))
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	check(err)
	maxVersion := uint16(tls.VersionTLS13)
	if version == "1.2" {
		maxVersion = tls.VersionTLS12
	}
	config := &tls.Config{
		MinVersion: tls.VersionTLS12,
		MaxVersion: maxVersion,
		RootCAs:    roots,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &cert, nil
		},
		ClientSessionCache: tls.NewLRUClientSessionCache(100),
	}
	out := json.NewEncoder(os.Stdout)
	for i := 0; i < n; i++ {
		transport := &http.Transport{TLSClientConfig: config, ForceAttemptHTTP2: true}
		client := &http.Client{Transport: transport}
		req, err := http.NewRequest(http.MethodPost, url, &bodyReader{bytes.NewReader([]byte(body))})
		check(err)
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		check(err)
		data, err := io.ReadAll(resp.Body)
		check(err)
		resp.Body.Close()
		transport.CloseIdleConnections()
		r := result{Status: resp.StatusCode, Proto: resp.Proto, Body: string(data)}
		if resp.TLS != nil {
			r.ALPN = resp.TLS.NegotiatedProtocol
			r.Resumed = resp.TLS.DidResume
			r.Version = map[uint16]string{tls.VersionTLS12: "1.2", tls.VersionTLS13: "1.3"}[resp.TLS.Version]
		}
		check(out.Encode(r))
	}
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "goclient:", err)
		os.Exit(1)
	}
}
