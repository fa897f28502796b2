// Command validate checks the output of deploy/kubernetes offline, with the Kubernetes Go types, and writes the
// JSON schemas that kubeconform validates against (no schema download needed). deploy/validate.sh drives it.
//
//	validate schemas DIR                      one JSON schema per built-in kind, named as kubeconform looks
//	                                          them up: DIR/<kind>-<group>-<version>.json (core: <kind>-<version>)
//	validate objects -tag TAG FILE...         strict decoding of every object (unknown or duplicate fields fail)
//	                                          plus the consistency checks of checks.go
//	validate egress FILE...                   EgressSelectorConfiguration files, loaded and validated with
//	                                          k8s.io/apiserver's own code, as kube-apiserver does at start
//	validate flags -server BIN -agent BIN [-expect-refused] FILE...
//	                                          every proxy-server/proxy-agent command line, as the kubelet
//	                                          expands it, parsed by our real binaries (flags.go)
package main

import (
	"flag"
	"fmt"
	"os"
)

func usage() {
	fmt.Fprintln(os.Stderr, "usage: validate schemas DIR | validate objects [-tag TAG] FILE... | validate egress FILE... |\n"+
		"       validate flags -server BIN -agent BIN [-expect-refused] FILE...")
	os.Exit(2)
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "schemas":
		if len(os.Args) != 3 {
			usage()
		}
		var n int
		n, err = writeSchemas(os.Args[2])
		if err == nil {
			fmt.Printf("wrote %d schemas to %s\n", n, os.Args[2])
		}
	case "objects":
		fs := flag.NewFlagSet("objects", flag.ExitOnError)
		tag := fs.String("tag", "", "every ghcr.io/konnectivity-rs image must carry this tag (empty: not checked)")
		_ = fs.Parse(os.Args[2:])
		if fs.NArg() == 0 {
			usage()
		}
		err = checkObjectFiles(fs.Args(), *tag)
	case "flags":
		fs := flag.NewFlagSet("flags", flag.ExitOnError)
		server := fs.String("server", "", "proxy-server binary")
		agent := fs.String("agent", "", "proxy-agent binary")
		expect := fs.Bool("expect-refused", false, "the variant needs a feature not built yet: 'not supported yet' is expected")
		_ = fs.Parse(os.Args[2:])
		if fs.NArg() == 0 || *server == "" || *agent == "" {
			usage()
		}
		err = checkFlagFiles(fs.Args(), *server, *agent, *expect)
	case "egress":
		if len(os.Args) < 3 {
			usage()
		}
		err = checkEgressFiles(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "FAIL:", err)
		os.Exit(1)
	}
}
