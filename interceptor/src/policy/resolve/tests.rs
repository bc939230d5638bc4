use super::*;
use crate::policy::{Origin, parse_str};

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect()
}

/// A policy built in code; `line` makes origins distinct.
fn policy(namespace: &str, name: &str, mode: Mode) -> PeerAuthentication {
    PeerAuthentication {
        name: name.into(),
        namespace: namespace.into(),
        selector: None,
        mode,
        port_level: BTreeMap::new(),
        origin: Origin {
            file: "test.yaml".into(),
            line: 1,
        },
    }
}

fn workload_policy(
    namespace: &str,
    name: &str,
    selector: &[(&str, &str)],
    mode: Mode,
) -> PeerAuthentication {
    PeerAuthentication {
        selector: Some(labels(selector)),
        ..policy(namespace, name, mode)
    }
}

fn with_ports(mut policy: PeerAuthentication, ports: &[(u16, Mode)]) -> PeerAuthentication {
    policy.port_level = ports.iter().copied().collect();
    policy
}

fn set(policies: Vec<PeerAuthentication>) -> PolicySet {
    PolicySet::from_oldest_first(DEFAULT_ROOT_NAMESPACE, policies).unwrap()
}

fn decided(mode: Mode, namespace: &str, name: &str) -> Decision {
    Decision {
        mode,
        policy: Some(PolicyRef {
            namespace: namespace.into(),
            name: name.into(),
        }),
    }
}

/// Effective policy of a workload in `namespace` labelled app=web.
fn effective_for(set: &PolicySet, namespace: &str) -> EffectivePolicy {
    let labels = labels(&[("app", "web"), ("version", "v1")]);
    set.effective(&WorkloadRef {
        namespace,
        labels: &labels,
    })
}

// --- Scopes and precedence ------------------------------------------------------------

#[test]
fn no_policy_is_permissive_by_default() {
    let effective = effective_for(&PolicySet::default(), "foo");
    assert_eq!(effective.default, Decision::builtin_default());
    assert_eq!(effective.default.mode, Mode::Permissive);
    assert_eq!(effective.default.policy, None);
    assert!(effective.ports.is_empty());
    assert_eq!(effective.for_port(8080), &Decision::builtin_default());
}

#[test]
fn mesh_policy_applies_everywhere() {
    let set = set(vec![policy("istio-system", "default", Mode::Strict)]);
    for namespace in ["foo", "bar", "istio-system"] {
        assert_eq!(
            effective_for(&set, namespace).default,
            decided(Mode::Strict, "istio-system", "default"),
            "{namespace}"
        );
    }
}

#[test]
fn mesh_unset_is_the_builtin_permissive() {
    let set = set(vec![policy("istio-system", "default", Mode::Unset)]);
    assert_eq!(
        effective_for(&set, "foo").default,
        Decision::builtin_default()
    );
}

#[test]
fn namespace_policy_overrides_mesh_only_in_its_namespace() {
    let set = set(vec![
        policy("istio-system", "mesh", Mode::Strict),
        policy("foo", "default", Mode::Permissive),
    ]);
    assert_eq!(
        effective_for(&set, "foo").default,
        decided(Mode::Permissive, "foo", "default")
    );
    assert_eq!(
        effective_for(&set, "bar").default,
        decided(Mode::Strict, "istio-system", "mesh")
    );
}

#[test]
fn namespace_unset_inherits_mesh() {
    let set = set(vec![
        policy("istio-system", "mesh", Mode::Disable),
        policy("foo", "default", Mode::Unset),
    ]);
    assert_eq!(
        effective_for(&set, "foo").default,
        decided(Mode::Disable, "istio-system", "mesh")
    );
}

#[test]
fn workload_policy_overrides_namespace_and_mesh() {
    let set = set(vec![
        policy("istio-system", "mesh", Mode::Permissive),
        policy("foo", "default", Mode::Permissive),
        workload_policy("foo", "web", &[("app", "web")], Mode::Strict),
    ]);
    assert_eq!(
        effective_for(&set, "foo").default,
        decided(Mode::Strict, "foo", "web")
    );
}

#[test]
fn workload_unset_inherits_namespace_then_mesh_then_default() {
    let web = workload_policy("foo", "web", &[("app", "web")], Mode::Unset);
    let namespace = policy("foo", "default", Mode::Strict);
    let mesh = policy("istio-system", "mesh", Mode::Disable);

    let all = set(vec![mesh.clone(), namespace, web.clone()]);
    assert_eq!(
        effective_for(&all, "foo").default,
        decided(Mode::Strict, "foo", "default")
    );
    let without_namespace = set(vec![mesh, web.clone()]);
    assert_eq!(
        effective_for(&without_namespace, "foo").default,
        decided(Mode::Disable, "istio-system", "mesh")
    );
    let alone = set(vec![web]);
    assert_eq!(
        effective_for(&alone, "foo").default,
        Decision::builtin_default()
    );
}

