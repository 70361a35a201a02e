//! `deploy/k8s`: every manifest parses into the real Kubernetes types, and what matters holds: the
//! Role grants exactly what the code calls, grace periods cover the longest task, probes point at
//! endpoints the binary serves, and the binary accepts the arguments the manifests give it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Container, Namespace, PodSpec, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde_json::Value;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/k8s");

#[derive(Default)]
struct Manifests {
    namespace: String,
    deployments: BTreeMap<String, Deployment>,
    roles: Vec<Role>,
    bindings: Vec<RoleBinding>,
    service_accounts: Vec<ServiceAccount>,
}

fn load() -> Manifests {
    let kustomization: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(Path::new(DIR).join("kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(DIR)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.ends_with(".yaml") && n != "kustomization.yaml" && n != "kustomizeconfig.yaml"
        })
        .collect();
    assert_eq!(
        listed, present,
        "kustomization.yaml lists every manifest, and only those"
    );
    let mut m = Manifests {
        namespace: kustomization["namespace"].as_str().unwrap().to_string(),
        ..Default::default()
    };
    for file in &listed {
        let text = std::fs::read_to_string(Path::new(DIR).join(file)).unwrap();
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(document).unwrap_or_else(|e| panic!("{file}: {e}"));
            let kind = value["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: a document without kind"))
                .to_string();
            match kind.as_str() {
                "Deployment" => {
                    let d: Deployment = parse::<Deployment>(file, value);
                    m.deployments.insert(d.metadata.name.clone().unwrap(), d);
                }
                "Role" => m.roles.push(parse::<Role>(file, value)),
                "RoleBinding" => m.bindings.push(parse::<RoleBinding>(file, value)),
                "ServiceAccount" => m
                    .service_accounts
                    .push(parse::<ServiceAccount>(file, value)),
                "StatefulSet" => drop(parse::<StatefulSet>(file, value)),
                "Service" => drop(parse::<Service>(file, value)),
                "Secret" => drop(parse::<Secret>(file, value)),
                "Namespace" => drop(parse::<Namespace>(file, value)),
                "ConfigMap" => drop(parse::<k8s_openapi::api::core::v1::ConfigMap>(file, value)),
                other => panic!("{file}: unexpected kind {other}"),
            }
        }
    }
    m
}

/// Parses one manifest document into its Kubernetes type, naming the file on failure.
fn parse<T: serde::de::DeserializeOwned>(file: &str, value: Value) -> T {
    serde_json::from_value(value)
        .unwrap_or_else(|e| panic!("{file}: not a valid {}: {e}", std::any::type_name::<T>()))
}

fn pod_spec(d: &Deployment) -> &PodSpec {
    d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn pod_meta(d: &Deployment) -> &ObjectMeta {
    d.spec.as_ref().unwrap().template.metadata.as_ref().unwrap()
}

fn container(d: &Deployment) -> &Container {
    &pod_spec(d).containers[0]
}

/// The value of `--name=value` among a container's args.
fn arg<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.args
        .as_ref()?
        .iter()
        .find_map(|a| a.strip_prefix(&format!("{name}=")))
}

/// Checks that the probes hit the worker's health paths on the port given by --metrics-addr.
fn env(c: &Container, name: &str) -> Option<String> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

fn check_probes(c: &Container) {
    let port = arg(c, "--metrics-addr")
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse::<i32>().ok())
        .expect("--metrics-addr");
    let named: BTreeMap<String, i32> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    for (probe, path) in [
        (&c.readiness_probe, warren_broker::endpoints::READY_PATH),
        (&c.liveness_probe, warren_broker::endpoints::HEALTH_PATH),
    ] {
        let http = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("an HTTP probe");
        assert_eq!(http.path.as_deref(), Some(path), "{}", c.name);
        let probed = match &http.port {
            IntOrString::Int(n) => *n,
            IntOrString::String(name) => named[name],
        };
        assert_eq!(
            probed, port,
            "{}: probes target the port the binary listens on",
            c.name
        );
    }
}

