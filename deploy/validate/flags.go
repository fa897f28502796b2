package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// Stand-ins for downward-API values; never dialed (the binaries stop at loading their certificates, which do
// not exist here, and run in an empty network namespace when unshare is available).
var fieldValues = map[string]string{
	"status.hostIP": "192.0.2.10", "status.podIP": "192.0.2.20", "metadata.name": "konnectivity-pod-0",
	"spec.nodeName": "node-0",
}

// checkFlagFiles hands the command line of every proxy-server and proxy-agent container (after the kubelet's
// $(VAR) expansion) to our real binaries. They parse and validate all flags before touching a file, and exit
// with status 2 on a flag they refuse, so:
//   - exit 2 because a file named by a flag does not exist on this machine (`--service-account-token-path
//     "/var/run/secrets/tokens/...": no such file`, `checking --kubeconfig "...": no such file`): the flag is
//     accepted, as the missing certificate files are; the command line is run again with an empty stand-in file
//     for that flag, so that the flags checked after it are checked too;
//   - exit 2 otherwise: the manifest has a flag (or value) our binary does not accept: fail, unless
//     expectRefused and the reason is "not supported yet" (a variant written for a feature that has not landed;
//     none today);
//   - any other exit (here: the certificate files are missing) or still running after the timeout: accepted.
func checkFlagFiles(files []string, serverBin, agentBin string, expectRefused bool) error {
	isolate := exec.Command("unshare", "--net", "true").Run() == nil
	failed, refused, accepted := 0, 0, 0
	for _, f := range files {
		objs, err := decodeFile(f)
		if err != nil {
			return err
		}
		c := &checker{objs: objs, externalSecrets: map[string]bool{}}
		for _, pt := range c.podTemplates() {
			for i := range pt.spec.Containers {
				ct := &pt.spec.Containers[i]
				if !strings.HasPrefix(ct.Image, imagePrefix) {
					continue
				}
				bin := serverBin
				if strings.Contains(ct.Image, "/proxy-agent:") {
					bin = agentBin
				}
				args, err := c.expand(pt.owner.meta.GetNamespace(), ct)
				if err != nil {
					fmt.Printf("FAIL %s: %s container %s: %v\n", f, pt.owner.id(), ct.Name, err)
					failed++
					continue
				}
				where := fmt.Sprintf("%s: %s container %s", f, pt.owner.id(), ct.Name)
				code, msg, absent, err := runWithStandIns(bin, args, isolate)
				if err != nil {
					return err
				}
				if len(absent) > 0 {
					msg += "; not on this machine, replaced by empty stand-ins: " + strings.Join(absent, ", ")
				}
				switch {
				case code == 2 && expectRefused && strings.Contains(msg, "not supported yet"):
					fmt.Printf("ok   %s: refused as expected until the feature lands: %s\n", where, msg)
					refused++
				case code == 2:
					fmt.Printf("FAIL %s: %s refuses the command line: %s\n", where, bin, msg)
					failed++
				default:
					fmt.Printf("ok   %s: %d flags accepted (then: %s)\n", where, len(args), msg)
					accepted++
				}
			}
		}
	}
	if expectRefused && accepted > 0 && refused == 0 {
		fmt.Println("NOTE: every command line of this variant is accepted now: the feature it waits for has " +
			"landed; drop its marks in deploy/kubernetes and docs/deployment.md, and its -expect-refused in validate.sh.")
	}
	if failed > 0 {
		return fmt.Errorf("%d container command line(s) refused", failed)
	}
	return nil
}

