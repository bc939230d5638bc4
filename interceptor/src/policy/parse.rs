//! YAML → validated [`PeerAuthentication`] objects, with file and line for every error.
//!
//! Each document goes through three steps, so that each kind of error gets the most
//! precise report: (1) parse as generic YAML (syntax errors, with line and column);
//! (2) check `apiVersion` and `kind` (so that, say, a Deployment in the same file is
//! reported as the wrong kind, not as a pile of unknown fields); (3) deserialize into
//! a strict schema (unknown fields, wrong types, located by serde_yaml) and check the
//! values (located by [`Document::line_of`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use serde::de::{self, IgnoredAny, Visitor};
use serde::{Deserialize, Deserializer};
use serde_yaml::Value;

use super::locate::{Document, split_documents};
use super::{API_VERSIONS, KIND, Mode, Origin, PeerAuthentication, PolicyError, PolicyRef};

/// Parses every `PeerAuthentication` of a multi-document YAML text.
///
/// Documents are separated by `---`; empty documents (nothing, comments only, `null`)
/// are skipped. `file` is only used in [`Origin`]s and error messages. Two objects with
/// the same namespace/name in `text` are an error. All errors of all documents are
/// reported together.
pub fn parse_str(text: &str, file: &str) -> Result<Vec<PeerAuthentication>, PolicyError> {
    let (policies, mut errors) = parse_documents(text, file);
    errors.extend(duplicate_errors(&policies));
    PolicyError::check(errors)?;
    Ok(policies)
}

/// Reads and parses one file; see [`parse_str`].
pub fn parse_file(path: &Path) -> Result<Vec<PeerAuthentication>, PolicyError> {
    let file = path.display().to_string();
    let text = read_text(path)?;
    parse_str(&text, &file)
}

/// Parses files and directories, in the order given. A directory contributes its
/// `*.yaml` and `*.yml` files (symlinks followed, so Kubernetes ConfigMap mounts work),
/// sorted by name, not recursing into subdirectories. The result is in application
/// order: path order, then file order, then document order. Duplicates across all files
/// are errors, and errors of all files are reported together.
pub fn load_paths(paths: &[PathBuf]) -> Result<Vec<PeerAuthentication>, PolicyError> {
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        let files = match yaml_files(path) {
            Ok(files) => files,
            Err(error) => {
                errors.push(error);
                continue;
            }
        };
        for file in files {
            match read_text(&file) {
                Ok(text) => {
                    let (parsed, file_errors) = parse_documents(&text, &file.display().to_string());
                    policies.extend(parsed);
                    errors.extend(file_errors);
                }
                Err(error) => errors.push(error),
            }
        }
    }
    errors.extend(duplicate_errors(&policies));
    PolicyError::check(errors)?;
    Ok(policies)
}

