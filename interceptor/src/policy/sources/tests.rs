use std::collections::BTreeMap;

use super::*;
use crate::policy::{Decision, Mode, Origin, WorkloadRef};

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

fn names(sources: &PolicySources) -> Vec<String> {
    sources
        .active()
        .policies()
        .map(|policy| policy.reference().to_string())
        .collect()
}

/// The decision for a workload in namespace `foo`.
fn decision(sources: &PolicySources) -> Decision {
    let labels = BTreeMap::new();
    sources
        .active()
        .effective(&WorkloadRef {
            namespace: "foo",
            labels: &labels,
        })
        .default
}

fn sources_with(applied: Vec<PeerAuthentication>) -> PolicySources {
    let mut sources = PolicySources::new("istio-system");
    sources.apply(applied).unwrap();
    sources
}

// --- Istio's age rule -----------------------------------------------------------------

#[test]
fn reapplying_a_policy_keeps_its_age() {
    // Two namespace-wide policies: the older decides.
    let mut sources = sources_with(vec![policy("foo", "a", Mode::Strict)]);
    sources
        .apply(vec![policy("foo", "b", Mode::Disable)])
        .unwrap();
    assert_eq!(decision(&sources).mode, Mode::Strict);
    // Re-applied unchanged, then changed: still the older one.
    sources
        .apply(vec![policy("foo", "a", Mode::Strict)])
        .unwrap();
    assert_eq!(names(&sources), ["foo/a", "foo/b"]);
    assert_eq!(decision(&sources).mode, Mode::Strict);
    sources
        .apply(vec![policy("foo", "a", Mode::Permissive)])
        .unwrap();
    assert_eq!(names(&sources), ["foo/a", "foo/b"]);
    assert_eq!(decision(&sources).mode, Mode::Permissive);
}

#[test]
fn a_reload_keeps_ages_whatever_the_file_order() {
    let mut sources = PolicySources::new("istio-system");
    sources
        .set_files(vec![policy("foo", "zz-old", Mode::Strict)])
        .unwrap();
    // A file that sorts first arrives later: it is the younger policy.
    sources
        .set_files(vec![
            policy("foo", "aa-new", Mode::Disable),
            policy("foo", "zz-old", Mode::Strict),
        ])
        .unwrap();
    assert_eq!(names(&sources), ["foo/zz-old", "foo/aa-new"]);
    assert_eq!(decision(&sources).mode, Mode::Strict);
}

#[test]
fn ages_survive_a_restart_and_a_policy_gone_from_every_source_starts_over() {
    let mut sources = PolicySources::new("istio-system");
    sources
        .set_files(vec![policy("foo", "file", Mode::Strict)])
        .unwrap();
    sources
        .apply(vec![policy("foo", "cli", Mode::Disable)])
        .unwrap();
    let saved: SavedSources =
        serde_json::from_str(&serde_json::to_string(&sources.saved()).unwrap()).unwrap();
    // The restarted agent reads the directory again, now with a new file first.
    let restored = PolicySources::restore(
        "istio-system",
        saved,
        vec![
            policy("foo", "another", Mode::Permissive),
            policy("foo", "file", Mode::Strict),
        ],
    )
    .unwrap();
    assert_eq!(names(&restored), ["foo/file", "foo/cli", "foo/another"]);

    let mut sources = restored;
    sources.delete("foo", "file").unwrap();
    sources
        .apply(vec![policy("foo", "file", Mode::Strict)])
        .unwrap();
    assert_eq!(names(&sources), ["foo/cli", "foo/another", "foo/file"]);
}

#[test]
fn an_applied_object_overrides_a_file_of_the_same_name_and_keeps_its_age() {
    let mut sources = PolicySources::new("istio-system");
    sources
        .set_files(vec![
            policy("foo", "a", Mode::Strict),
            policy("foo", "b", Mode::Disable),
        ])
        .unwrap();
    sources
        .apply(vec![policy("foo", "b", Mode::Permissive)])
        .unwrap();
    assert_eq!(names(&sources), ["foo/a", "foo/b"]);
    assert_eq!(
        sources.active().get("foo", "b").unwrap().mode,
        Mode::Permissive
    );
}

// --- All or nothing -------------------------------------------------------------------

