use super::*;
use std::fs;

/// The walkthrough file from Istio's documentation, byte for byte.
const WALKTHROUGH: &str = "\
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system # <-- Applying on Istio Namespaces means that all namespaces will follow this policy
spec:
  mtls:
    mode: STRICT
";

fn examples_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies"))
}

fn parse_err(text: &str) -> PolicyError {
    parse_str(text, "bad.yaml").expect_err("should be rejected")
}

/// The single `Invalid` error of `text`: (line, field, message).
fn invalid(text: &str) -> (usize, String, String) {
    match parse_err(text) {
        PolicyError::Invalid {
            origin,
            field,
            message,
        } => {
            assert_eq!(origin.file, "bad.yaml");
            (origin.line, field, message)
        }
        other => panic!("expected one Invalid error, got: {other}"),
    }
}

/// Asserts that the rendered message names file, line and field.
fn assert_names(error: &PolicyError, line: usize, field: &str) {
    let text = error.to_string();
    assert!(
        text.starts_with(&format!("bad.yaml:{line}: field `{field}`: ")),
        "unexpected message: {text}"
    );
}

fn object(spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: p\n  namespace: ns\n{spec}"
    )
}

// --- Accepted input -------------------------------------------------------------------

#[test]
fn walkthrough_file_parses_as_is() {
    let policies = parse_str(WALKTHROUGH, "mesh.yaml").unwrap();
    assert_eq!(
        policies,
        vec![PeerAuthentication {
            name: "default".into(),
            namespace: "istio-system".into(),
            selector: None,
            mode: Mode::Strict,
            port_level: BTreeMap::new(),
            origin: Origin {
                file: "mesh.yaml".into(),
                line: 1,
            },
        }]
    );
}

#[test]
fn accepts_v1_and_v1beta1() {
    for version in API_VERSIONS {
        let text = WALKTHROUGH.replace("security.istio.io/v1beta1", version);
        let policies = parse_str(&text, "f.yaml").unwrap();
        assert_eq!(policies[0].mode, Mode::Strict, "{version}");
    }
}

#[test]
fn multiple_documents_and_empty_documents() {
    let text = format!(
        "# leading comment\n---\n{WALKTHROUGH}---\n---\n# nothing here\n---\n~\n---\n{}\n---\n",
        object("spec:\n  mtls:\n    mode: DISABLE").replace("name: p", "name: second")
    );
    let policies = parse_str(&text, "multi.yaml").unwrap();
    let summary: Vec<(&str, Mode, usize)> = policies
        .iter()
        .map(|policy| (policy.name.as_str(), policy.mode, policy.origin.line))
        .collect();
    assert_eq!(
        summary,
        vec![("default", Mode::Strict, 3), ("second", Mode::Disable, 17)]
    );
}

