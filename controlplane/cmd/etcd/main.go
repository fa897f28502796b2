// Command etcd is the upstream etcd server, unchanged: it only calls etcdmain.Main,
// so the fixture gets an etcd built from the Go module proxy like kube-apiserver.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
