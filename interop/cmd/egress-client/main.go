// Command egress-client fetches one URL through the proxy server exactly the
// way kube-apiserver reaches the cluster network: it loads an
// EgressSelectorConfiguration with k8s.io/apiserver's egressselector package
// (read + validate + NewEgressSelector, as EgressSelectorOptions.ApplyTo
// does), looks up the "cluster" dialer and uses it as the DialContext of a
// plain net/http client. Whatever the config says (gRPC over UDS, HTTP
// CONNECT over UDS or mTLS TCP) is therefore exercised with the real
// kube-apiserver code.
//
// Output (stdout): the response body, or "<body bytes> <sha256 hex>" with
// --sha256. Any failure prints the error verbatim on stderr and exits 1.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"

	utilnet "k8s.io/apimachinery/pkg/util/net"
	"k8s.io/apiserver/pkg/server/egressselector"
)

func main() {
	config := flag.String("config", "", "EgressSelectorConfiguration file (the kube-apiserver --egress-selector-config-file)")
	url := flag.String("url", "", "http://HOST:PORT/path to fetch through the cluster egress")
	sum := flag.Bool("sha256", false, "print '<body byte count> <sha256 hex>' instead of the body")
	count := flag.Int("count", 1, "repeat N times (every request gets its own connection, hence its own tunnel)")
	timeout := flag.Duration("timeout", 30*time.Second, "deadline for one request")
	flag.Parse()
	if *config == "" || *url == "" || *count < 1 {
		fmt.Fprintln(os.Stderr, "egress-client: --config and --url are required")
		flag.Usage()
		os.Exit(2)
	}

	dial, err := clusterDialer(*config)
	if err != nil {
		fail(err)
	}
	// No keep-alive: kube-apiserver's gRPC egress tunnels are single-use, and
	// a fresh connection per request makes every iteration a full DIAL/CLOSE.
	httpClient := &http.Client{Transport: &http.Transport{
		DialContext:       dial,
		Proxy:             nil, // never honour $HTTP_PROXY here
		DisableKeepAlives: true,
	}}
	for i := 0; i < *count; i++ {
		body, err := fetch(httpClient, *url, *timeout)
		if err != nil {
			fail(err)
		}
		if *sum {
			s := sha256.Sum256(body)
			fmt.Printf("%d %s\n", len(body), hex.EncodeToString(s[:]))
		} else {
			os.Stdout.Write(body)
		}
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "egress-client:", err)
	os.Exit(1)
}

// clusterDialer mirrors k8s.io/apiserver/pkg/server/options
// EgressSelectorOptions.ApplyTo, then asks for the "cluster" egress.
func clusterDialer(path string) (utilnet.DialFunc, error) {
	cfg, err := egressselector.ReadEgressSelectorConfiguration(path)
	if err != nil {
		return nil, fmt.Errorf("failed to read egress selector config: %w", err)
	}
	if errs := egressselector.ValidateEgressSelectorConfiguration(cfg); len(errs) > 0 {
		return nil, fmt.Errorf("failed to validate egress selector configuration: %v", errs.ToAggregate())
	}
	sel, err := egressselector.NewEgressSelector(cfg)
	if err != nil {
		return nil, fmt.Errorf("failed to set up egress selector: %w", err)
	}
	dial, err := sel.Lookup(egressselector.Cluster.AsNetworkContext())
	if err != nil {
		return nil, fmt.Errorf("lookup cluster egress: %w", err)
	}
	if dial == nil {
		return nil, errors.New("the configuration has no usable 'cluster' egress")
	}
	return dial, nil
}

func fetch(c *http.Client, url string, timeout time.Duration) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("read body: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: HTTP status %s", url, resp.Status)
	}
	return body, nil
}