#[test]
fn accepts_and_ignores_usual_kubernetes_metadata_and_status() {
    let text = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: foo
  labels:
    app.kubernetes.io/managed-by: helm
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {\"apiVersion\":\"security.istio.io/v1\"}
  uid: 3f1c2a9e-0000-4000-8000-000000000000
  resourceVersion: \"12345\"
  generation: 2
  creationTimestamp: \"2024-01-01T00:00:00Z\"
  managedFields:
  - manager: kubectl
    operation: Update
  finalizers: []
spec:
  mtls:
    mode: STRICT
status: {}
";
    let policies = parse_str(text, "f.yaml").unwrap();
    assert_eq!(policies[0].reference().to_string(), "foo/default");
    assert_eq!(policies[0].mode, Mode::Strict);
}

#[test]
fn missing_spec_mtls_or_mode_is_unset() {
    for spec in [
        "",
        "spec: {}\n",
        "spec:\n  mtls: {}\n",
        "spec:\n  mtls:\n    mode:\n",
    ] {
        let policies = parse_str(&object(spec), "f.yaml").unwrap();
        assert_eq!(policies[0].mode, Mode::Unset, "spec {spec:?}");
    }
}

#[test]
fn empty_selector_counts_as_no_selector() {
    for spec in [
        "spec:\n  selector: {}\n",
        "spec:\n  selector:\n    matchLabels: {}\n",
    ] {
        let policies = parse_str(&object(spec), "f.yaml").unwrap();
        assert_eq!(policies[0].selector, None, "spec {spec:?}");
    }
}

#[test]
fn workload_policy_with_ports_plain_and_quoted() {
    let spec = "\
spec:
  selector:
    matchLabels:
      app: web
      version: v1
  mtls:
    mode: STRICT
  portLevelMtls:
    8080:
      mode: DISABLE
    \"9090\":
      mode: UNSET
";
    let policy = parse_str(&object(spec), "f.yaml").unwrap().remove(0);
    let labels: BTreeMap<String, String> = [("app", "web"), ("version", "v1")]
        .into_iter()
        .map(|(key, value)| (key.into(), value.into()))
        .collect();
    assert_eq!(policy.selector, Some(labels));
    assert_eq!(
        policy.port_level,
        BTreeMap::from([(8080, Mode::Disable), (9090, Mode::Unset)])
    );
}

#[test]
fn crlf_line_endings() {
    let text = format!("---\r\n{}", WALKTHROUGH.replace('\n', "\r\n"));
    let policies = parse_str(&text, "f.yaml").unwrap();
    assert_eq!(policies[0].origin.line, 2);
    let bad = text.replace("STRICT", "STRICTT");
    assert_eq!(invalid(&bad).0, 9);
}

#[test]
fn every_example_file_loads() {
    let policies = load_paths(&[examples_dir()]).unwrap();
    let names: Vec<String> = policies
        .iter()
        .map(|policy| policy.reference().to_string())
        .collect();
    // Sorted by file name.
    assert_eq!(
        names,
        [
            "istio-system/mesh-permissive",
            "istio-system/default",
            "foo/default",
            "vehicles/position-tracker"
        ]
    );
    let tracker = &policies[3];
    assert_eq!(tracker.mode, Mode::Strict);
    assert_eq!(
        tracker.port_level,
        BTreeMap::from([(8081, Mode::Permissive)])
    );
    assert_eq!(
        tracker.selector.as_ref().unwrap()["app"],
        "position-tracker"
    );
    assert!(
        tracker
            .origin
            .file
            .ends_with("workload-port-exception.yaml")
    );
}

#[test]
fn mesh_strict_example_is_the_walkthrough_file() {
    let text = fs::read_to_string(examples_dir().join("mesh-strict.yaml")).unwrap();
    assert_eq!(text, WALKTHROUGH);
    let policies = load_paths(&[examples_dir().join("mesh-strict.yaml")]).unwrap();
    assert!(policies[0].origin.file.ends_with("mesh-strict.yaml"));
}

// --- Rejected input -------------------------------------------------------------------

#[test]
fn yaml_syntax_error_has_file_line_and_column() {
    let text = format!("{WALKTHROUGH}---\napiVersion: security.istio.io/v1\nkind: [oops\n");
    match parse_err(&text) {
        PolicyError::Syntax {
            file,
            line,
            column,
            message,
        } => {
            assert_eq!(file, "bad.yaml");
            assert_eq!(line, 11, "the line of the unclosed flow sequence");
            assert!(column >= 1);
            assert!(!message.contains("line"), "position given twice: {message}");
        }
        other => panic!("expected a syntax error, got {other}"),
    }
    let text = "apiVersion: v\n  kind: x\n bad: indentation\n";
    let error = parse_err(text);
    assert!(
        matches!(error, PolicyError::Syntax { line: 2, .. }),
        "{error}"
    );
    assert!(error.to_string().starts_with("bad.yaml:2:"), "{error}");
}

#[test]
fn syntax_error_masking_is_avoided() {
    // A typed parse alone would report the unknown field before reaching the bad YAML.
    let error = parse_err("a: 1\nb: [\n");
    assert!(matches!(error, PolicyError::Syntax { .. }), "{error}");
}

#[test]
fn unknown_api_version() {
    let text = format!(
        "{WALKTHROUGH}---\n# second\napiVersion: networking.istio.io/v1\nkind: PeerAuthentication\n"
    );
    let (line, field, message) = invalid(&text);
    assert_eq!((line, field.as_str()), (11, "apiVersion"));
    assert!(message.contains("\"networking.istio.io/v1\""), "{message}");
    assert!(message.contains("security.istio.io/v1 or security.istio.io/v1beta1"));
}

#[test]
fn unknown_kind() {
    let text = WALKTHROUGH.replace("kind: PeerAuthentication", "kind: AuthorizationPolicy");
    let error = parse_err(&text);
    assert_names(&error, 2, "kind");
    assert!(error.to_string().contains("expected PeerAuthentication"));
}

#[test]
fn missing_api_version_and_kind_are_both_reported() {
    let error = parse_err("metadata:\n  name: x\n");
    let fields: Vec<String> = error
        .errors()
        .iter()
        .map(|error| match error {
            PolicyError::Invalid { field, .. } => field.clone(),
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(fields, ["apiVersion", "kind"]);
}

#[test]
fn unknown_fields_name_their_path_and_line() {
    let cases = [
        ("spec:\n  mtlss:\n    mode: STRICT\n", 7, "spec.mtlss"),
        ("spec:\n  mtls:\n    modee: STRICT\n", 8, "spec.mtls.modee"),
        (
            "spec:\n  selector:\n    matchLabel:\n      app: x\n",
            8,
            "spec.selector.matchLabel",
        ),
        (
            "spec:\n  selector:\n    matchLabels: {app: x}\n  portLevelMtls:\n    8080:\n      mode: STRICT\n      tls: true\n",
            12,
            "spec.portLevelMtls.8080.tls",
        ),
        ("sepc:\n  mtls: {}\n", 6, "sepc"),
    ];
    for (spec, line, field) in cases {
        let error = parse_err(&object(spec));
        assert_names(&error, line, field);
        assert!(error.to_string().contains("unknown field"), "{error}");
    }
}

#[test]
fn unknown_metadata_field_is_refused() {
    let text = WALKTHROUGH.replace("  namespace:", "  namespce:");
    let error = parse_err(&text);
    assert_names(&error, 5, "metadata.namespce");
}

#[test]
fn invalid_mode_lists_valid_modes() {
    let (line, field, message) = invalid(&WALKTHROUGH.replace("STRICT", "STRICTT"));
    assert_eq!((line, field.as_str()), (8, "spec.mtls.mode"));
    assert_eq!(
        message,
        "invalid mode \"STRICTT\"; expected one of UNSET, DISABLE, PERMISSIVE, STRICT"
    );
    let error = parse_err(&WALKTHROUGH.replace("STRICT", "strict"));
    assert_names(&error, 8, "spec.mtls.mode");
    assert!(error.to_string().contains("(modes are upper case)"));
}

#[test]
fn invalid_mode_in_flow_style_points_at_the_flow_line() {
    let text = object("spec:\n  mtls: {mode: STRICTT}\n");
    assert_eq!(invalid(&text).0, 7);
}

#[test]
fn wrong_value_type_is_located() {
    let text = object("spec:\n  mtls:\n    mode: [STRICT]\n");
    let (line, field, message) = invalid(&text);
    assert_eq!((line, field.as_str()), (8, "spec.mtls.mode"));
    assert!(message.contains("invalid type"), "{message}");
}

#[test]
fn invalid_port_level_mode() {
    let spec = "spec:\n  selector:\n    matchLabels:\n      app: x\n  portLevelMtls:\n    8081:\n      mode: OPEN\n";
    let error = parse_err(&object(spec));
    assert_names(&error, 12, "spec.portLevelMtls.8081.mode");
    assert!(error.to_string().contains("\"OPEN\""));
}

#[test]
fn port_level_without_selector_is_refused() {
    let spec =
        "spec:\n  mtls:\n    mode: STRICT\n  portLevelMtls:\n    8080:\n      mode: DISABLE\n";
    let error = parse_err(&object(spec));
    assert_names(&error, 9, "spec.portLevelMtls");
    assert!(error.to_string().contains("requires a selector"));
}

#[test]
fn ports_out_of_range_are_refused() {
    for (port, field) in [
        ("0", "spec.portLevelMtls.0"),
        ("65536", "spec.portLevelMtls.65536"),
        ("-1", "spec.portLevelMtls.-1"),
        ("\"0\"", "spec.portLevelMtls.0"),
    ] {
        let spec = format!(
            "spec:\n  selector:\n    matchLabels:\n      app: x\n  portLevelMtls:\n    443:\n      mode: STRICT\n    {port}:\n      mode: DISABLE\n"
        );
        let error = parse_err(&object(&spec));
        assert_names(&error, 13, field);
        assert!(error.to_string().contains("out of range"), "{error}");
        assert!(error.to_string().contains("1..=65535"), "{error}");
    }
}

#[test]
fn non_numeric_port_is_refused() {
    let spec = "spec:\n  selector:\n    matchLabels:\n      app: x\n  portLevelMtls:\n    http:\n      mode: DISABLE\n";
    let error = parse_err(&object(spec));
    assert_names(&error, 11, "spec.portLevelMtls.http");
    assert!(error.to_string().contains("not a port number"), "{error}");
}

#[test]
fn empty_port_level_map_is_refused() {
    let spec = "spec:\n  selector:\n    matchLabels:\n      app: x\n  portLevelMtls: {}\n";
    assert_names(&parse_err(&object(spec)), 10, "spec.portLevelMtls");
}

#[test]
fn missing_name() {
    let error = parse_err(&WALKTHROUGH.replace("  name: default\n", ""));
    assert_names(&error, 3, "metadata.name");
}

#[test]
fn missing_namespace_says_it_is_required() {
    let error = parse_err(&WALKTHROUGH.replace("  namespace: istio-system", "  labels: {}"));
    assert_names(&error, 3, "metadata.namespace");
    assert!(
        error.to_string().contains("namespace is required"),
        "{error}"
    );
}

#[test]
fn missing_metadata_points_at_the_object() {
    let text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n";
    let error = parse_err(text);
    let fields: Vec<String> = error.errors().iter().map(ToString::to_string).collect();
    assert_eq!(
        fields.len(),
        2,
        "name and namespace are both reported: {fields:?}"
    );
    assert!(fields[0].starts_with("bad.yaml:1: field `metadata.name`"));
    assert!(fields[1].starts_with("bad.yaml:1: field `metadata.namespace`"));
}

#[test]
fn duplicate_in_one_file_names_both_locations() {
    let text = format!("{WALKTHROUGH}---\n{WALKTHROUGH}");
    match parse_err(&text) {
        PolicyError::Duplicate {
            policy,
            first,
            second,
        } => {
            assert_eq!(policy.to_string(), "istio-system/default");
            assert_eq!((first.line, second.line), (1, 10));
        }
        other => panic!("expected a duplicate, got {other}"),
    }
    let message = parse_err(&text).to_string();
    assert_eq!(
        message,
        "bad.yaml:10: field `metadata.name`: duplicate PeerAuthentication \
         istio-system/default; first defined at bad.yaml:1"
    );
}

#[test]
fn not_a_mapping_is_refused() {
    let error = parse_err("- a\n- b\n");
    assert!(
        error
            .to_string()
            .starts_with("bad.yaml:1: field `<document>`"),
        "{error}"
    );
}

#[test]
fn errors_of_all_documents_are_collected_in_file_order() {
    let text = format!(
        "{}---\n{}---\n{WALKTHROUGH}",
        WALKTHROUGH.replace("STRICT", "BAD"),
        WALKTHROUGH.replace("kind: PeerAuthentication", "kind: Nope")
    );
    let error = parse_err(&text);
    let lines: Vec<String> = error.errors().iter().map(ToString::to_string).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("bad.yaml:8: field `spec.mtls.mode`"));
    assert!(lines[1].starts_with("bad.yaml:11: field `kind`"));
    assert_eq!(error.to_string(), lines.join("\n"));
}

#[test]
fn several_problems_in_one_object_are_all_reported() {
    let text = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: p
spec:
  mtls:
    mode: NOPE
  portLevelMtls:
    0:
      mode: STRICT
";
    let error = parse_err(text);
    let fields = error.invalid_fields();
    assert_eq!(
        fields,
        [
            "metadata.namespace",
            "spec.mtls.mode",
            "spec.portLevelMtls",
            "spec.portLevelMtls.0"
        ]
    );
}

// --- Files ----------------------------------------------------------------------------

/// A scratch directory, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("interceptor-policy-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        ScratchDir(path)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn named(name: &str) -> String {
    WALKTHROUGH.replace("name: default", &format!("name: {name}"))
}

#[test]
fn directory_yields_yaml_files_sorted_by_name_without_recursion() {
    let dir = ScratchDir::new("sorted");
    dir.write("b.yml", &named("b"));
    dir.write("a.yaml", &named("a"));
    dir.write("c.yaml.bak", &named("ignored-extension"));
    dir.write("notes.txt", "not yaml");
    fs::create_dir(dir.0.join("sub.yaml")).unwrap();
    fs::write(dir.0.join("sub.yaml/d.yaml"), named("nested")).unwrap();
    let extra = ScratchDir::new("sorted-extra");
    let explicit = extra.write("explicit.txt", &named("explicit"));

    let policies = load_paths(&[dir.0.clone(), explicit]).unwrap();
    let names: Vec<&str> = policies.iter().map(|policy| policy.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "explicit"]);
}