/// `path` itself if it is not a directory, else its YAML files sorted by name.
fn yaml_files(path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let io_error = |source| PolicyError::Io {
        path: path.display().to_string(),
        source,
    };
    if !fs::metadata(path).map_err(io_error)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(io_error)? {
        let file = entry.map_err(io_error)?.path();
        let is_yaml = file
            .extension()
            .is_some_and(|extension| extension == "yaml" || extension == "yml");
        // fs::metadata follows symlinks: ConfigMap files are symlinks into `..data/`.
        if is_yaml && fs::metadata(&file).is_ok_and(|metadata| metadata.is_file()) {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

fn read_text(path: &Path) -> Result<String, PolicyError> {
    fs::read_to_string(path).map_err(|source| PolicyError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Parses all documents; returns the valid objects and the errors of the others.
fn parse_documents(text: &str, file: &str) -> (Vec<PeerAuthentication>, Vec<PolicyError>) {
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for document in split_documents(text) {
        match parse_document(&document, file) {
            Ok(Some(policy)) => policies.push(policy),
            Ok(None) => {}
            Err(error) => errors.push(error),
        }
    }
    (policies, errors)
}

/// One error per object that shares namespace/name with an earlier one of `policies`.
pub(super) fn duplicate_errors(policies: &[PeerAuthentication]) -> Vec<PolicyError> {
    let mut first_seen: HashMap<PolicyRef, &Origin> = HashMap::new();
    let mut errors = Vec::new();
    for policy in policies {
        let reference = policy.reference();
        match first_seen.get(&reference) {
            Some(first) => errors.push(PolicyError::Duplicate {
                policy: reference,
                first: (*first).clone(),
                second: policy.origin.clone(),
            }),
            None => {
                first_seen.insert(reference, &policy.origin);
            }
        }
    }
    errors
}

/// A value problem of one object: the field's dotted path and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Problem {
    /// Path segments, e.g. `["spec", "mtls", "mode"]`.
    pub path: Vec<String>,
    /// What is wrong and what is expected.
    pub message: String,
}

impl Problem {
    fn new<S: AsRef<str>>(path: &[S], message: impl Into<String>) -> Self {
        Problem {
            path: path
                .iter()
                .map(|segment| segment.as_ref().to_owned())
                .collect(),
            message: message.into(),
        }
    }

    /// The dotted field name used in messages.
    pub fn field(&self) -> String {
        field_name(&self.path)
    }
}

fn field_name(path: &[String]) -> String {
    if path.is_empty() {
        "<document>".to_owned()
    } else {
        path.join(".")
    }
}

/// Problems that can be seen on a [`PeerAuthentication`] itself, whoever built it.
pub(super) fn object_problems(policy: &PeerAuthentication) -> Vec<Problem> {
    let mut problems = Vec::new();
    if policy.name.is_empty() {
        problems.push(Problem::new(
            &["metadata", "name"],
            "is required: every PeerAuthentication needs a name",
        ));
    }
    if policy.namespace.is_empty() {
        problems.push(Problem::new(
            &["metadata", "namespace"],
            "namespace is required: policies are read from files, there is no kubectl \
             context to default it from",
        ));
    }
    for key in policy.selector.iter().flat_map(BTreeMap::keys) {
        if key.is_empty() {
            problems.push(Problem::new(
                &["spec", "selector", "matchLabels"],
                "label keys must not be empty",
            ));
        }
    }
    if !policy.port_level.is_empty() && policy.match_labels().is_none() {
        problems.push(port_level_without_selector());
    }
    for port in policy.port_level.keys() {
        if *port == 0 {
            problems.push(Problem::new(
                &["spec", "portLevelMtls", "0"],
                port_range_message(0),
            ));
        }
    }
    problems
}

fn port_level_without_selector() -> Problem {
    Problem::new(
        &["spec", "portLevelMtls"],
        "portLevelMtls requires a selector: port-level modes are only allowed in a \
         workload policy with non-empty spec.selector.matchLabels",
    )
}

fn port_range_message(port: i64) -> String {
    format!("port {port} is out of range; expected a workload port in 1..=65535")
}

fn mode_problem(text: &str) -> String {
    let valid: Vec<&str> = Mode::ALL.iter().map(|mode| mode.as_str()).collect();
    let hint = if Mode::from_name(&text.to_ascii_uppercase()).is_some() {
        " (modes are upper case)"
    } else {
        ""
    };
    format!(
        "invalid mode {text:?}; expected one of {}{hint}",
        valid.join(", ")
    )
}

// --- Schema -------------------------------------------------------------------------

/// The top level. `apiVersion` and `kind` were checked already; `status` is what
/// `kubectl get -o yaml` prints, and is ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // ignored fields exist only so that serde accepts them
struct RawObject {
    #[serde(rename = "apiVersion")]
    api_version: Option<IgnoredAny>,
    kind: Option<IgnoredAny>,
    metadata: Option<RawMetadata>,
    spec: Option<RawSpec>,
    status: Option<IgnoredAny>,
}

/// Kubernetes ObjectMeta: name and namespace are used, the rest accepted and ignored.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)] // ignored fields exist only so that serde accepts them
struct RawMetadata {
    name: Option<String>,
    namespace: Option<String>,
    generate_name: Option<IgnoredAny>,
    labels: Option<IgnoredAny>,
    annotations: Option<IgnoredAny>,
    uid: Option<IgnoredAny>,
    resource_version: Option<IgnoredAny>,
    generation: Option<IgnoredAny>,
    creation_timestamp: Option<IgnoredAny>,
    deletion_timestamp: Option<IgnoredAny>,
    deletion_grace_period_seconds: Option<IgnoredAny>,
    owner_references: Option<IgnoredAny>,
    finalizers: Option<IgnoredAny>,
    managed_fields: Option<IgnoredAny>,
    self_link: Option<IgnoredAny>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSpec {
    selector: Option<RawSelector>,
    mtls: Option<RawMtls>,
    port_level_mtls: Option<BTreeMap<RawPort, RawMtls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSelector {
    match_labels: Option<BTreeMap<String, String>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMtls {
    /// Kept as text so that an invalid value gets our message, with the valid ones.
    mode: Option<String>,
}

/// A `portLevelMtls` key: any integer (range-checked later, with a precise message),
/// written plain (`8080:`) or quoted (`"8080":`, as in JSON).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct RawPort(i64);

impl<'de> Deserialize<'de> for RawPort {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawPortVisitor)
    }
}

struct RawPortVisitor;

impl Visitor<'_> for RawPortVisitor {
    type Value = RawPort;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a port number")
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<RawPort, E> {
        Ok(RawPort(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<RawPort, E> {
        Ok(RawPort(i64::try_from(value).unwrap_or(i64::MAX)))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<RawPort, E> {
        value
            .trim()
            .parse()
            .map(RawPort)
            .map_err(|_| E::invalid_value(de::Unexpected::Str(value), &self))
    }
}

// --- One document -------------------------------------------------------------------

/// `Ok(None)` for an empty document.
fn parse_document(
    document: &Document<'_>,
    file: &str,
) -> Result<Option<PeerAuthentication>, PolicyError> {
    let value: Value = serde_yaml::from_str(document.text)
        .map_err(|error| syntax_error(&error, document, file))?;
    if value.is_null() {
        return Ok(None);
    }
    check_type(&value, document, file)?;
    let raw: RawObject = serde_yaml::from_str(document.text)
        .map_err(|error| schema_error(&error, document, file))?;
    build(raw, document, file).map(Some)
}

fn syntax_error(error: &serde_yaml::Error, document: &Document<'_>, file: &str) -> PolicyError {
    let (line, column) = match error.location() {
        Some(location) => (document.file_line(location.line()), location.column()),
        None => (document.start_line(), 1),
    };
    PolicyError::Syntax {
        file: file.to_owned(),
        line,
        column,
        message: strip_position(&error.to_string(), document.first_line),
    }
}

/// Checks that the document is a mapping with a known `apiVersion` and `kind`.
fn check_type(value: &Value, document: &Document<'_>, file: &str) -> Result<(), PolicyError> {
    let Value::Mapping(object) = value else {
        let problem =
            Problem::new::<&str>(&[], "expected a PeerAuthentication object (a YAML mapping)");
        return Err(located(&problem, document, file));
    };
    let text_of = |key: &str| object.get(key).map(|value| value.as_str().ok_or(value));
    let mut problems = Vec::new();
    let versions = API_VERSIONS.join(" or ");
    match text_of("apiVersion") {
        None => problems.push(Problem::new(
            &["apiVersion"],
            format!("is required; expected {versions}"),
        )),
        Some(Ok(version)) if API_VERSIONS.contains(&version) => {}
        Some(found) => problems.push(Problem::new(
            &["apiVersion"],
            format!(
                "unknown apiVersion {}; expected {versions}",
                describe(found)
            ),
        )),
    }
    match text_of("kind") {
        None => problems.push(Problem::new(
            &["kind"],
            format!("is required; expected {KIND}"),
        )),
        Some(Ok(KIND)) => {}
        Some(found) => problems.push(Problem::new(
            &["kind"],
            format!("unknown kind {}; expected {KIND}", describe(found)),
        )),
    }
    located_all(&problems, document, file)
}

fn describe(found: Result<&str, &Value>) -> String {
    match found {
        Ok(text) => format!("{text:?}"),
        Err(value) => serde_yaml::to_string(value)
            .map(|text| text.trim_end().to_owned())
            .unwrap_or_else(|_| "(not a string)".to_owned()),
    }
}

/// Turns a serde_yaml schema error ("spec.mtls: unknown field `x`, expected `mode` at
/// line 7 column 5") into an error naming the field.
fn schema_error(error: &serde_yaml::Error, document: &Document<'_>, file: &str) -> PolicyError {
    let full = error.to_string();
    let message = strip_position(&full, document.first_line);
    let (mut path, detail) = split_serde_path(&message);
    if let Some(name) = unknown_field_name(detail) {
        path.push(name.to_owned());
    }
    // Without "at line" in its text, serde_yaml's location is only the document start.
    let line = match error.location() {
        Some(location) if full.contains(" at line ") => document.file_line(location.line()),
        _ => document.line_of(&path),
    };
    PolicyError::Invalid {
        origin: Origin {
            file: file.to_owned(),
            line,
        },
        field: field_name(&path),
        message: detail.to_owned(),
    }
}

/// Removes serde_yaml's leading " at line L column C" (the error is reported with the
/// file line up front) and shifts any later position ("while parsing a mapping at line
/// 3 column 1") from document lines to file lines by adding `line_offset`.
fn strip_position(message: &str, line_offset: usize) -> String {
    const AT_LINE: &str = " at line ";
    let mut result = String::with_capacity(message.len());
    let mut rest = message;
    let mut first = true;
    while let Some(start) = rest.find(AT_LINE) {
        result.push_str(&rest[..start]);
        let after = &rest[start + AT_LINE.len()..];
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let Ok(line) = after[..digits].parse::<usize>() else {
            result.push_str(AT_LINE);
            rest = after;
            continue;
        };
        if !first {
            result.push_str(&format!("{AT_LINE}{}", line + line_offset));
        }
        rest = &after[digits..];
        if let Some(column) = rest.strip_prefix(" column ") {
            let digits = column.len()
                - column
                    .trim_start_matches(|c: char| c.is_ascii_digit())
                    .len();
            if !first {
                result.push_str(&format!(" column {}", &column[..digits]));
            }
            rest = &column[digits..];
        }
        first = false;
    }
    result.push_str(rest);
    result
}

/// serde_yaml prefixes nested errors with the dotted path: "spec.mtls: unknown ...".
fn split_serde_path(message: &str) -> (Vec<String>, &str) {
    match message.split_once(": ") {
        Some((head, detail))
            if !head.is_empty() && !head.contains(char::is_whitespace) && !head.contains('`') =>
        {
            (head.split('.').map(str::to_owned).collect(), detail)
        }
        _ => (Vec::new(), message),
    }
}

fn unknown_field_name(detail: &str) -> Option<&str> {
    detail
        .strip_prefix("unknown field `")?
        .split_once('`')
        .map(|(name, _)| name)
}

fn located(problem: &Problem, document: &Document<'_>, file: &str) -> PolicyError {
    PolicyError::Invalid {
        origin: Origin {
            file: file.to_owned(),
            line: document.line_of(&problem.path),
        },
        field: problem.field(),
        message: problem.message.clone(),
    }
}

/// All problems as errors, in line order, each reported once.
fn located_all(
    problems: &[Problem],
    document: &Document<'_>,
    file: &str,
) -> Result<(), PolicyError> {
    let mut placed: Vec<(usize, &Problem)> = problems
        .iter()
        .map(|problem| (document.line_of(&problem.path), problem))
        .collect();
    placed.sort_by(|a, b| (a.0, &a.1.path).cmp(&(b.0, &b.1.path)));
    placed.dedup();
    let errors = placed
        .into_iter()
        .map(|(line, problem)| PolicyError::Invalid {
            origin: Origin {
                file: file.to_owned(),
                line,
            },
            field: problem.field(),
            message: problem.message.clone(),
        })
        .collect();
    PolicyError::check(errors)
}

/// Builds the object from the schema, checking every value.
fn build(
    raw: RawObject,
    document: &Document<'_>,
    file: &str,
) -> Result<PeerAuthentication, PolicyError> {
    let metadata = raw.metadata.unwrap_or_default();
    let spec = raw.spec.unwrap_or_default();
    let mut problems = Vec::new();
    let has_ports = spec
        .port_level_mtls
        .as_ref()
        .is_some_and(|ports| !ports.is_empty());
    let mode = parse_mode(spec.mtls, &["spec", "mtls", "mode"], &mut problems);
    let port_level = parse_port_level(spec.port_level_mtls, &mut problems);
    let policy = PeerAuthentication {
        name: metadata.name.unwrap_or_default(),
        namespace: metadata.namespace.unwrap_or_default(),
        selector: spec
            .selector
            .and_then(|selector| selector.match_labels)
            .filter(|labels| !labels.is_empty()),
        mode,
        port_level,
        origin: Origin {
            file: file.to_owned(),
            line: document.start_line(),
        },
    };
    // Checked on the entries as written: out-of-range ports are not in `port_level`.
    if has_ports && policy.match_labels().is_none() {
        problems.push(port_level_without_selector());
    }
    problems.extend(object_problems(&policy));
    located_all(&problems, document, file)?;
    Ok(policy)
}

/// A missing `mtls` or `mode` is UNSET, as in Istio.
fn parse_mode(mtls: Option<RawMtls>, path: &[&str], problems: &mut Vec<Problem>) -> Mode {
    match mtls.and_then(|mtls| mtls.mode) {
        None => Mode::Unset,
        Some(text) => Mode::from_name(&text).unwrap_or_else(|| {
            problems.push(Problem::new(path, mode_problem(&text)));
            Mode::Unset
        }),
    }
}

fn parse_port_level(
    entries: Option<BTreeMap<RawPort, RawMtls>>,
    problems: &mut Vec<Problem>,
) -> BTreeMap<u16, Mode> {
    let mut port_level = BTreeMap::new();
    let Some(entries) = entries else {
        return port_level;
    };
    if entries.is_empty() {
        // Istio's CRD: `portLevelMtls` has MinProperties=1.
        problems.push(Problem::new(
            &["spec", "portLevelMtls"],
            "must list at least one port when present",
        ));
    }
    for (RawPort(number), mtls) in entries {
        let key = number.to_string();
        let mode = parse_mode(
            Some(mtls),
            &["spec", "portLevelMtls", &key, "mode"],
            problems,
        );
        match u16::try_from(number) {
            Ok(port) if port != 0 => {
                port_level.insert(port, mode);
            }
            _ => problems.push(Problem::new(
                &["spec", "portLevelMtls", &key],
                port_range_message(number),
            )),
        }
    }
    port_level
}

#[cfg(test)]
mod tests;