#[test]
fn selector_must_match_all_labels() {
    let mut policies = vec![
        workload_policy("foo", "other-app", &[("app", "db")], Mode::Strict),
        workload_policy(
            "foo",
            "needs-more",
            &[("app", "web"), ("tier", "front")],
            Mode::Strict,
        ),
    ];
    assert_eq!(
        effective_for(&set(policies.clone()), "foo").default,
        Decision::builtin_default()
    );

    // A subset of the workload's labels matches.
    policies.push(workload_policy(
        "foo",
        "subset",
        &[("version", "v1")],
        Mode::Disable,
    ));
    assert_eq!(
        effective_for(&set(policies), "foo").default,
        decided(Mode::Disable, "foo", "subset")
    );
}

#[test]
fn workload_policy_of_another_namespace_does_not_apply() {
    let set = set(vec![workload_policy(
        "bar",
        "web",
        &[("app", "web")],
        Mode::Strict,
    )]);
    assert_eq!(
        effective_for(&set, "foo").default,
        Decision::builtin_default()
    );
}

#[test]
fn selector_policies_in_the_root_namespace_are_ignored() {
    let set = set(vec![
        policy("istio-system", "mesh", Mode::Permissive),
        with_ports(
            workload_policy("istio-system", "web", &[("app", "web")], Mode::Strict),
            &[(80, Mode::Disable)],
        ),
    ]);
    for namespace in ["istio-system", "foo"] {
        let effective = effective_for(&set, namespace);
        assert_eq!(
            effective.default,
            decided(Mode::Permissive, "istio-system", "mesh"),
            "{namespace}"
        );
        assert!(effective.ports.is_empty());
    }
    assert_eq!(
        set.policies().nth(1).unwrap().scope("istio-system"),
        Scope::Ignored
    );
}

#[test]
fn root_namespace_is_configurable() {
    let set = PolicySet::from_oldest_first(
        "mesh-root",
        vec![
            policy("mesh-root", "mesh", Mode::Strict),
            policy("istio-system", "default", Mode::Disable),
        ],
    )
    .unwrap();
    assert_eq!(set.root_namespace(), "mesh-root");
    assert_eq!(
        effective_for(&set, "foo").default,
        decided(Mode::Strict, "mesh-root", "mesh")
    );
    // istio-system is an ordinary namespace here.
    assert_eq!(
        effective_for(&set, "istio-system").default,
        decided(Mode::Disable, "istio-system", "default")
    );
}

#[test]
fn empty_selector_is_namespace_wide() {
    let mut open = policy("foo", "open", Mode::Disable);
    open.selector = Some(BTreeMap::new());
    let set = set(vec![open]);
    assert_eq!(
        effective_for(&set, "foo").default,
        decided(Mode::Disable, "foo", "open")
    );
}

// --- Ports ----------------------------------------------------------------------------

#[test]
fn port_level_overrides_the_workload_mode_for_that_port() {
    let set = set(vec![with_ports(
        workload_policy("foo", "web", &[("app", "web")], Mode::Strict),
        &[(8081, Mode::Permissive)],
    )]);
    let effective = effective_for(&set, "foo");
    assert_eq!(effective.default, decided(Mode::Strict, "foo", "web"));
    assert_eq!(
        effective.for_port(8081),
        &decided(Mode::Permissive, "foo", "web")
    );
    assert_eq!(
        effective.for_port(8080),
        &decided(Mode::Strict, "foo", "web")
    );
}

#[test]
fn port_level_applies_even_when_workload_mode_is_inherited() {
    let set = set(vec![
        policy("foo", "default", Mode::Strict),
        with_ports(
            workload_policy("foo", "web", &[("app", "web")], Mode::Unset),
            &[(8080, Mode::Disable)],
        ),
    ]);
    let effective = effective_for(&set, "foo");
    assert_eq!(effective.default, decided(Mode::Strict, "foo", "default"));
    assert_eq!(
        effective.for_port(8080),
        &decided(Mode::Disable, "foo", "web")
    );
}