#[test]
fn duplicates_across_files_name_both_files() {
    let dir = ScratchDir::new("dups");
    let first = dir.write("1.yaml", WALKTHROUGH);
    let second = dir.write("2.yaml", &format!("# header\n{WALKTHROUGH}"));
    let error = load_paths(std::slice::from_ref(&dir.0)).unwrap_err();
    let text = error.to_string();
    assert!(
        text.starts_with(&format!("{}:2: field `metadata.name`", second.display())),
        "{text}"
    );
    assert!(
        text.ends_with(&format!("first defined at {}:1", first.display())),
        "{text}"
    );
}

#[test]
fn load_paths_collects_errors_of_all_files() {
    let dir = ScratchDir::new("errors");
    dir.write("1.yaml", &WALKTHROUGH.replace("STRICT", "X"));
    dir.write("2.yaml", "kind: [\n");
    let missing = dir.0.join("missing.yaml");
    let error = load_paths(&[dir.0.clone(), missing]).unwrap_err();
    let kinds: Vec<&str> = error
        .errors()
        .iter()
        .map(|error| match error {
            PolicyError::Invalid { .. } => "invalid",
            PolicyError::Syntax { .. } => "syntax",
            PolicyError::Io { .. } => "io",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["invalid", "syntax", "io"]);
}

#[test]
fn load_paths_reports_unreadable_files() {
    let error = load_paths(&[PathBuf::from("/nonexistent/policy.yaml")]).unwrap_err();
    assert!(matches!(error, PolicyError::Io { .. }));
    assert!(
        error
            .to_string()
            .starts_with("/nonexistent/policy.yaml: cannot read")
    );
}

// --- Duplicates, BOM, long values -----------------------------------------------------

const WORKLOAD: &str = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: p
  namespace: ns
spec:
  selector:
    matchLabels:
      app: x
  portLevelMtls:
    \"8080\":
      mode: STRICT
";

#[test]
fn a_port_given_twice_in_any_spelling_is_refused() {
    for (second, line) in [
        ("8080: {mode: DISABLE}", 13),
        ("08080: {mode: DISABLE}", 13),
        ("+8080: {mode: DISABLE}", 13),
        (
            "9090: {mode: DISABLE}\n    '8080':\n      mode: DISABLE",
            14,
        ),
    ] {
        let text = format!("{WORKLOAD}    {second}\n");
        let error = parse_err(&text);
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("bad.yaml:{line}: field `spec.portLevelMtls.")),
            "{second}: {message}"
        );
        assert!(
            message.contains("port 8080 is listed twice (first as \"8080\")")
                || message.contains("duplicate key \"8080\""),
            "{second}: {message}"
        );
    }
}