// expand returns the container's arguments (command after the binary, then args) with $(VAR) replaced as the
// kubelet does for variables defined in the container's env.
func (c *checker) expand(ns string, ct *corev1.Container) ([]string, error) {
	env := map[string]string{}
	for _, e := range ct.Env {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = e.Value
		case e.ValueFrom.ConfigMapKeyRef != nil:
			ref := e.ValueFrom.ConfigMapKeyRef
			found := false
			for _, o := range c.objs {
				if cm, ok := o.obj.(*corev1.ConfigMap); ok && cm.Name == ref.Name && cm.Namespace == ns {
					env[e.Name], found = cm.Data[ref.Key]
				}
			}
			if !found {
				return nil, fmt.Errorf("env %s: ConfigMap %s key %s not in this output", e.Name, ref.Name, ref.Key)
			}
		case e.ValueFrom.FieldRef != nil:
			v, ok := fieldValues[e.ValueFrom.FieldRef.FieldPath]
			if e.ValueFrom.FieldRef.FieldPath == "metadata.namespace" {
				v, ok = ns, true
			}
			if !ok {
				return nil, fmt.Errorf("env %s: no stand-in for fieldRef %s", e.Name, e.ValueFrom.FieldRef.FieldPath)
			}
			env[e.Name] = v
		default:
			env[e.Name] = "x"
		}
	}
	var raw []string
	if len(ct.Command) > 1 {
		raw = append(raw, ct.Command[1:]...)
	}
	raw = append(raw, ct.Args...)
	out := make([]string, 0, len(raw))
	for _, a := range raw {
		out = append(out, envRef.ReplaceAllStringFunc(a, func(m string) string {
			if v, ok := env[m[2:len(m)-1]]; ok {
				return v
			}
			return m
		}))
	}
	return out, nil
}

// missingFile is the refusal of a flag whose file does not exist: `--flag "path": no such file`.
var missingFile = regexp.MustCompile(`--([a-z0-9-]+) "([^"]*)": no such file$`)

// runWithStandIns runs the command line; while the binary refuses it only because a file named by a path flag
// does not exist here, it replaces that flag's value with an empty file and runs it again. Returns the last
// run's exit code and message, and the flags that got a stand-in.
func runWithStandIns(bin string, args []string, isolate bool) (int, string, []string, error) {
	dir, err := os.MkdirTemp("", "konnectivity-standins-")
	if err != nil {
		return 0, "", nil, err
	}
	defer os.RemoveAll(dir)
	args = append([]string{}, args...)
	var absent []string
	for {
		code, msg := runFlags(bin, args, isolate)
		m := missingFile.FindStringSubmatch(msg)
		if code != 2 || m == nil || !pathFlags[m[1]] {
			return code, msg, absent, nil
		}
		i := slices.Index(args, "--"+m[1]+"="+m[2])
		if i < 0 || slices.Contains(absent, "--"+m[1]) {
			return code, msg, absent, nil
		}
		standIn := filepath.Join(dir, m[1])
		if err := os.WriteFile(standIn, nil, 0o644); err != nil {
			return 0, "", nil, err
		}
		args[i] = "--" + m[1] + "=" + standIn
		absent = append(absent, "--"+m[1])
	}
}

func runFlags(bin string, args []string, isolate bool) (int, string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var cmd *exec.Cmd
	if isolate {
		cmd = exec.CommandContext(ctx, "unshare", append([]string{"--net", "--", bin}, args...)...)
	} else {
		cmd = exec.CommandContext(ctx, bin, args...)
	}
	dir, _ := os.MkdirTemp("", "konnectivity-flags-")
	defer os.RemoveAll(dir)
	cmd.Dir = dir
	cmd.Env = []string{"PATH=/usr/bin:/bin", "NO_COLOR=1", "RUST_LOG=off"}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	msg := lastLine(stderr.String())
	if ctx.Err() != nil {
		return -1, "still running after 5s"
	}
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		return exit.ExitCode(), msg
	}
	if err != nil {
		return 1, err.Error()
	}
	return 0, msg
}

// lastLine is the line that says why the binary stopped: clap's "error: ..." line, else the last line.
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for _, l := range lines {
		if strings.HasPrefix(l, "error:") {
			return strings.TrimSpace(l)
		}
	}
	return strings.TrimSpace(lines[len(lines)-1])
}
