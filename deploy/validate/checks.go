package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"regexp"
	"sort"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"
)

const imagePrefix = "ghcr.io/konnectivity-rs/"

// Cluster roles that Kubernetes creates itself, which bindings may refer to.
var builtinClusterRoles = map[string]bool{"system:auth-delegator": true}

type object struct {
	file string
	obj  runtime.Object
	meta metav1.Object
	kind string
}

func (o object) id() string {
	if ns := o.meta.GetNamespace(); ns != "" {
		return fmt.Sprintf("%s %s/%s", o.kind, ns, o.meta.GetName())
	}
	return fmt.Sprintf("%s %s", o.kind, o.meta.GetName())
}

// decodeFile splits a multi-document YAML file and decodes every document strictly: an unknown field, a
// duplicate field or a value of the wrong type is an error, as with `kubectl apply --validate=strict`.
func decodeFile(file string) ([]object, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	decoder := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()
	reader := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var out []object
	for i := 1; ; i++ {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", file, i, err)
		}
		if len(bytes.TrimSpace(doc)) == 0 || string(bytes.TrimSpace(doc)) == "---" {
			continue
		}
		obj, gvk, err := decoder.Decode(doc, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", file, i, err)
		}
		meta, ok := obj.(metav1.Object)
		if !ok {
			return nil, fmt.Errorf("%s: document %d: %s has no object metadata", file, i, gvk)
		}
		out = append(out, object{file: file, obj: obj, meta: meta, kind: gvk.Kind})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no objects", file)
	}
	return out, nil
}