#[test]
fn duplicate_keys_anywhere_are_refused_with_their_line() {
    let cases = [
        (
            WORKLOAD.replace("  name: p\n", "  name: p\n  name: q\n"),
            5,
            "metadata.name",
        ),
        (
            WORKLOAD.replace(
                "metadata:\n",
                "metadata:\n  annotations:\n    a: 1\n    a: 2\n",
            ),
            6,
            "metadata.annotations.a",
        ),
        (format!("{WORKLOAD}kind: PeerAuthentication\n"), 13, "kind"),
        (
            WORKLOAD.replace(
                "      mode: STRICT\n",
                "      mode: STRICT\n      mode: DISABLE\n",
            ),
            13,
            "spec.portLevelMtls.8080.mode",
        ),
        (
            WORKLOAD.replace("      app: x\n", "      app: x\n      \"app\": y\n"),
            10,
            "spec.selector.matchLabels.app",
        ),
        (
            WORKLOAD.replace("      app: x\n", "      1: x\n      \"1\": y\n"),
            10,
            "spec.selector.matchLabels.1",
        ),
    ];
    for (text, line, field) in cases {
        let error = parse_err(&text);
        assert_names(&error, line, field);
        assert!(error.to_string().contains("twice") || error.to_string().contains("duplicate"));
    }
}