#[test]
fn the_role_grants_exactly_what_the_code_calls() {
    let m = load();
    assert_eq!(m.roles.len(), 1);
    let mut granted = BTreeSet::new();
    for rule in m.roles[0].rules.iter().flatten() {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let used: BTreeSet<(String, String, String)> = warren_deploy::kubernetes::API_CALLS
        .iter()
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
        .collect();
    assert_eq!(granted, used);
    let binding = &m.bindings[0];
    assert_eq!(
        binding.role_ref.kind, "Role",
        "namespaced, not a ClusterRole"
    );
    assert_eq!(
        binding.role_ref.name,
        m.roles[0].metadata.name.clone().unwrap()
    );
    let subject = &binding.subjects.as_ref().unwrap()[0];
    let autoscaler = &m.deployments["warren-autoscaler"];
    let account = pod_spec(autoscaler).service_account_name.clone().unwrap();
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str()),
        ("ServiceAccount", account.as_str())
    );
    assert!(
        m.service_accounts
            .iter()
            .any(|sa| sa.metadata.name.as_deref() == Some(account.as_str()))
    );
}

#[test]
fn workers_get_the_time_to_finish_their_longest_task() {
    let m = load();
    let worker = &m.deployments["warren-worker"];
    let pod = pod_spec(worker);
    let c = container(worker);
    let grace: i64 = arg(c, "--grace").unwrap().parse().unwrap();
    let longest: i64 = arg(c, "--default-timeout").unwrap().parse().unwrap();
    let termination = pod.termination_grace_period_seconds.unwrap();
    assert!(grace >= longest, "--grace covers the longest task");
    assert!(
        termination > grace,
        "Kubernetes waits longer than the worker's own grace"
    );
    check_probes(c);
    let name_env = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "WARREN_WORKER_NAME")
        .expect("worker name from the pod");
    let field = name_env
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        field.field_path, "metadata.name",
        "connections are named after pods, for idle-pod detection"
    );
    assert_eq!(
        worker.spec.as_ref().unwrap().replicas,
        None,
        "the autoscaler owns replicas: a re-apply must not reset the pool"
    );
    // The sandbox's data root is the shared volume, and the credentials are mounted outside every
    // sandbox root (the worker refuses to start otherwise).
    let worker_container = container(worker);
    let data_root = arg(worker_container, "--data-root").expect("--data-root");
    let mounts = worker_container.volume_mounts.as_ref().unwrap();
    assert!(mounts.iter().any(|m| m.mount_path == data_root));
    let password = worker_container
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "WARREN_AMQP_PASSWORD_FILE")
        .and_then(|e| e.value.clone())
        .expect("a password file");
    for root in warren_worker::handlers::exec::SYSTEM_READ_ROOTS
        .iter()
        .chain([&data_root])
    {
        assert!(
            !std::path::Path::new(&password).starts_with(root),
            "{password} is under the sandbox root {root}"
        );
    }
    assert_eq!(
        pod.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );
}

#[test]
fn the_autoscaler_targets_the_worker_deployment_in_its_namespace() {
    let m = load();
    let c = container(&m.deployments["warren-autoscaler"]);
    assert_eq!(arg(c, "--backend"), Some("kubernetes"));
    // The pool's Deployment comes from a variable kustomize renames with it; the namespace is the
    // pod's own (an overlay that moves the manifests moves both).
    let target = env(c, "WARREN_DEPLOYMENT").expect("WARREN_DEPLOYMENT");
    assert!(m.deployments.contains_key(&target), "{target}");
    assert_eq!(arg(c, "--deployment"), None);
    assert_eq!(
        arg(c, "--namespace"),
        None,
        "the namespace is the pod's own"
    );
    let text = std::fs::read_to_string(Path::new(DIR).join("autoscaler.yaml")).unwrap();
    assert!(
        !text.contains(&format!("namespace={}", m.namespace))
            && !text.contains(&format!("namespace: {}", m.namespace))
            && !text.contains(&format!(":{}:", m.namespace)),
        "the base's namespace '{}' is written nowhere in autoscaler.yaml",
        m.namespace
    );
    // The Role may touch that Deployment only, by name, and kustomize keeps the names in step.
    for rule in m.roles[0].rules.iter().flatten() {
        if rule.api_groups.iter().flatten().any(|g| g == "apps") {
            assert_eq!(
                rule.resource_names.as_deref(),
                Some(&[target.clone()][..]),
                "{rule:?}"
            );
        }
    }
    let config = std::fs::read_to_string(Path::new(DIR).join("kustomizeconfig.yaml")).unwrap();
    for path in [
        "rules/resourceNames",
        "spec/template/spec/containers/env/value",
    ] {
        assert!(config.contains(path), "kustomizeconfig.yaml renames {path}");
    }
    let base = std::fs::read_to_string(Path::new(DIR).join("kustomization.yaml")).unwrap();
    assert!(
        base.contains("configurations:\n  - kustomizeconfig.yaml"),
        "{base}"
    );
    assert_eq!(
        arg(c, "--queue"),
        arg(container(&m.deployments["warren-worker"]), "--queue")
    );
    check_probes(c);
}

