// A KES client configured the way MinIO's (kms-go v0.3.1) is: TLS >= 1.2, HTTP/2 offered
// (ForceAttemptHTTP2), the client certificate handed out by GetClientCertificate, an LRU
// session cache, and request bodies without a length (so HTTP/1.1 sends them chunked).
//
//	goclient URL CA_PEM CERT_PEM KEY_PEM TLS_VERSION(1.2|1.3) REQUESTS BODY [MODE]
//
// MODE "new" (the default): each request uses a new connection, so that session
// resumption is exercised. MODE "shared": one transport for all requests, as kms-go
// keeps it; the first request runs alone, the rest run concurrently (one goroutine
// each), so over HTTP/2 they all share the first connection.
//
// Prints one JSON line per request (status, proto, alpn, version, resumed, reused, body),
// then {"dials": N}: the TCP connections the client opened.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
)

type result struct {
	Status  int    `json:"status"`
	Proto   string `json:"proto"`
	ALPN    string `json:"alpn"`
	Version string `json:"version"`
	Resumed bool   `json:"resumed"`
	Reused  bool   `json:"reused"`
	Body    string `json:"body"`
}

// bodyReader hides the length of its bytes from net/http, as kms-go's body wrapper does.
type bodyReader struct{ r io.Reader }

func (b *bodyReader) Read(p []byte) (int, error) { return b.r.Read(p) }

func main() {
	if len(os.Args) != 8 && len(os.Args) != 9 {
		fmt.Fprintln(os.Stderr, "usage: goclient URL CA CERT KEY VERSION REQUESTS BODY [new|shared]")
		os.Exit(2)
	}
	url, caFile, certFile, keyFile, version, body := os.Args[1], os.Args[2], os.Args[3], os.Args[4], os.Args[5], os.Args[7]
	mode := "new"
	if len(os.Args) == 9 {
		mode = os.Args[8]
	}
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
	var dials int64
	dialer := &net.Dialer{}
	newTransport := func() *http.Transport {
		return &http.Transport{
			TLSClientConfig:   config,
			ForceAttemptHTTP2: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				atomic.AddInt64(&dials, 1)
				return dialer.DialContext(ctx, network, addr)
			},
		}
	}
	shared := newTransport()
	do := func(transport *http.Transport) result {
		var reused bool
		trace := &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) { reused = info.Reused }}
		req, err := http.NewRequest(http.MethodPost, url, &bodyReader{bytes.NewReader([]byte(body))})
		check(err)
		req = req.WithContext(httptrace.WithClientTrace(req.Context(), trace))
		req.Header.Set("Content-Type", "application/json")
		resp, err := (&http.Client{Transport: transport}).Do(req)
		check(err)
		data, err := io.ReadAll(resp.Body)
		check(err)
		resp.Body.Close()
		r := result{Status: resp.StatusCode, Proto: resp.Proto, Reused: reused, Body: string(data)}
		if resp.TLS != nil {
			r.ALPN = resp.TLS.NegotiatedProtocol
			r.Resumed = resp.TLS.DidResume
			r.Version = map[uint16]string{tls.VersionTLS12: "1.2", tls.VersionTLS13: "1.3"}[resp.TLS.Version]
		}
		return r
	}
	results := make([]result, n)
	if mode == "shared" {
		results[0] = do(shared)
		var wg sync.WaitGroup
		for i := 1; i < n; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				results[i] = do(shared)
			}(i)
		}
		wg.Wait()
	} else {
		for i := 0; i < n; i++ {
			transport := newTransport()
			results[i] = do(transport)
			transport.CloseIdleConnections()
		}
	}
	out := json.NewEncoder(os.Stdout)
	for _, r := range results {
		check(out.Encode(r))
	}
	check(out.Encode(map[string]int64{"dials": atomic.LoadInt64(&dials)}))
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "goclient:", err)
		os.Exit(1)
	}
}