#[test]
fn port_level_unset_inherits_the_resolved_workload_mode() {
    let ports = [(9090, Mode::Unset)];
    let strict_workload = set(vec![
        policy("foo", "default", Mode::Disable),
        with_ports(
            workload_policy("foo", "web", &[("app", "web")], Mode::Strict),
            &ports,
        ),
    ]);
    assert_eq!(
        effective_for(&strict_workload, "foo").for_port(9090),
        &decided(Mode::Strict, "foo", "web")
    );

    // The workload mode is itself UNSET: the port inherits through it.
    let unset_workload = set(vec![
        policy("istio-system", "mesh", Mode::Strict),
        with_ports(
            workload_policy("foo", "web", &[("app", "web")], Mode::Unset),
            &ports,
        ),
    ]);
    let effective = effective_for(&unset_workload, "foo");
    assert_eq!(
        effective.ports[&9090],
        decided(Mode::Strict, "istio-system", "mesh")
    );

    let nothing_set = set(vec![with_ports(
        workload_policy("foo", "web", &[("app", "web")], Mode::Unset),
        &ports,
    )]);
    assert_eq!(
        effective_for(&nothing_set, "foo").for_port(9090),
        &Decision::builtin_default()
    );
}

// --- Oldest wins ----------------------------------------------------------------------

#[test]
fn oldest_mesh_policy_wins() {
    let set = set(vec![
        policy("istio-system", "first", Mode::Permissive),
        policy("istio-system", "second", Mode::Strict),
    ]);
    assert_eq!(
        effective_for(&set, "foo").default,
        decided(Mode::Permissive, "istio-system", "first")
    );
}

#[test]
fn oldest_namespace_policy_wins_even_if_unset() {
    // The newer policy is ignored altogether, so UNSET in the older one inherits
    // from the mesh rather than falling through to the newer namespace policy.
    let set = set(vec![
        policy("istio-system", "mesh", Mode::Disable),
        policy("foo", "first", Mode::Unset),
        policy("foo", "second", Mode::Strict),
    ]);
    assert_eq!(
        effective_for(&set, "foo").default,
        decided(Mode::Disable, "istio-system", "mesh")
    );
}

#[test]
fn oldest_matching_workload_policy_wins_with_its_ports() {
    let older = with_ports(
        workload_policy("foo", "by-app", &[("app", "web")], Mode::Permissive),
        &[(80, Mode::Disable)],
    );
    let newer = with_ports(
        workload_policy("foo", "by-version", &[("version", "v1")], Mode::Strict),
        &[(443, Mode::Strict)],
    );
    let set = set(vec![older, newer]);
    let effective = effective_for(&set, "foo");
    assert_eq!(
        effective.default,
        decided(Mode::Permissive, "foo", "by-app")
    );
    assert_eq!(
        effective.ports,
        BTreeMap::from([(80, decided(Mode::Disable, "foo", "by-app"))])
    );
}

#[test]
fn parsed_file_order_is_application_order() {
    let text = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: a, namespace: foo}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: b, namespace: foo}
spec: {mtls: {mode: DISABLE}}
";
    let set = set(parse_str(text, "f.yaml").unwrap());
    assert_eq!(
        effective_for(&set, "foo").default,
        decided(Mode::Strict, "foo", "a")
    );
}

// --- Examples and serialization -------------------------------------------------------

#[test]
fn example_workload_policy_resolves() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policies/workload-port-exception.yaml"
    ))
    .unwrap();
    let set = set(parse_str(&text, "workload-port-exception.yaml").unwrap());
    let tracker = labels(&[("app", "position-tracker"), ("pod-template-hash", "abc")]);
    let effective = set.effective(&WorkloadRef {
        namespace: "vehicles",
        labels: &tracker,
    });
    assert_eq!(effective.for_port(8080).mode, Mode::Strict);
    assert_eq!(effective.for_port(8081).mode, Mode::Permissive);
    assert_eq!(
        effective
            .for_port(8081)
            .policy
            .as_ref()
            .unwrap()
            .to_string(),
        "vehicles/position-tracker"
    );
}

#[test]
fn set_and_effective_policy_serialize_for_the_admin_api() {
    let set = set(vec![with_ports(
        workload_policy("foo", "web", &[("app", "web")], Mode::Strict),
        &[(8081, Mode::Permissive)],
    )]);
    let json = serde_json::to_value(effective_for(&set, "foo")).unwrap();
    assert_eq!(json["default"]["mode"], "STRICT");
    assert_eq!(json["default"]["policy"]["name"], "web");
    assert_eq!(json["ports"]["8081"]["mode"], "PERMISSIVE");

    let round_trip: PolicySet =
        serde_json::from_str(&serde_json::to_string(&set).unwrap()).unwrap();
    assert_eq!(
        round_trip.policies().collect::<Vec<_>>(),
        set.policies().collect::<Vec<_>>()
    );
}