#[test]
fn the_binary_accepts_the_arguments_the_manifests_give_it() {
    let m = load();
    for (name, d) in &m.deployments {
        accepts_arguments(name, &container(d).args.clone().unwrap());
    }
}

/// Asserts that the binary accepts `args` (with `--help`, so nothing runs).
fn accepts_arguments(name: &str, args: &[String]) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: warren {args:?} is refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_dockerfile_builds_one_non_root_image() {
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    assert_eq!(
        dockerfile.matches("\nFROM ").count() + usize::from(dockerfile.starts_with("FROM ")),
        2,
        "multi-stage"
    );
    assert!(dockerfile.contains("USER 10001"));
    let m = load();
    for d in m.deployments.values() {
        let pod = pod_spec(d);
        assert_eq!(
            pod.security_context.as_ref().unwrap().run_as_user,
            Some(10001)
        );
    }
}

/// Metric names in a PromQL expression (`warren_*`), with histogram suffixes removed.
fn metric_names_in(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("warren_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.push(base.to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/warren.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut exported: BTreeSet<String> = warren_worker::metrics::WorkerMetrics::new()
        .unwrap()
        .endpoints
        .metric_names()
        .into_iter()
        .collect();
    exported.extend(
        warren_deploy::metrics::Metrics::new()
            .unwrap()
            .endpoints
            .metric_names(),
    );
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queried.extend(metric_names_in(target["expr"].as_str().unwrap()));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = variable["definition"].as_str() {
            queried.extend(metric_names_in(q));
        }
    }
    assert!(
        queried.len() >= 15,
        "the dashboard covers the pool: {queried:?}"
    );
    let missing: Vec<&String> = queried.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "queried but never exported: {missing:?}"
    );
}

#[test]
fn the_pod_monitor_selects_the_warren_pods_on_their_metrics_port() {
    let m = load();
    let text = std::fs::read_to_string(Path::new(DIR).join("monitoring/podmonitor.yaml")).unwrap();
    let monitor: Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(monitor["kind"], "PodMonitor");
    let apps: Vec<&str> = monitor["spec"]["selector"]["matchExpressions"][0]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["path"], warren_broker::endpoints::METRICS_PATH);
    for app in apps {
        let d = m
            .deployments
            .values()
            .find(|d| pod_meta(d).labels.as_ref().unwrap()["app"] == app)
            .expect(app);
        let port = endpoint["port"].as_str().unwrap();
        assert!(
            container(d)
                .ports
                .iter()
                .flatten()
                .any(|p| p.name.as_deref() == Some(port)),
            "{app} has a port named {port}"
        );
        let annotations = pod_meta(d).annotations.clone().unwrap();
        assert_eq!(
            annotations["prometheus.io/scrape"], "true",
            "{app} also carries plain scrape annotations"
        );
    }
}

