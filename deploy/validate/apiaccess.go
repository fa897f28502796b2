package main

import (
	"fmt"
	"path"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
)

// Checks of the variants in which our binaries call kube-apiserver (agent token authentication, Leases): the
// agents' projected token matches what the servers expect, the pods have credentials, and the RBAC in the same
// output lets those credentials do what the binaries do.

type ourContainer struct {
	pt     podTemplate
	ct     *corev1.Container
	binary string
	flags  map[string]string
}

func (o ourContainer) id() string { return o.pt.owner.id() + " container " + o.ct.Name }

func (c *checker) ourContainers() (servers, agents []ourContainer) {
	for _, pt := range c.podTemplates() {
		for i := range pt.spec.Containers {
			ct := &pt.spec.Containers[i]
			if !strings.HasPrefix(ct.Image, imagePrefix) {
				continue
			}
			binary, _, _ := strings.Cut(strings.TrimPrefix(ct.Image, imagePrefix), ":")
			oc := ourContainer{pt: pt, ct: ct, binary: binary, flags: flagValues(append(append([]string{}, ct.Command...), ct.Args...))}
			switch binary {
			case "proxy-server":
				servers = append(servers, oc)
			case "proxy-agent":
				agents = append(agents, oc)
			}
		}
	}
	return servers, agents
}

// The built-in ClusterRoles bindings here refer to, with the rules that matter to us.
var builtinRules = map[string][]rbacv1.PolicyRule{
	"system:auth-delegator": {
		{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}},
		{APIGroups: []string{"authorization.k8s.io"}, Resources: []string{"subjectaccessreviews"}, Verbs: []string{"create"}},
	},
}

// Lease verbs of each side (what konnectivity-kube calls: server get/create/update its own Lease, list/delete
// expired ones; agent list).
var (
	serverLeaseVerbs = []string{"get", "list", "create", "update", "delete"}
	agentLeaseVerbs  = []string{"list"}
)

func (c *checker) checkAPIAccess() {
	servers, agents := c.ourContainers()
	type token struct {
		agent            ourContainer
		ns, sa, audience string
	}
	var tokens []token
	for _, a := range agents {
		p := a.flags["service-account-token-path"]
		if p == "" {
			continue
		}
		aud, err := projectedAudience(a, p)
		if err != nil {
			c.fail(a.pt.owner, "container %s: --service-account-token-path=%s: %v", a.ct.Name, p, err)
			continue
		}
		sa := a.pt.spec.ServiceAccountName
		if sa == "" {
			sa = "default"
		}
		tokens = append(tokens, token{a, a.pt.owner.meta.GetNamespace(), sa, aud})
	}
	for _, s := range servers {
		if aud := s.flags["authentication-audience"]; aud != "" {
			for _, t := range tokens {
				if t.audience != aud || t.ns != s.flags["agent-namespace"] || t.sa != s.flags["agent-service-account"] {
					c.fail(s.pt.owner, "container %s accepts tokens of %s/%s with audience %q, but %s sends one of %s/%s "+
						"with audience %q", s.ct.Name, s.flags["agent-namespace"], s.flags["agent-service-account"], aud,
						t.agent.id(), t.ns, t.sa, t.audience)
				}
			}
			for _, a := range agents {
				if a.flags["service-account-token-path"] == "" {
					c.fail(s.pt.owner, "container %s authenticates agents by token, but %s has no --service-account-token-path",
						s.ct.Name, a.id())
				}
			}
			c.checkAccess(s, "agent token authentication", "", "authentication.k8s.io", "tokenreviews", []string{"create"})
		}
		if s.flags["enable-lease-controller"] == "true" {
			c.checkAccess(s, "--enable-lease-controller", leaseNamespace(s), "coordination.k8s.io", "leases", serverLeaseVerbs)
		}
	}
	for _, a := range agents {
		if a.flags["count-server-leases"] == "true" {
			c.checkAccess(a, "--count-server-leases", leaseNamespace(a), "coordination.k8s.io", "leases", agentLeaseVerbs)
		}
	}
}

func leaseNamespace(o ourContainer) string {
	if ns := o.flags["lease-namespace"]; ns != "" {
		return ns
	}
	return "kube-system"
}