#[test]
fn a_byte_order_mark_is_accepted() {
    let text = format!("\u{FEFF}{WALKTHROUGH}---\n{}", named("second"));
    let policies = parse_str(&text, "bom.yaml").unwrap();
    assert_eq!(policies.len(), 2);
    assert_eq!(policies[0].origin.line, 1);
    let dir = ScratchDir::new("bom");
    let mut bytes = "\u{FEFF}".as_bytes().to_vec();
    bytes.extend(WALKTHROUGH.as_bytes());
    fs::write(dir.0.join("bom.yaml"), bytes).unwrap();
    assert_eq!(load_paths(std::slice::from_ref(&dir.0)).unwrap().len(), 1);
}

#[test]
fn errors_quote_only_a_short_prefix_of_a_long_value() {
    let long = "S".repeat(40_000);
    for text in [
        WALKTHROUGH.replace("STRICT", &long),
        WALKTHROUGH.replace("kind: PeerAuthentication", &format!("kind: {long}")),
        WALKTHROUGH.replace("  mtls:", &format!("  {long}: 1\n  mtls:")),
        WALKTHROUGH.replace("  mtls:", &format!("  ? {long}\n  : 1\n  mtls:")),
        WORKLOAD.replace("\"8080\"", &format!("\"{long}\"")),
    ] {
        let message = parse_err(&text).to_string();
        assert!(
            message.len() < 400,
            "{} bytes: {}",
            message.len(),
            &message[..400]
        );
        assert!(message.starts_with("bad.yaml:"), "{message}");
    }
    let message = parse_err(&WALKTHROUGH.replace("STRICT", &long)).to_string();
    assert!(
        message.contains(&format!("\"{}…\"", "S".repeat(MAX_QUOTED_CHARS))),
        "{message}"
    );
}