#[test]
fn the_admission_policy_lets_the_autoscaler_change_only_the_deletion_cost() {
    let dir = Path::new(DIR).join("admission");
    let kustomization: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap())
            .unwrap();
    assert_eq!(kustomization["resources"][0], "pod-patch-policy.yaml");
    let text = std::fs::read_to_string(dir.join("pod-patch-policy.yaml")).unwrap();
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect();
    let policy = docs
        .iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .unwrap();
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicyBinding")
        .unwrap();
    assert_eq!(binding["spec"]["policyName"], policy["metadata"]["name"]);
    assert_eq!(binding["spec"]["validationActions"][0], "Deny");
    // It applies to the ServiceAccount the autoscaler Deployment runs as, in any namespace (an
    // overlay may move the manifests): no namespace is written in it.
    let condition = policy["spec"]["matchConditions"][0]["expression"]
        .as_str()
        .unwrap();
    assert!(
        condition.contains("startsWith('system:serviceaccount:')")
            && condition.contains("endsWith(':warren-autoscaler')"),
        "{condition}"
    );
    assert!(
        !text.contains("serviceaccount:warren:"),
        "no namespace is hard-coded"
    );
    assert!(
        std::fs::read_to_string(Path::new(DIR).join("autoscaler.yaml"))
            .unwrap()
            .contains("serviceAccountName: warren-autoscaler")
    );
    // The one annotation it allows is the one the code sets.
    assert!(text.contains(&format!("'{}'", warren_deploy::kubernetes::DELETION_COST)));
    for rule in [
        "object.spec == oldObject.spec",
        "labels",
        "ownerReferences",
        "finalizers",
    ] {
        assert!(text.contains(rule), "the policy checks {rule}");
    }
}

#[test]
fn the_run_job_example_mounts_the_workers_volume_and_gives_valid_arguments() {
    let text = std::fs::read_to_string(Path::new(DIR).join("examples/run-job.yaml")).unwrap();
    let job: k8s_openapi::api::batch::v1::Job =
        serde_yaml_ng::from_str(&text).expect("run-job.yaml is a Job");
    let spec = job.spec.unwrap().template.spec.unwrap();
    let run = &spec.containers[0];
    let args = run.args.clone().unwrap();
    assert_eq!(args[0], "run");
    accepts_arguments("run-job.yaml", &args);
    // Paths must name the same files for the runner and the workers.
    let m = load();
    let worker = &m.deployments["warren-worker"];
    let claim = |spec: &PodSpec| {
        spec.volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "data")
            .and_then(|v| v.persistent_volume_claim.as_ref())
            .map(|c| c.claim_name.clone())
    };
    let mount = |c: &Container| {
        c.volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "data")
            .map(|v| v.mount_path.clone())
    };
    assert_eq!(claim(&spec), claim(pod_spec(worker)));
    assert_eq!(mount(run), mount(container(worker)));
    assert!(
        args.last().unwrap().starts_with(&mount(run).unwrap()),
        "the pipeline file is on the shared volume"
    );
}