#[test]
fn apply_is_all_or_nothing() {
    let mut sources = sources_with(vec![policy("foo", "a", Mode::Strict)]);
    let before = sources.active();
    let mut bad = policy("foo", "ports", Mode::Strict);
    bad.port_level = BTreeMap::from([(80, Mode::Disable)]);
    bad.origin = Origin {
        file: "batch.yaml".into(),
        line: 7,
    };
    let error = sources
        .apply(vec![policy("foo", "good", Mode::Disable), bad])
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "batch.yaml:7: field `spec.portLevelMtls`: portLevelMtls requires a selector: \
         port-level modes are only allowed in a workload policy with non-empty \
         spec.selector.matchLabels"
    );
    assert_eq!(names(&sources), ["foo/a"]);
    assert!(
        Arc::ptr_eq(&before, &sources.active()),
        "the set was rebuilt"
    );
}

#[test]
fn a_batch_with_a_name_twice_is_refused() {
    let mut second = policy("foo", "a", Mode::Disable);
    second.origin.line = 12;
    let mut sources = PolicySources::new("istio-system");
    let error = sources
        .apply(vec![policy("foo", "a", Mode::Strict), second])
        .unwrap_err();
    match error {
        PolicyError::Duplicate {
            policy,
            first,
            second,
        } => {
            assert_eq!(policy.to_string(), "foo/a");
            assert_eq!((first.line, second.line), (1, 12));
        }
        other => panic!("expected a duplicate, got {other}"),
    }
    let error = sources
        .set_files(vec![
            policy("foo", "a", Mode::Strict),
            policy("foo", "a", Mode::Strict),
        ])
        .unwrap_err();
    assert!(matches!(error, PolicyError::Duplicate { .. }));
    assert!(sources.active().is_empty());
}

#[test]
fn objects_built_in_code_are_checked() {
    let nameless = policy("", "", Mode::Strict);
    let mut zero_port = policy("foo", "z", Mode::Strict);
    zero_port.selector = Some(BTreeMap::from([("app".to_owned(), "web".to_owned())]));
    zero_port.port_level = BTreeMap::from([(0, Mode::Strict)]);
    let error = PolicySources::new("istio-system")
        .apply(vec![nameless, zero_port])
        .unwrap_err();
    assert_eq!(
        error.invalid_fields(),
        [
            "metadata.name",
            "metadata.namespace",
            "spec.portLevelMtls.0"
        ]
    );
}

#[test]
fn delete_removes_from_every_source_or_reports_not_found() {
    let mut sources = PolicySources::new("istio-system");
    sources
        .set_files(vec![policy("foo", "a", Mode::Strict)])
        .unwrap();
    sources
        .apply(vec![policy("foo", "a", Mode::Disable)])
        .unwrap();
    sources
        .apply(vec![policy("bar", "a", Mode::Strict)])
        .unwrap();
    sources.delete("foo", "a").unwrap();
    assert_eq!(names(&sources), ["bar/a"]);
    let error = sources.delete("foo", "a").unwrap_err();
    assert_eq!(
        error.to_string(),
        "PeerAuthentication foo/a not found; `interceptor policy list` shows the active ones"
    );
}

// --- The Kubernetes API as a source -------------------------------------------------------

/// An object of the API created at `created` (seconds since the Unix epoch).
fn from_api(namespace: &str, name: &str, mode: Mode, created: Option<i64>) -> ApiPolicy {
    let mut policy = policy(namespace, name, mode);
    policy.origin = Origin {
        file: format!(
            "/apis/security.istio.io/v1/namespaces/{namespace}/peerauthentications/{name}"
        ),
        line: 1,
    };
    ApiPolicy {
        policy,
        uid: format!("uid-{name}"),
        created: created.map(|s| format!("@{s}")).unwrap_or_default(),
        created_unix_ms: created.map(|s| s * 1000),
    }
}

fn now_secs() -> i64 {
    i64::try_from(now_micros() / 1_000_000).unwrap()
}

#[test]
fn an_api_object_is_as_old_as_its_creation_timestamp_against_a_file() {
    let mut sources = PolicySources::new("istio-system");
    sources
        .set_files(vec![policy("foo", "file", Mode::Permissive)])
        .unwrap();
    // Created an hour before the agent read the file: the API's object is older and decides.
    sources
        .set_api(vec![from_api(
            "foo",
            "api",
            Mode::Strict,
            Some(now_secs() - 3600),
        )])
        .unwrap();
    assert_eq!(names(&sources), ["foo/api", "foo/file"]);
    assert_eq!(decision(&sources).mode, Mode::Strict);
    // Created an hour after: the file's policy is older and decides.
    sources
        .set_api(vec![from_api(
            "foo",
            "api",
            Mode::Strict,
            Some(now_secs() + 3600),
        )])
        .unwrap();
    assert_eq!(names(&sources), ["foo/file", "foo/api"]);
    assert_eq!(decision(&sources).mode, Mode::Permissive);
    // Without a creation time: the youngest of all.
    sources
        .set_api(vec![from_api("foo", "api", Mode::Strict, None)])
        .unwrap();
    sources
        .apply(vec![policy("foo", "cli", Mode::Disable)])
        .unwrap();
    assert_eq!(names(&sources), ["foo/file", "foo/cli", "foo/api"]);
}