// --- Hostile input --------------------------------------------------------------------

/// Inputs an attacker with write access to the policy directory might drop there.
fn hostile_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let text = |s: String| s.into_bytes();
    let mut block_deep = String::new();
    for depth in 0..300 {
        block_deep.push_str(&" ".repeat(depth));
        block_deep.push_str("a:\n");
    }
    let mut wide =
        String::from("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nstatus:\n");
    for key in 0..6_000 {
        wide.push_str(&format!("  k{key}: [1]\n"));
    }
    let laughs = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nstatus:\n  a: &a [x,x,x,x,x,x,x,x,x,x]\n  b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n  c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n  d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n  e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n  f: [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\n";
    let mut pseudo_random = Vec::with_capacity(200_000);
    let mut state: u32 = 0x9e37_79b9;
    for _ in 0..200_000 {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        pseudo_random.push(state as u8);
    }
    // As many documents as allowed, each with an error: the report is cut short.
    let bad_documents: String = (0..MAX_DOCUMENTS - 1)
        .map(|n| WALKTHROUGH.replace("STRICT", &format!("BAD{n}")) + "---\n")
        .collect();
    vec![
        (
            "nested flow sequences, 160 KB",
            text(format!("a: {}{}", "[".repeat(80_000), "]".repeat(80_000))),
        ),
        (
            "nested flow sequences, 60 KB",
            text(format!("a: {}{}", "[".repeat(30_000), "]".repeat(30_000))),
        ),
        (
            "nested flow mappings, 1 MB",
            text(format!("{}{}", "{a: ".repeat(200_000), "}".repeat(200_000))),
        ),
        ("40k documents", text("a: 1\n---\n".repeat(40_000))),
        ("deep block mappings", text(block_deep)),
        (
            "deep block sequences",
            text(format!("{}x\n", "- ".repeat(20_000))),
        ),
        (
            "a document over the size limit",
            text(format!("a: {}\n", "x".repeat(100_000))),
        ),
        ("too many nodes", text(wide)),
        ("alias expansion", text(laughs.to_owned())),
        ("binary", pseudo_random),
        ("NUL bytes", text(format!("{WALKTHROUGH}\0\0\0"))),
        (
            "a key 60k characters long",
            text(format!("{}: 1\n", "k".repeat(60_000))),
        ),
        (
            "unclosed quote",
            text(format!("{WALKTHROUGH}x: \"{}", "q".repeat(50_000))),
        ),
        (
            "tabs and directives",
            text("%YAML 9.9\n---\n\ta:\t[\n".to_owned()),
        ),
        ("tags", text(WALKTHROUGH.replace("STRICT", "!!binary AAAA"))),
        ("every document bad", text(bad_documents)),
        (
            "duplicate ports",
            text(format!(
                "{WORKLOAD}    8080: {{mode: DISABLE}}\n    08080: {{mode: DISABLE}}\n"
            )),
        ),
    ]
}