#[test]
fn the_operator_overlay_replaces_exactly_the_base_broker_and_keeps_its_service_name() {
    let overlay = Path::new(DIR).join("overlays/rabbitmq-operator");
    let kustomization: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(overlay.join("kustomization.yaml")).unwrap(),
    )
    .unwrap();
    // Every object the overlay deletes is one the base has.
    let mut base = BTreeSet::new();
    for entry in std::fs::read_dir(DIR).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml")
            && path.file_name().is_some_and(|n| n != "kustomization.yaml")
        {
            let text = std::fs::read_to_string(&path).unwrap();
            for document in serde_yaml_ng::Deserializer::from_str(&text) {
                let v = Value::deserialize(document).unwrap();
                base.insert((
                    v["kind"].as_str().unwrap_or_default().to_string(),
                    v["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                ));
            }
        }
    }
    let patches = kustomization["patches"].as_array().unwrap();
    let mut deleted = BTreeSet::new();
    for patch in patches {
        let p: Value = serde_yaml_ng::from_str(patch["patch"].as_str().unwrap()).unwrap();
        assert_eq!(p["$patch"], "delete", "{p}");
        let key = (
            p["kind"].as_str().unwrap().to_string(),
            p["metadata"]["name"].as_str().unwrap().to_string(),
        );
        assert!(base.contains(&key), "{key:?} is not in the base");
        deleted.insert(key);
    }
    assert!(deleted.contains(&("StatefulSet".to_string(), "rabbitmq".to_string())));
    // The Operator names the client Service after the cluster: the workers' URL still works.
    let cluster: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(overlay.join("rabbitmqcluster.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(cluster["kind"], "RabbitmqCluster");
    assert_eq!(cluster["spec"]["replicas"], 3);
    let m = load();
    let url = container(&m.deployments["warren-worker"])
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "WARREN_AMQP_URL")
        .and_then(|e| e.value.clone())
        .unwrap();
    let name = cluster["metadata"]["name"].as_str().unwrap();
    assert!(url.contains(&format!("@{name}:5672")), "{url}");
}

/// A Secret's files belong to root; a container running as another user reads them only through
/// the "other" bits or, with the pod's `fsGroup`, the group bits (a worker once could not read
/// its own password: 0400 and no fsGroup).
#[test]
fn every_pod_can_read_the_secrets_it_mounts() {
    let m = load();
    for (name, d) in &m.deployments {
        let spec = pod_spec(d);
        let context = spec.security_context.as_ref();
        let user = context.and_then(|c| c.run_as_user).unwrap_or(0);
        let fs_group = context.and_then(|c| c.fs_group);
        for volume in spec.volumes.iter().flatten() {
            let Some(secret) = &volume.secret else {
                continue;
            };
            let mode = secret.default_mode.unwrap_or(0o644);
            let readable =
                user == 0 || mode & 0o004 != 0 || (fs_group.is_some() && mode & 0o040 != 0);
            assert!(
                readable,
                "{name}: volume {} (mode {mode:o}) is unreadable for uid {user} (fsGroup {fs_group:?})",
                volume.name
            );
        }
    }
}

/// Every pod runs under the runtime's default seccomp profile (Kubernetes before 1.27 applies
/// none unless asked), the run Job's included.
#[test]
fn every_pod_asks_for_the_runtime_default_seccomp_profile() {
    let m = load();
    let job: k8s_openapi::api::batch::v1::Job = serde_yaml_ng::from_str(
        &std::fs::read_to_string(Path::new(DIR).join("examples/run-job.yaml")).unwrap(),
    )
    .unwrap();
    let mut pods: Vec<(String, PodSpec)> = m
        .deployments
        .iter()
        .map(|(name, d)| (name.clone(), pod_spec(d).clone()))
        .collect();
    pods.push(("run-job".into(), job.spec.unwrap().template.spec.unwrap()));
    let text = std::fs::read_to_string(Path::new(DIR).join("rabbitmq.yaml")).unwrap();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = Value::deserialize(doc).unwrap();
        if value["kind"] == "StatefulSet" {
            let set: k8s_openapi::api::apps::v1::StatefulSet = parse("rabbitmq.yaml", value);
            pods.push(("rabbitmq".into(), set.spec.unwrap().template.spec.unwrap()));
        }
    }
    assert!(
        pods.len() >= 4,
        "{:?}",
        pods.iter().map(|p| &p.0).collect::<Vec<_>>()
    );
    for (name, spec) in pods {
        let profile = spec
            .security_context
            .and_then(|c| c.seccomp_profile)
            .map(|p| p.type_);
        assert_eq!(profile.as_deref(), Some("RuntimeDefault"), "{name}");
    }
}

/// The shipped workers may run every program of the example pipeline: run as the README says,
/// its mosaic step was once refused on a real cluster (`gdalbuildvrt` not allowed).
#[test]
fn the_shipped_workers_allow_every_program_of_the_example_pipeline() {
    let m = load();
    let worker = container(&m.deployments["warren-worker"]);
    let allowed: Vec<&str> = worker
        .args
        .iter()
        .flatten()
        .filter_map(|a| a.strip_prefix("--allow-exec="))
        .collect();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/pipeline/pipeline.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let pipeline =
        warren_submitter::pipeline::Pipeline::parse(&text, &path, "warren.tasks").unwrap();
    for stage in &pipeline.stages {
        assert!(
            allowed.contains(&stage.command[0].as_str()),
            "stage {} runs {}, which deploy/k8s/worker.yaml does not allow ({allowed:?})",
            stage.name,
            stage.command[0]
        );
    }
}
