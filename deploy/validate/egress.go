package main

import (
	"fmt"
	"strings"

	"k8s.io/apiserver/pkg/server/egressselector"
)

// checkEgressFiles loads each EgressSelectorConfiguration with kube-apiserver's own loader (strict decoding,
// conversion from apiserver.k8s.io/v1beta1) and runs its validation. Errors that only say a TLS file named in
// the configuration does not exist on this machine are reported as notes: those paths are on the control-plane
// node.
func checkEgressFiles(files []string) error {
	failed := 0
	for _, f := range files {
		cfg, err := egressselector.ReadEgressSelectorConfiguration(f)
		if err != nil {
			fmt.Printf("FAIL %s: %v\n", f, err)
			failed++
			continue
		}
		if cfg == nil || len(cfg.EgressSelections) == 0 {
			fmt.Printf("FAIL %s: no egressSelections\n", f)
			failed++
			continue
		}
		var problems, notes []string
		for _, e := range egressselector.ValidateEgressSelectorConfiguration(cfg) {
			if strings.HasSuffix(e.Detail, "does not exist") {
				notes = append(notes, fmt.Sprintf("%s=%v (must exist on the control-plane node)", e.Field, e.BadValue))
				continue
			}
			problems = append(problems, e.Error())
		}
		cluster := -1
		for i, s := range cfg.EgressSelections {
			if s.Name == "cluster" {
				cluster = i
			}
		}
		if cluster < 0 {
			problems = append(problems, `no "cluster" egress selection: nothing would go through Konnectivity`)
		}
		if len(problems) > 0 {
			fmt.Printf("FAIL %s:\n  %s\n", f, strings.Join(problems, "\n  "))
			failed++
			continue
		}
		c := cfg.EgressSelections[cluster].Connection
		transport := "none"
		if c.Transport != nil {
			switch {
			case c.Transport.UDS != nil:
				transport = "uds " + c.Transport.UDS.UDSName
			case c.Transport.TCP != nil:
				transport = "tcp " + c.Transport.TCP.URL
			}
		}
		fmt.Printf("ok   %s: %s over %s\n", f, c.ProxyProtocol, transport)
		for _, n := range notes {
			fmt.Printf("     note: %s\n", n)
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d egress selector file(s) failed", failed)
	}
	return nil
}