/// Every hostile input is refused with a short message naming the file, within a second
/// (on a loaded two-core machine), through both entry points: text and files.
#[test]
fn hostile_inputs_are_refused_quickly_and_clearly() {
    let dir = ScratchDir::new("hostile");
    for (index, (name, bytes)) in hostile_inputs().into_iter().enumerate() {
        let path = dir.0.join(format!("{index}.yaml"));
        fs::write(&path, &bytes).unwrap();
        let started = std::time::Instant::now();
        let from_file = load_paths(std::slice::from_ref(&path));
        let file_time = started.elapsed();
        let started = std::time::Instant::now();
        let from_text = String::from_utf8(bytes).map(|text| parse_str(&text, "hostile.yaml"));
        let text_time = started.elapsed();
        println!("{name:<35} file {file_time:>12.3?}  text {text_time:>12.3?}");
        let error = from_file.expect_err(name).to_string();
        assert!(
            error.contains(&path.display().to_string()),
            "{name}: {error}"
        );
        assert!(
            error.len() < 8 * 1024,
            "{name}: {} bytes of errors",
            error.len()
        );
        assert!(
            file_time.as_millis() < 1000,
            "{name}: refused after {file_time:?}"
        );
        if let Ok(from_text) = from_text {
            let error = from_text.expect_err(name).to_string();
            assert!(error.starts_with("hostile.yaml:"), "{name}: {error}");
            assert!(
                text_time.as_millis() < 1000,
                "{name}: refused after {text_time:?}"
            );
        }
    }
}