func checkObjectFiles(files []string, tag string) error {
	failed := 0
	for _, f := range files {
		objs, err := decodeFile(f)
		if err != nil {
			fmt.Printf("FAIL %v\n", err)
			failed++
			continue
		}
		c := &checker{objs: objs, tag: tag, externalSecrets: map[string]bool{}}
		c.run()
		kinds := map[string]int{}
		for _, o := range objs {
			kinds[o.kind]++
		}
		var summary []string
		for k, n := range kinds {
			summary = append(summary, fmt.Sprintf("%d %s", n, k))
		}
		sort.Strings(summary)
		if len(c.problems) > 0 {
			fmt.Printf("FAIL %s:\n  %s\n", f, strings.Join(c.problems, "\n  "))
			failed++
			continue
		}
		fmt.Printf("ok   %s: %s\n", f, strings.Join(summary, ", "))
		if len(c.externalSecrets) > 0 {
			var s []string
			for name := range c.externalSecrets {
				s = append(s, name)
			}
			sort.Strings(s)
			fmt.Printf("     needs Secret(s) created beforehand: %s\n", strings.Join(s, ", "))
		}
		for _, n := range c.notes {
			fmt.Printf("     kube-apiserver access: %s\n", n)
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d rendered file(s) failed", failed)
	}
	return nil
}

type checker struct {
	objs            []object
	tag             string
	problems        []string
	notes           []string
	externalSecrets map[string]bool
}

func (c *checker) fail(o object, format string, args ...any) {
	c.problems = append(c.problems, o.id()+": "+fmt.Sprintf(format, args...))
}

func (c *checker) has(kind, namespace, name string) bool {
	for _, o := range c.objs {
		if o.kind == kind && o.meta.GetName() == name && o.meta.GetNamespace() == namespace {
			return true
		}
	}
	return false
}

type podTemplate struct {
	owner  object
	labels map[string]string
	spec   *corev1.PodSpec
}

func (c *checker) podTemplates() []podTemplate {
	var out []podTemplate
	for _, o := range c.objs {
		switch x := o.obj.(type) {
		case *corev1.Pod:
			out = append(out, podTemplate{o, x.Labels, &x.Spec})
		case *appsv1.Deployment:
			out = append(out, podTemplate{o, x.Spec.Template.Labels, &x.Spec.Template.Spec})
		case *appsv1.DaemonSet:
			out = append(out, podTemplate{o, x.Spec.Template.Labels, &x.Spec.Template.Spec})
		case *appsv1.StatefulSet:
			out = append(out, podTemplate{o, x.Spec.Template.Labels, &x.Spec.Template.Spec})
		}
	}
	return out
}

var clusterScoped = map[string]bool{"ClusterRole": true, "ClusterRoleBinding": true, "Namespace": true,
	"PriorityClass": true, "StorageClass": true}

func (c *checker) run() {
	for _, o := range c.objs {
		if !clusterScoped[o.kind] && o.meta.GetNamespace() == "" {
			c.fail(o, "namespaced object without a namespace (kubectl would put it wherever the context points)")
		}
		switch x := o.obj.(type) {
		case *appsv1.Deployment:
			c.checkSelector(o, x.Spec.Selector, x.Spec.Template.Labels)
		case *appsv1.DaemonSet:
			c.checkSelector(o, x.Spec.Selector, x.Spec.Template.Labels)
		case *policyv1.PodDisruptionBudget:
			c.checkSelectsSomething(o, x.Spec.Selector)
		case *corev1.Service:
			c.checkService(o, x)
		case *rbacv1.RoleBinding:
			if x.RoleRef.Kind == "Role" && !c.has("Role", o.meta.GetNamespace(), x.RoleRef.Name) {
				c.fail(o, "roleRef Role %q is not in this output", x.RoleRef.Name)
			}
			if x.RoleRef.Kind == "ClusterRole" && !builtinClusterRoles[x.RoleRef.Name] && !c.has("ClusterRole", "", x.RoleRef.Name) {
				c.fail(o, "roleRef ClusterRole %q is neither built in nor in this output", x.RoleRef.Name)
			}
			c.checkSubjects(o, x.Subjects)
		case *rbacv1.ClusterRoleBinding:
			if !builtinClusterRoles[x.RoleRef.Name] && !c.has("ClusterRole", "", x.RoleRef.Name) {
				c.fail(o, "roleRef ClusterRole %q is neither built in nor in this output", x.RoleRef.Name)
			}
			c.checkSubjects(o, x.Subjects)
		}
	}
	for _, pt := range c.podTemplates() {
		c.checkPodSpec(pt)
	}
	c.checkAPIAccess()
}

func (c *checker) checkSelector(o object, sel *metav1.LabelSelector, tmpl map[string]string) {
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil || s.Empty() {
		c.fail(o, "invalid or empty selector: %v", err)
		return
	}
	if !s.Matches(labels.Set(tmpl)) {
		c.fail(o, "selector %s does not match the pod template labels %v", s, tmpl)
	}
}

func (c *checker) checkSelectsSomething(o object, sel *metav1.LabelSelector) {
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil || s.Empty() {
		c.fail(o, "invalid or empty selector: %v", err)
		return
	}
	for _, pt := range c.podTemplates() {
		if pt.owner.meta.GetNamespace() == o.meta.GetNamespace() && s.Matches(labels.Set(pt.labels)) {
			return
		}
	}
	c.fail(o, "selector %s matches no pod template in this output", s)
}

func (c *checker) checkService(o object, svc *corev1.Service) {
	if len(svc.Spec.Selector) == 0 {
		return
	}
	sel := labels.SelectorFromSet(svc.Spec.Selector)
	var matched []podTemplate
	for _, pt := range c.podTemplates() {
		if pt.owner.meta.GetNamespace() == o.meta.GetNamespace() && sel.Matches(labels.Set(pt.labels)) {
			matched = append(matched, pt)
		}
	}
	if len(matched) == 0 {
		c.fail(o, "selector %s matches no pod template in this output", sel)
		return
	}
	for _, p := range svc.Spec.Ports {
		target := p.TargetPort
		if target.Type == intstr.Int && target.IntVal == 0 {
			target = intstr.FromInt32(p.Port)
		}
		for _, pt := range matched {
			if !podHasPort(pt.spec, target) {
				c.fail(o, "port %q: targetPort %s is not a container port of %s", p.Name, target.String(), pt.owner.id())
			}
		}
	}
}

func podHasPort(spec *corev1.PodSpec, port intstr.IntOrString) bool {
	for _, ct := range spec.Containers {
		if containerPort(&ct, port) != 0 {
			return true
		}
	}
	return false
}

// containerPort resolves a port name or number against a container's declared ports (0: not declared).
func containerPort(ct *corev1.Container, port intstr.IntOrString) int32 {
	for _, p := range ct.Ports {
		if (port.Type == intstr.String && p.Name == port.StrVal) || (port.Type == intstr.Int && p.ContainerPort == port.IntVal) {
			return p.ContainerPort
		}
	}
	return 0
}

func (c *checker) checkSubjects(o object, subjects []rbacv1.Subject) {
	for _, s := range subjects {
		if s.Kind == "ServiceAccount" && !c.has("ServiceAccount", s.Namespace, s.Name) {
			c.fail(o, "subject ServiceAccount %s/%s is not in this output", s.Namespace, s.Name)
		}
	}
}

var envRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// Flags whose value is a file (or, for uds-name, a socket whose directory) the container must have mounted.
var pathFlags = map[string]bool{
	"cluster-cert": true, "cluster-key": true, "cluster-ca-cert": true, "server-cert": true, "server-key": true,
	"server-ca-cert": true, "uds-name": true, "kubeconfig": true, "ca-cert": true, "agent-cert": true,
	"agent-key": true, "service-account-token-path": true,
}

func flagValues(args []string) map[string]string {
	out := map[string]string{}
	for _, a := range args {
		if !strings.HasPrefix(a, "--") {
			continue
		}
		name, value, ok := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if !ok {
			value = "true"
		}
		out[name] = value
	}
	return out
}

func (c *checker) checkPodSpec(pt podTemplate) {
	o, spec := pt.owner, pt.spec
	ns := o.meta.GetNamespace()
	if sa := spec.ServiceAccountName; sa != "" && sa != "default" && o.kind != "Pod" && !c.has("ServiceAccount", ns, sa) {
		c.fail(o, "serviceAccountName %q is not in this output", sa)
	}
	volumes := map[string]*corev1.Volume{}
	for i := range spec.Volumes {
		v := &spec.Volumes[i]
		if volumes[v.Name] != nil {
			c.fail(o, "volume %q declared twice", v.Name)
		}
		volumes[v.Name] = v
		c.checkVolumeRefs(o, v)
	}
	used := map[string]bool{}
	all := append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...)
	for i := range all {
		ct := &all[i]
		if errs := validation.IsDNS1123Label(ct.Name); len(errs) > 0 {
			c.fail(o, "container name %q: %s", ct.Name, strings.Join(errs, "; "))
		}
		portNames := map[string]bool{}
		for _, p := range ct.Ports {
			if p.Name == "" {
				continue
			}
			if errs := validation.IsValidPortName(p.Name); len(errs) > 0 {
				c.fail(o, "container %s: port name %q: %s", ct.Name, p.Name, strings.Join(errs, "; "))
			}
			if portNames[p.Name] {
				c.fail(o, "container %s: port name %q used twice", ct.Name, p.Name)
			}
			portNames[p.Name] = true
		}
		mounts := map[string]string{}
		for _, m := range ct.VolumeMounts {
			if volumes[m.Name] == nil {
				c.fail(o, "container %s mounts undeclared volume %q", ct.Name, m.Name)
			}
			used[m.Name] = true
			mounts[m.MountPath] = m.Name
		}
		env := map[string]bool{}
		for _, e := range ct.Env {
			env[e.Name] = true
			if e.ValueFrom != nil && e.ValueFrom.ConfigMapKeyRef != nil {
				ref := e.ValueFrom.ConfigMapKeyRef
				if !(ref.Optional != nil && *ref.Optional) && !c.configMapHasKey(ns, ref.Name, ref.Key) {
					c.fail(o, "container %s: env %s refers to ConfigMap %s key %s, not in this output", ct.Name, e.Name, ref.Name, ref.Key)
				}
			}
			if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
				c.externalSecrets[e.ValueFrom.SecretKeyRef.Name] = true
			}
		}
		for _, a := range append(append([]string{}, ct.Command...), ct.Args...) {
			for _, m := range envRef.FindAllStringSubmatch(a, -1) {
				if !env[m[1]] {
					c.fail(o, "container %s: argument %q uses $(%s), which is not in its env", ct.Name, a, m[1])
				}
			}
		}
		for _, probe := range []*corev1.Probe{ct.LivenessProbe, ct.ReadinessProbe, ct.StartupProbe} {
			if probe != nil && probe.HTTPGet != nil && containerPort(ct, probe.HTTPGet.Port) == 0 {
				c.fail(o, "container %s: probe port %s is not one of its ports", ct.Name, probe.HTTPGet.Port.String())
			}
		}
		if strings.HasPrefix(ct.Image, imagePrefix) {
			c.checkOurContainer(o, spec, ct, mounts)
		}
	}
	for name := range volumes {
		if !used[name] {
			c.fail(o, "volume %q is mounted by no container", name)
		}
	}
}

