//! The manifests of `deploy/kubernetes`, rendered by kubectl's built-in kustomize and applied with server-side
//! dry-run to the real kube-apiserver of the fixture: the API server's own validation, defaulting and
//! admission (ServiceAccount, Priority, RBAC escalation checks, strict field validation) accept every object
//! of every overlay, and of the egress-selector ConfigMap. Nothing is persisted. `deploy/validate.sh` checks the
//! same files offline (schemas, our flags, consistency); this is the real API server's verdict.

use konnectivity_it::controlplane::{ControlPlane, EgressMode, Options};
use std::path::{Path, PathBuf};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes")
}

/// Renders `dir` with `kubectl kustomize`, writes it to the fixture's directory as `<name>.yaml` and applies it
/// with `--dry-run=server`, client-side and then server-side apply. Returns the number of objects.
fn dry_run(cp: &ControlPlane, name: &str, dir: &Path, namespace: Option<&str>) -> usize {
    let dir = dir.to_str().expect("utf-8 path");
    let (ok, rendered) = cp.kubectl(&["kustomize", dir]).expect("kubectl kustomize");
    assert!(ok, "kubectl kustomize {dir}:\n{rendered}");
    let objects = rendered.lines().filter(|l| l.starts_with("kind:")).count();
    assert!(objects > 0, "{name}: nothing rendered");
    let file = cp.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&file, &rendered).expect("write rendered manifests");
    let file = file.to_str().expect("utf-8 path");
    for server_side in [false, true] {
        let mut args = vec!["apply", "--dry-run=server", "--validate=strict", "-f", file];
        if server_side {
            args.extend(["--server-side", "--field-manager=konnectivity-e2e"]);
        }
        if let Some(ns) = namespace {
            args.extend(["--namespace", ns]);
        }
        let (ok, out) = cp.kubectl(&args).expect("kubectl apply");
        assert!(ok, "{name}: kubectl {}:\n{out}", args.join(" "));
        let applied = out.lines().filter(|l| l.ends_with("(server dry run)")).count();
        assert_eq!(applied, objects, "{name}: {objects} objects rendered, kubectl reports:\n{out}");
        assert!(!out.to_lowercase().contains("warning"), "{name}: kubectl {}:\n{out}", args.join(" "));
    }
    objects
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_overlay_passes_server_side_dry_run() {
    let mut options = Options::new(EgressMode::GrpcUds);
    options.agent = false;
    let cp = ControlPlane::start(options).await.expect("control plane");

    // Prerequisites that a real cluster has and this fixture (kube-apiserver and etcd only) does not:
    // - the namespace of the hosted control plane (overlays/server-sidecar) exists before its kube-apiserver is
    //   installed there, and is not part of the manifests;
    // - kube-controller-manager creates every namespace's `default` ServiceAccount; the ServiceAccount
    //   admission plugin refuses a Pod whose ServiceAccount does not exist, and the static Pod
    //   (overlays/server-static-pod) names none, so it gets kube-system's `default`.
    cp.create(
        "/api/v1/namespaces",
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "example-tenant-control-plane"}}),
    )
    .await
    .expect("namespace");
    cp.create(
        "/api/v1/namespaces/kube-system/serviceaccounts",
        serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}),
    )
    .await
    .expect("kube-system/default ServiceAccount");

    let mut overlays: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("overlays"))
        .expect("deploy/kubernetes/overlays")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("kustomization.yaml").exists())
        .collect();
    overlays.sort();
    assert!(overlays.len() >= 7, "expected at least 7 overlays, found {overlays:?}");
    let mut counts = Vec::new();
    for dir in &overlays {
        let name = dir.file_name().and_then(|n| n.to_str()).expect("overlay name").to_string();
        let n = dry_run(&cp, &name, dir, None);
        counts.push((name, n));
    }
    // The egress-selector ConfigMap on its own has no namespace (a kustomization that includes it sets one).
    let n = dry_run(&cp, "egress-selector", &deploy_dir().join("egress-selector"), Some("kube-system"));
    counts.push(("egress-selector (ConfigMap, in kube-system)".into(), n));

    println!("server-side dry-run accepted (client-side and server-side apply):");
    for (name, n) in &counts {
        println!("  {name}: {n} objects");
    }
    let slow = cp.shutdown();
    assert!(slow.is_empty(), "needed SIGKILL: {slow:?}");
}