#[test]
fn file_size_and_count_limits_are_checked_before_reading() {
    let dir = ScratchDir::new("huge");
    // Sparse: 50 MB that would take a long time (and memory) to read and parse.
    let huge = fs::File::create(dir.0.join("huge.yaml")).unwrap();
    huge.set_len(50 * 1024 * 1024).unwrap();
    let started = std::time::Instant::now();
    let error = load_paths(std::slice::from_ref(&dir.0)).unwrap_err();
    assert!(
        started.elapsed().as_millis() < 100,
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(&error, PolicyError::Limit { file, line: None, .. } if file.ends_with("huge.yaml")),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("52428800 bytes, more than the 1048576"),
        "{error}"
    );

    let many = ScratchDir::new("many");
    for n in 0..=input::MAX_FILES {
        many.write(&format!("{n:04}.yaml"), "");
    }
    let error = load_paths(std::slice::from_ref(&many.0)).unwrap_err();
    assert!(
        error.to_string().contains("more than 256 policy files"),
        "{error}"
    );

    let total = ScratchDir::new("total");
    let filler = format!("# {}\n", "x".repeat(1000));
    let almost_a_megabyte = filler.repeat(1000);
    for n in 0..5 {
        total.write(&format!("{n}.yaml"), &almost_a_megabyte);
    }
    let error = load_paths(std::slice::from_ref(&total.0)).unwrap_err();
    assert!(
        error.to_string().contains("exceed 2097152 bytes together"),
        "{error}"
    );
}

#[test]
fn a_long_report_is_cut_with_a_count() {
    let text: String = (0..30)
        .map(|n| {
            WALKTHROUGH
                .replace("STRICT", "BAD")
                .replace("default", &format!("p{n}"))
                + "---\n"
        })
        .collect();
    let error = parse_err(&text);
    assert_eq!(error.errors().len(), 21);
    assert!(
        error
            .to_string()
            .ends_with("... and 10 more errors; fix the ones above first")
    );
}

/// The slowest refusal: a load at its byte limit of dense, valid policies, with the one
/// error in the last document, must be parsed whole, and still names that error. (How long
/// it takes is printed, not asserted: timings belong to benchmarks, not to tests that a
/// busy machine would make flaky.)
#[test]
fn a_full_load_with_an_error_at_the_end_is_parsed_whole_and_refused() {
    let dir = ScratchDir::new("dense");
    let annotations: String = (0..40)
        .map(|key| format!("    key-{key}: [{}]\n", vec!["v"; 20].join(",")))
        .collect();
    let files = 4;
    let mut written = 0;
    for file in 0..files {
        let mut text = String::new();
        for n in 0.. {
            let document = format!(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  \
                 name: p{n}\n  namespace: ns{file}\n  annotations:\n{annotations}spec:\n  \
                 mtls:\n    mode: STRICT\n---\n"
            );
            if text.len() + document.len() > input::MAX_TOTAL_BYTES as usize / files - 64 {
                break;
            }
            text.push_str(&document);
        }
        if file == files - 1 {
            text.push_str(&WALKTHROUGH.replace("STRICT", "BROKEN"));
        }
        written += text.len();
        dir.write(&format!("{file}.yaml"), &text);
    }
    assert!(
        written > input::MAX_TOTAL_BYTES as usize * 9 / 10,
        "{written}"
    );
    let started = std::time::Instant::now();
    let error = load_paths(std::slice::from_ref(&dir.0)).unwrap_err();
    let elapsed = started.elapsed();
    println!("{written} bytes of policies refused in {elapsed:?}");
    assert!(
        error.to_string().contains("invalid mode \"BROKEN\""),
        "{error}"
    );
}