func (c *checker) configMapHasKey(ns, name, key string) bool {
	for _, o := range c.objs {
		if cm, ok := o.obj.(*corev1.ConfigMap); ok && cm.Name == name && cm.Namespace == ns {
			_, ok := cm.Data[key]
			return ok
		}
	}
	return false
}

func (c *checker) checkVolumeRefs(o object, v *corev1.Volume) {
	ns := o.meta.GetNamespace()
	if v.ConfigMap != nil && !(v.ConfigMap.Optional != nil && *v.ConfigMap.Optional) && !c.has("ConfigMap", ns, v.ConfigMap.Name) {
		c.fail(o, "volume %q: ConfigMap %q is not in this output", v.Name, v.ConfigMap.Name)
	}
	if v.Secret != nil {
		c.externalSecrets[v.Secret.SecretName] = true
	}
	if v.Projected != nil {
		for _, s := range v.Projected.Sources {
			if s.Secret != nil {
				c.externalSecrets[s.Secret.Name] = true
			}
			if s.ConfigMap != nil && !c.has("ConfigMap", ns, s.ConfigMap.Name) {
				c.fail(o, "volume %q: ConfigMap %q is not in this output", v.Name, s.ConfigMap.Name)
			}
		}
	}
}

// checkOurContainer holds our own rules for a proxy-server or proxy-agent container: the image, the hardening
// every variant keeps, probes on the port the flags give, and every file flag pointing into a mounted volume.
func (c *checker) checkOurContainer(o object, spec *corev1.PodSpec, ct *corev1.Container, mounts map[string]string) {
	name := strings.TrimPrefix(ct.Image, imagePrefix)
	binary, tag, _ := strings.Cut(name, ":")
	if binary != "proxy-server" && binary != "proxy-agent" {
		c.fail(o, "container %s: unknown image %s", ct.Name, ct.Image)
		return
	}
	if c.tag != "" && tag != c.tag {
		c.fail(o, "container %s: image tag %q, expected %q", ct.Name, tag, c.tag)
	}
	if len(ct.Command) > 0 && ct.Command[0] != "/"+binary {
		c.fail(o, "container %s: command %v does not run the image's /%s", ct.Name, ct.Command, binary)
	}
	sc := ct.SecurityContext
	if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		c.fail(o, "container %s: securityContext.allowPrivilegeEscalation must be false", ct.Name)
	}
	if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		c.fail(o, "container %s: securityContext.readOnlyRootFilesystem must be true", ct.Name)
	}
	if sc == nil || sc.Capabilities == nil || len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" {
		c.fail(o, "container %s: securityContext.capabilities must drop ALL", ct.Name)
	}
	if (sc == nil || sc.SeccompProfile == nil) && (spec.SecurityContext == nil || spec.SecurityContext.SeccompProfile == nil) {
		c.fail(o, "container %s: no seccompProfile", ct.Name)
	}
	if ct.Resources.Requests.Cpu().IsZero() || ct.Resources.Requests.Memory().IsZero() || ct.Resources.Limits.Memory().IsZero() {
		c.fail(o, "container %s: needs cpu and memory requests and a memory limit", ct.Name)
	}

	flags := flagValues(ct.Args)
	healthFlag, healthDefault := "health-port", "8092"
	if binary == "proxy-agent" {
		healthFlag, healthDefault = "health-server-port", "8093"
	}
	health := flags[healthFlag]
	if health == "" {
		health = healthDefault
	}
	if ct.LivenessProbe == nil || ct.LivenessProbe.HTTPGet == nil || ct.LivenessProbe.HTTPGet.Path != "/healthz" {
		c.fail(o, "container %s: needs an HTTP liveness probe on /healthz", ct.Name)
	} else if p := containerPort(ct, ct.LivenessProbe.HTTPGet.Port); fmt.Sprint(p) != health {
		c.fail(o, "container %s: liveness probe on port %d, but --%s is %s", ct.Name, p, healthFlag, health)
	}
	if rp := ct.ReadinessProbe; rp == nil || rp.HTTPGet == nil || (rp.HTTPGet.Path != "/healthz" && rp.HTTPGet.Path != "/readyz") {
		c.fail(o, "container %s: needs an HTTP readiness probe on /readyz or /healthz", ct.Name)
	} else if p := containerPort(ct, rp.HTTPGet.Port); fmt.Sprint(p) != health {
		c.fail(o, "container %s: readiness probe on port %d, but --%s is %s", ct.Name, p, healthFlag, health)
	}
	if binary == "proxy-server" {
		agentPort := flags["agent-port"]
		if agentPort == "" {
			agentPort = "8091"
		}
		found := false
		for _, p := range ct.Ports {
			if fmt.Sprint(p.ContainerPort) == agentPort {
				found = true
			}
		}
		if !found {
			c.fail(o, "container %s: --agent-port=%s is not among its ports", ct.Name, agentPort)
		}
	}
	for flag, value := range flags {
		if !pathFlags[flag] || value == "" {
			continue
		}
		file := value
		if flag == "uds-name" {
			file = path.Dir(value) + "/"
		}
		mounted := false
		for mp := range mounts {
			if file == mp || strings.HasPrefix(file, strings.TrimSuffix(mp, "/")+"/") {
				mounted = true
			}
		}
		if !mounted {
			c.fail(o, "container %s: --%s=%s is not inside any of its volume mounts", ct.Name, flag, value)
		}
	}
}
