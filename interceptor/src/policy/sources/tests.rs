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