// projectedAudience finds the projected ServiceAccount token mounted at file and returns its audience.
func projectedAudience(o ourContainer, file string) (string, error) {
	for _, m := range o.ct.VolumeMounts {
		dir := strings.TrimSuffix(m.MountPath, "/") + "/"
		if !strings.HasPrefix(file, dir) {
			continue
		}
		for _, v := range o.pt.spec.Volumes {
			if v.Name != m.Name || v.Projected == nil {
				continue
			}
			for _, src := range v.Projected.Sources {
				if t := src.ServiceAccountToken; t != nil && path.Join(m.MountPath, t.Path) == file {
					if t.Audience == "" {
						return "", fmt.Errorf("the projected token has no audience: it is kube-apiserver's token, " +
							"which a proxy-server must not be able to replay against the API")
					}
					return t.Audience, nil
				}
			}
		}
	}
	return "", fmt.Errorf("not a projected serviceAccountToken in a volume of the pod")
}

// checkAccess: a container that calls kube-apiserver for `what` with its in-cluster credentials (no
// --kubeconfig) needs its ServiceAccount token mounted and RBAC in this output granting `verbs` on the
// resource (in namespace ns; "" for cluster-scoped). With a --kubeconfig the identity is not known here.
func (c *checker) checkAccess(o ourContainer, what, ns, group, resource string, verbs []string) {
	if o.flags["kubeconfig"] != "" {
		return
	}
	owner, spec := o.pt.owner, o.pt.spec
	podNS := owner.meta.GetNamespace()
	sa := spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	automount := spec.AutomountServiceAccountToken
	if automount == nil {
		for _, x := range c.objs {
			if acct, ok := x.obj.(*corev1.ServiceAccount); ok && acct.Name == sa && acct.Namespace == podNS {
				automount = acct.AutomountServiceAccountToken
			}
		}
	}
	if automount != nil && !*automount {
		c.fail(owner, "container %s: %s without --kubeconfig uses the in-cluster credentials, but the pod does not "+
			"mount its ServiceAccount token (automountServiceAccountToken: false)", o.ct.Name, what)
		return
	}
	for _, verb := range verbs {
		if !c.allowed(podNS, sa, group, resource, verb, ns) {
			where := "cluster-wide"
			if ns != "" {
				where = "in namespace " + ns
			}
			c.fail(owner, "container %s: %s needs ServiceAccount %s/%s to %s %s.%s %s; no binding in this output grants it",
				o.ct.Name, what, podNS, sa, verb, resource, group, where)
		}
	}
	c.notes = append(c.notes, fmt.Sprintf("%s: ServiceAccount %s/%s may %s %s (%s)", o.id(), podNS, sa,
		strings.Join(verbs, "/"), resource, what))
}

// allowed evaluates the RBAC objects of this output (plus the built-in ClusterRoles above) for a ServiceAccount.
func (c *checker) allowed(saNS, sa, group, resource, verb, ns string) bool {
	subject := func(subjects []rbacv1.Subject, bindingNS string) bool {
		for _, s := range subjects {
			sNS := s.Namespace
			if sNS == "" {
				sNS = bindingNS
			}
			if s.Kind == "ServiceAccount" && s.Name == sa && sNS == saNS {
				return true
			}
		}
		return false
	}
	rules := func(kind, roleNS, name string) []rbacv1.PolicyRule {
		if kind == "ClusterRole" {
			if r, ok := builtinRules[name]; ok {
				return r
			}
		}
		for _, x := range c.objs {
			switch r := x.obj.(type) {
			case *rbacv1.ClusterRole:
				if kind == "ClusterRole" && r.Name == name {
					return r.Rules
				}
			case *rbacv1.Role:
				if kind == "Role" && r.Name == name && r.Namespace == roleNS {
					return r.Rules
				}
			}
		}
		return nil
	}
	covers := func(rs []rbacv1.PolicyRule) bool {
		has := func(list []string, v string) bool { return slices.Contains(list, v) || slices.Contains(list, "*") }
		for _, r := range rs {
			if len(r.ResourceNames) == 0 && has(r.APIGroups, group) && has(r.Resources, resource) && has(r.Verbs, verb) {
				return true
			}
		}
		return false
	}
	for _, x := range c.objs {
		switch b := x.obj.(type) {
		case *rbacv1.ClusterRoleBinding:
			if subject(b.Subjects, "") && covers(rules("ClusterRole", "", b.RoleRef.Name)) {
				return true
			}
		case *rbacv1.RoleBinding:
			if ns != "" && b.Namespace == ns && subject(b.Subjects, b.Namespace) &&
				covers(rules(b.RoleRef.Kind, b.Namespace, b.RoleRef.Name)) {
				return true
			}
		}
	}
	return false
}