#[test]
fn api_objects_of_the_same_second_are_ordered_by_name_then_namespace() {
    let mut sources = PolicySources::new("istio-system");
    let second = Some(1_796_025_600);
    sources
        .set_api(vec![
            from_api("b", "same", Mode::Strict, second),
            from_api("a", "zz", Mode::Strict, second),
            from_api("a", "same", Mode::Strict, second),
        ])
        .unwrap();
    assert_eq!(names(&sources), ["a/same", "b/same", "a/zz"]);
}

#[test]
fn applied_overrides_the_api_which_overrides_a_file_and_sources_are_named() {
    let mut sources = PolicySources::new("istio-system");
    let old = Some(now_secs() - 60);
    sources
        .set_files(vec![policy("foo", "a", Mode::Disable)])
        .unwrap();
    sources
        .set_api(vec![from_api("foo", "a", Mode::Strict, old)])
        .unwrap();
    assert_eq!(sources.active().get("foo", "a").unwrap().mode, Mode::Strict);
    let reference = sources.active().get("foo", "a").unwrap().reference();
    assert!(matches!(
        sources.sources()[&reference],
        PolicySource::Api { .. }
    ));
    sources
        .apply(vec![policy("foo", "a", Mode::Permissive)])
        .unwrap();
    assert_eq!(
        sources.active().get("foo", "a").unwrap().mode,
        Mode::Permissive
    );
    assert_eq!(sources.sources()[&reference].to_string(), "cli test.yaml:1");
    // Deleting it locally leaves the API's object in force; it is not the agent's to delete.
    sources.delete("foo", "a").unwrap();
    assert_eq!(sources.active().get("foo", "a").unwrap().mode, Mode::Strict);
    let error = sources.delete("foo", "a").unwrap_err();
    assert_eq!(
        error.to_string(),
        "PeerAuthentication foo/a comes from the Kubernetes API; delete it there \
         (kubectl delete peerauthentication -n foo a)"
    );
    // Gone from the API: gone.
    sources.set_api(Vec::new()).unwrap();
    assert!(sources.active().is_empty());
}

#[test]
fn a_policy_held_by_the_api_and_a_file_takes_the_older_age() {
    let mut sources = PolicySources::new("istio-system");
    sources
        .set_files(vec![
            policy("foo", "shared", Mode::Disable),
            policy("foo", "other", Mode::Permissive),
        ])
        .unwrap();
    // The API's object of the same name is newer than both files; the name keeps the file's
    // age, so it still comes first.
    sources
        .set_api(vec![from_api(
            "foo",
            "shared",
            Mode::Strict,
            Some(now_secs() + 60),
        )])
        .unwrap();
    assert_eq!(names(&sources), ["foo/shared", "foo/other"]);
    assert_eq!(decision(&sources).mode, Mode::Strict);
}

#[test]
fn the_api_objects_are_saved_and_restored_with_their_times() {
    let mut sources = PolicySources::new("istio-system");
    sources
        .set_api(vec![from_api("foo", "api", Mode::Strict, Some(100))])
        .unwrap();
    let saved: SavedSources =
        serde_json::from_str(&serde_json::to_string(&sources.saved()).unwrap()).unwrap();
    let restored = PolicySources::restore(
        "istio-system",
        saved,
        vec![policy("foo", "f", Mode::Disable)],
    )
    .unwrap();
    assert_eq!(names(&restored), ["foo/api", "foo/f"]);
    assert_eq!(decision(&restored).mode, Mode::Strict);

    // What agents saved before the API source: no `api`, ages that are ranks. They keep
    // their order and are older than anything made since.
    let old: SavedSources = serde_json::from_str(
        r#"{"applied": [], "ages": [{"namespace": "foo", "name": "b", "age": 1},
                                    {"namespace": "foo", "name": "a", "age": 0}]}"#,
    )
    .unwrap();
    let mut restored = PolicySources::restore(
        "istio-system",
        old,
        vec![
            policy("foo", "b", Mode::Strict),
            policy("foo", "a", Mode::Disable),
        ],
    )
    .unwrap();
    restored
        .set_api(vec![from_api("foo", "api", Mode::Permissive, Some(100))])
        .unwrap();
    assert_eq!(names(&restored), ["foo/a", "foo/b", "foo/api"]);
}
