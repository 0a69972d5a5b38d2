// MinIO-shaped load for bench/kes.py: a KES client built the way kms-go v0.3.1 builds its
// http.Transport (ForceAttemptHTTP2, TLS >= 1.2, the client certificate from
// GetClientCertificate, Go's default of 2 idle connections per host, idle timeout 90 s),
// with C goroutines each making calls back to back, like MinIO's request handlers.
// Standard library only.
//
//	kesload -url URL -ca CA_PEM -cert CERT_PEM -key KEY_PEM -body FILE -c C -warmup S -seconds S
//
// After the warm-up it prints "measuring" and, when the measured interval ends, "done";
// then one JSON line: calls, seconds, req/s, p50/p99 in ms, TLS handshakes and TCP dials
// during the measured interval, errors, and the protocol the last call used.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// bodyReader hides the length of its bytes from net/http, as kms-go's body wrapper does.
type bodyReader struct{ r io.Reader }

func (b *bodyReader) Read(p []byte) (int, error) { return b.r.Read(p) }

type result struct {
	Calls      int     `json:"calls"`
	Seconds    float64 `json:"seconds"`
	RPS        float64 `json:"rps"`
	P50        float64 `json:"p50_ms"`
	P99        float64 `json:"p99_ms"`
	Handshakes int64   `json:"handshakes"`
	Dials      int64   `json:"dials"`
	Errors     int64   `json:"errors"`
	Proto      string  `json:"proto"`
}

func main() {
	url := flag.String("url", "", "endpoint URL")
	caFile := flag.String("ca", "", "CA PEM")
	certFile := flag.String("cert", "", "client certificate PEM")
	keyFile := flag.String("key", "", "client key PEM")
	bodyFile := flag.String("body", "", "request body")
	callers := flag.Int("c", 1, "concurrent callers")
	warmup := flag.Float64("warmup", 1, "warm-up seconds")
	seconds := flag.Float64("seconds", 5, "measured seconds")
	flag.Parse()

	caPEM, err := os.ReadFile(*caFile)
	check(err)
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		check(fmt.Errorf("no CA certificate in %s", *caFile))
	}
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	check(err)
	body, err := os.ReadFile(*bodyFile)
	check(err)

	var handshakes, dials, errors int64
	var counting atomic.Bool
	dialer := &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}
	transport := &http.Transport{
		Proxy: http.ProxyFromEnvironment,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if counting.Load() {
				atomic.AddInt64(&dials, 1)
			}
			return dialer.DialContext(ctx, network, addr)
		},
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          100,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: 1 * time.Second,
		TLSClientConfig: &tls.Config{
			MinVersion: tls.VersionTLS12,
			RootCAs:    roots,
			GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
				return &cert, nil
			},
			VerifyConnection: func(tls.ConnectionState) error {
				if counting.Load() {
					atomic.AddInt64(&handshakes, 1)
				}
				return nil
			},
		},
	}
	client := &http.Client{Transport: transport}
	var proto atomic.Value
	proto.Store("")
	call := func() bool {
		req, err := http.NewRequest(http.MethodPost, *url, &bodyReader{bytes.NewReader(body)})
		check(err)
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			atomic.AddInt64(&errors, 1)
			return false
		}
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			atomic.AddInt64(&errors, 1)
			return false
		}
		proto.Store(resp.Proto)
		return true
	}

	var stop atomic.Bool
	var measuring atomic.Bool
	latencies := make([][]time.Duration, *callers)
	var wg sync.WaitGroup
	for i := 0; i < *callers; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			mine := make([]time.Duration, 0, 100000)
			for !stop.Load() {
				t0 := time.Now()
				ok := call()
				if ok && measuring.Load() {
					mine = append(mine, time.Since(t0))
				}
			}
			latencies[i] = mine
		}(i)
	}
	out := bufio.NewWriter(os.Stdout)
	time.Sleep(time.Duration(*warmup * float64(time.Second)))
	counting.Store(true)
	measuring.Store(true)
	fmt.Fprintln(out, "measuring")
	out.Flush()
	start := time.Now()
	time.Sleep(time.Duration(*seconds * float64(time.Second)))
	measuring.Store(false)
	counting.Store(false)
	elapsed := time.Since(start).Seconds()
	fmt.Fprintln(out, "done")
	out.Flush()
	stop.Store(true)
	wg.Wait()

	var all []time.Duration
	for _, l := range latencies {
		all = append(all, l...)
	}
	sort.Slice(all, func(a, b int) bool { return all[a] < all[b] })
	pct := func(p float64) float64 {
		if len(all) == 0 {
			return 0
		}
		return float64(all[int(p*float64(len(all)-1))]) / 1e6
	}
	r := result{Calls: len(all), Seconds: elapsed, RPS: float64(len(all)) / elapsed,
		P50: pct(0.50), P99: pct(0.99), Handshakes: atomic.LoadInt64(&handshakes),
		Dials: atomic.LoadInt64(&dials), Errors: atomic.LoadInt64(&errors),
		Proto: proto.Load().(string)}
	check(json.NewEncoder(out).Encode(r))
	check(out.Flush())
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "kesload:", err)
		os.Exit(1)
	}
}
