//go:build tools

// Package tools pins the reference ANP (apiserver-network-proxy) binaries in
// go.mod/go.sum. The reference commands (cmd/server, cmd/agent,
// cmd/test-client) are `main` packages and cannot be imported, so we import
// the non-main packages they are built from; this keeps `go mod tidy` from
// dropping the module and the checksums that build.sh needs for
// `go build sigs.k8s.io/apiserver-network-proxy/cmd/...`.
package tools

import (
	_ "sigs.k8s.io/apiserver-network-proxy/cmd/agent/app"
	_ "sigs.k8s.io/apiserver-network-proxy/cmd/server/app"
	// cmd/test-client imports these besides what the apps import.
	_ "sigs.k8s.io/apiserver-network-proxy/pkg/util"
)
