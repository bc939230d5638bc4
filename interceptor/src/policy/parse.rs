//! YAML → validated [`PeerAuthentication`] objects, with file and line for every error.
//!
//! Input is bounded before and while it is parsed (see [`super::input`] for files, and
//! [`MAX_DOCUMENTS`], [`MAX_DOCUMENT_BYTES`], [`MAX_DEPTH`], [`MAX_NODES`] here), so any
//! input is refused in well under a second. The YAML parser is serde-saphyr, which
//! enforces the depth and node budgets as it reads and refuses duplicate keys.
//!
//! Each document is deserialized into a strict schema (unknown fields and wrong types,
//! located by the parser, named by their dotted path), then its values are checked
//! (located by [`Document::line_of`]). When the strict reading fails, the document is read
//! again generically, so that each kind of error gets the most precise report: a syntax
//! error, limit or duplicate key anywhere comes first, then a wrong `apiVersion` or `kind`
//! (so that, say, a Deployment in the same file is reported as the wrong kind, not as a
//! pile of unknown fields), then the schema error. A valid document is thus parsed once.
//! Messages quote at most [`MAX_QUOTED_CHARS`] of any value.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;

use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_saphyr::budget::BudgetBreach;

use super::input::{self, ReadBudget};
use super::locate::{Document, split_documents};
use super::{API_VERSIONS, KIND, Mode, Origin, PeerAuthentication, PolicyError, PolicyRef};

/// Most documents (`---`-separated, empty ones included) in one file or text.
pub const MAX_DOCUMENTS: usize = 256;

/// Largest single document.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

/// Deepest nesting of mappings and sequences in a document (a policy needs 4; the
/// `managedFields` of `kubectl get -o yaml` output about 10).
pub const MAX_DEPTH: usize = 32;

/// Most YAML nodes (scalars, mappings, sequences) in one document.
pub const MAX_NODES: usize = 8192;

/// Longest piece of a value or key quoted in an error message; longer ones end in `…`.
pub const MAX_QUOTED_CHARS: usize = 60;

/// Most errors reported for one load; the rest are counted.
const MAX_REPORTED_ERRORS: usize = 20;

/// Parses every `PeerAuthentication` of a multi-document YAML text.
///
/// Documents are separated by `---`; empty documents (nothing, comments only, `null`)
/// are skipped; a leading byte order mark is ignored. `file` is only used in [`Origin`]s
/// and error messages. Two objects with the same namespace/name in `text` are an error.
/// All errors of all documents are reported together.
pub fn parse_str(text: &str, file: &str) -> Result<Vec<PeerAuthentication>, PolicyError> {
    let mut errors = Vec::new();
    let policies = if text.len() as u64 > input::MAX_FILE_BYTES {
        errors.push(PolicyError::limit(
            file.to_owned(),
            None,
            format!(
                "{} bytes, more than the {} a policy file may have",
                text.len(),
                input::MAX_FILE_BYTES
            ),
        ));
        Vec::new()
    } else {
        let (policies, text_errors) = parse_documents(text, file);
        errors.extend(text_errors);
        policies
    };
    errors.extend(duplicate_errors(&policies));
    finish(policies, errors)
}

/// Parses files and directories, in the order given. A directory contributes its
/// `*.yaml` and `*.yml` files (symlinks followed, so Kubernetes ConfigMap mounts work),
/// sorted by name, not recursing into subdirectories. The result is in application
/// order: path order, then file order, then document order. Duplicates across all files
/// are errors, and errors of all files are reported together. Files are bounded in
/// number and size before they are read (see [`super::input`]).
pub fn load_paths(paths: &[PathBuf]) -> Result<Vec<PeerAuthentication>, PolicyError> {
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    let mut budget = ReadBudget::default();
    for path in paths {
        let files = match input::yaml_files(path) {
            Ok(files) => files,
            Err(error) => {
                errors.push(error);
                continue;
            }
        };
        for file in files {
            match input::read_text(&file, &mut budget) {
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
    finish(policies, errors)
}

/// The policies, or the errors (at most [`MAX_REPORTED_ERRORS`], then a count).
fn finish(
    policies: Vec<PeerAuthentication>,
    mut errors: Vec<PolicyError>,
) -> Result<Vec<PeerAuthentication>, PolicyError> {
    let mut flat: Vec<PolicyError> = Vec::new();
    for error in errors.drain(..) {
        match error {
            PolicyError::Several(inner) => flat.extend(inner),
            single => flat.push(single),
        }
    }
    if flat.len() > MAX_REPORTED_ERRORS {
        let more = flat.len() - MAX_REPORTED_ERRORS;
        flat.truncate(MAX_REPORTED_ERRORS);
        flat.push(PolicyError::More(more));
    }
    PolicyError::check(flat)?;
    Ok(policies)
}

/// Parses all documents; returns the valid objects and the errors of the others.
fn parse_documents(text: &str, file: &str) -> (Vec<PeerAuthentication>, Vec<PolicyError>) {
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    let documents = split_documents(text);
    if documents.len() > MAX_DOCUMENTS {
        let error = PolicyError::limit(
            file.to_owned(),
            None,
            format!(
                "{} YAML documents, more than the {MAX_DOCUMENTS} a policy file may have; \
                 split it into several files",
                documents.len()
            ),
        );
        return (Vec::new(), vec![error]);
    }
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for document in documents {
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

/// `text` in double quotes, cut to [`MAX_QUOTED_CHARS`] characters with `…` after a cut,
/// control characters escaped.
pub(super) fn quote(text: &str) -> String {
    format!("{:?}", clip(text))
}

/// `text` cut to [`MAX_QUOTED_CHARS`] characters, `…` marking a cut.
pub(super) fn clip(text: &str) -> String {
    match text.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// A value problem of one object: the field's dotted path and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Problem {
    /// Path segments, e.g. `["spec", "mtls", "mode"]`.
    pub path: Vec<String>,
    /// What is wrong and what is expected.
    pub message: String,
    /// For an entry of a mapping: its position there, which locates it better than its
    /// key (the last segment of `path`) when two keys mean the same.
    pub entry: Option<usize>,
}

impl Problem {
    fn new<S: AsRef<str>>(path: &[S], message: impl Into<String>) -> Self {
        Problem {
            path: path
                .iter()
                .map(|segment| segment.as_ref().to_owned())
                .collect(),
            message: message.into(),
            entry: None,
        }
    }

    /// A problem with the `entry`-th entry of a mapping, whose key is `path`'s last segment.
    fn at_entry<S: AsRef<str>>(path: &[S], entry: usize, message: impl Into<String>) -> Self {
        Problem {
            entry: Some(entry),
            ..Problem::new(path, message)
        }
    }

    /// 1-based file line of the problem in `document`.
    fn line_in(&self, document: &Document<'_>) -> usize {
        match (self.entry, self.path.split_last()) {
            (Some(entry), Some((_, map_path))) => document.line_of_entry(map_path, entry),
            _ => document.line_of(&self.path),
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
        "invalid mode {}; expected one of {}{hint}",
        quote(text),
        valid.join(", ")
    )
}

// --- Schema -------------------------------------------------------------------------

/// The top level. `apiVersion` and `kind` are checked after reading; `status` is what
/// `kubectl get -o yaml` prints, and is ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // ignored fields exist only so that serde accepts them
struct RawObject {
    #[serde(rename = "apiVersion")]
    api_version: Option<Scalar>,
    kind: Option<Scalar>,
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
    port_level_mtls: Option<Entries<RawPort, RawMtls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSelector {
    match_labels: Option<Entries<String, String>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMtls {
    /// Kept as text so that an invalid value gets our message, with the valid ones.
    mode: Option<String>,
}

/// A mapping's entries in document order, so that keys which differ as YAML but mean
/// the same (`8080` and `"8080"`, `1` and `"1"`) are seen and refused rather than
/// silently collapsed by a map.
struct Entries<K, V>(Vec<(K, V)>);

impl<'de, K: Deserialize<'de>, V: Deserialize<'de>> Deserialize<'de> for Entries<K, V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(EntriesVisitor(PhantomData))
    }
}

struct EntriesVisitor<K, V>(PhantomData<(K, V)>);

impl<'de, K: Deserialize<'de>, V: Deserialize<'de>> Visitor<'de> for EntriesVisitor<K, V> {
    type Value = Entries<K, V>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a mapping")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Entries(entries))
    }
}

/// A `portLevelMtls` key as written (`8080`, `"8080"`, `08080`); its number is read
/// and range-checked later, with a precise message.
struct RawPort(String);

impl<'de> Deserialize<'de> for RawPort {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // serde-saphyr hands a plain scalar to a string target with its spelling kept.
        String::deserialize(deserializer).map(RawPort)
    }
}

impl RawPort {
    /// The decimal number written, if it is one (leading zeros and `+` allowed).
    fn number(&self) -> Option<i64> {
        let digits = self.0.trim();
        let digits = digits.strip_prefix('+').unwrap_or(digits);
        let unsigned = digits.strip_prefix('-').unwrap_or(digits);
        if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // Too many digits for an i64 is still a number, and out of range.
        Some(digits.parse().unwrap_or(i64::MAX))
    }
}

// --- One document -------------------------------------------------------------------

/// The parser's settings: every budget tight enough for policies, duplicate keys refused.
fn yaml_options() -> serde_saphyr::Options {
    let mut alias_limits = serde_saphyr::options::AliasLimits::default();
    alias_limits.max_total_replayed_events = MAX_NODES;
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
            flow_nesting_limit: MAX_DEPTH,
            max_documents: 1,
            max_nodes: MAX_NODES,
            max_events: 4 * MAX_NODES,
            max_aliases: 64,
            max_anchors: 64,
            max_total_scalar_bytes: MAX_DOCUMENT_BYTES,
        },
        alias_limits: alias_limits,
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        with_snippet: false,
    }
}

/// Runs a serde deserialization of one document, tracking the dotted path of the field
/// being read so that errors can name it.
fn deserialize<T: for<'de> Deserialize<'de>>(
    document: &Document<'_>,
    pass: Pass,
    file: &str,
) -> Result<T, PolicyError> {
    let mut path = Vec::new();
    serde_saphyr::with_deserializer_from_str_with_options(document.text, yaml_options(), |de| {
        serde_path_to_error::deserialize(de).map_err(|error| {
            path = path_segments(error.path());
            error.into_inner()
        })
    })
    .map_err(|error| yaml_error(&error, &path, pass, document, file))
}

fn path_segments(path: &serde_path_to_error::Path) -> Vec<String> {
    use serde_path_to_error::Segment;
    path.iter()
        .map(|segment| match segment {
            Segment::Map { key } => clip(key),
            Segment::Seq { index } => index.to_string(),
            Segment::Enum { variant } => clip(variant),
            Segment::Unknown => "?".to_owned(),
        })
        .collect()
}

/// `Ok(None)` for an empty document.
fn parse_document(
    document: &Document<'_>,
    file: &str,
) -> Result<Option<PeerAuthentication>, PolicyError> {
    if document.text.len() > MAX_DOCUMENT_BYTES {
        return Err(PolicyError::limit(
            file.to_owned(),
            Some(document.start_line()),
            format!(
                "a YAML document of {} bytes, more than the {MAX_DOCUMENT_BYTES} a policy may have",
                document.text.len()
            ),
        ));
    }
    // A well-formed policy is read once. Only when the strict reading fails is the
    // document read generically, so that the most telling error is reported: a syntax
    // error anywhere, an empty document, or the wrong kind rather than its unknown fields.
    let schema_error = match deserialize::<RawObject>(document, Pass::Schema, file) {
        Ok(raw) => {
            check_type(raw.api_version.clone(), raw.kind.clone(), document, file)?;
            return build(raw, document, file).map(Some);
        }
        Err(error) => error,
    };
    let survey: Survey = deserialize(document, Pass::Read, file)?;
    let (api_version, kind) = match survey {
        Survey::Empty => return Ok(None),
        Survey::Other(found) => {
            let problem = Problem::new::<&str>(
                &[],
                format!("expected a PeerAuthentication object (a YAML mapping), found {found}"),
            );
            return Err(located(&problem, document, file));
        }
        Survey::Object { api_version, kind } => (api_version, kind),
    };
    check_type(api_version, kind, document, file)?;
    Err(schema_error)
}

/// Which reading of a document failed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// The generic read: anything but a limit or a duplicate key is a syntax error.
    Read,
    /// The strict schema: errors are about a field.
    Schema,
}

/// Turns a parser error into a located [`PolicyError`].
fn yaml_error(
    error: &serde_saphyr::Error,
    path: &[String],
    pass: Pass,
    document: &Document<'_>,
    file: &str,
) -> PolicyError {
    use serde_saphyr::Error as E;
    let error = error.without_snippet();
    let location = error.location().filter(|location| location.line() > 0);
    let line = match location {
        Some(location) => document.file_line(location.line() as usize),
        None => document.line_of(path),
    };
    let column = location.map_or(1, |location| location.column() as usize);
    let invalid = |path: Vec<String>, message: String| PolicyError::Invalid {
        origin: Origin {
            file: file.to_owned(),
            line,
        },
        field: field_name(&path),
        message,
    };
    match error {
        E::Budget { breach, .. } => {
            PolicyError::limit(file.to_owned(), Some(line), breach_message(breach))
        }
        E::DuplicateMappingKey { key, .. } => {
            let key = key.as_deref().unwrap_or("?");
            let mut field = path.to_vec();
            // The path tracker adds a placeholder for the key it could not read.
            if field.last().is_some_and(|last| last == "?") {
                field.pop();
            }
            field.push(clip(key));
            invalid(
                field,
                format!("duplicate key {}; each key may appear once", quote(key)),
            )
        }
        E::ExternalMessage { msg, .. } if msg.contains("recursion limit") => PolicyError::limit(
            file.to_owned(),
            Some(line),
            format!("nested deeper than {MAX_DEPTH} levels; a policy needs far fewer"),
        ),
        E::SerdeUnknownField {
            field, expected, ..
        } => {
            let mut path = path.to_vec();
            if path.last() != Some(&clip(field)) {
                path.push(clip(field));
            }
            invalid(
                path,
                format!(
                    "unknown field `{}`, expected one of {}",
                    clip(field),
                    expected.join(", ")
                ),
            )
        }
        E::Unexpected { expected, .. } if pass == Pass::Schema => {
            invalid(path.to_vec(), format!("invalid type: expected {expected}"))
        }
        E::SerdeInvalidType {
            unexpected,
            expected,
            ..
        } => invalid(
            path.to_vec(),
            format!(
                "invalid type: {}, expected {}",
                clip(unexpected),
                clip(expected)
            ),
        ),
        E::SerdeInvalidValue {
            unexpected,
            expected,
            ..
        } => invalid(
            path.to_vec(),
            format!(
                "invalid value: {}, expected {}",
                clip(unexpected),
                clip(expected)
            ),
        ),
        other => {
            let message = parser_message(other);
            match pass {
                Pass::Read => PolicyError::Syntax {
                    file: file.to_owned(),
                    line,
                    column,
                    message,
                },
                Pass::Schema => invalid(path.to_vec(), message),
            }
        }
    }
}

/// The parser's own wording, without position, cut short if it quotes a long value.
fn parser_message(error: &serde_saphyr::Error) -> String {
    use serde_saphyr::MessageFormatter;
    let message = serde_saphyr::DefaultMessageFormatter.format_message(error);
    let message: String = message.escape_debug().collect();
    match message.char_indices().nth(4 * MAX_QUOTED_CHARS) {
        Some((end, _)) => format!("{}…", &message[..end]),
        None => message,
    }
}

fn breach_message(breach: &BudgetBreach) -> String {
    match breach {
        BudgetBreach::Depth { .. } => {
            format!("nested deeper than {MAX_DEPTH} levels; a policy needs far fewer")
        }
        BudgetBreach::Nodes { .. } | BudgetBreach::Events { .. } => {
            format!("more than {MAX_NODES} YAML nodes in one document; a policy needs far fewer")
        }
        BudgetBreach::Aliases { .. } | BudgetBreach::Anchors { .. } => {
            "too many YAML anchors or aliases; write the policy out in full".to_owned()
        }
        BudgetBreach::ScalarBytes { .. } => {
            format!("more than {MAX_DOCUMENT_BYTES} bytes of text in one document")
        }
        BudgetBreach::Documents { .. } => {
            "more than one YAML document where one was expected".to_owned()
        }
        other => format!("the document is beyond what a policy may hold ({other:?})"),
    }
}

/// The root of a document as the first reading sees it.
enum Survey {
    /// Nothing, comments only, or `null`.
    Empty,
    /// A mapping, with its `apiVersion` and `kind` if present.
    Object {
        api_version: Option<Scalar>,
        kind: Option<Scalar>,
    },
    /// Anything else, described (`a sequence`, ...).
    Other(String),
}

impl<'de> Deserialize<'de> for Survey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SurveyVisitor)
    }
}

struct SurveyVisitor;

impl<'de> Visitor<'de> for SurveyVisitor {
    type Value = Survey;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a YAML document")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Survey, E> {
        Ok(Survey::Empty)
    }

    fn visit_none<E: de::Error>(self) -> Result<Survey, E> {
        Ok(Survey::Empty)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Survey, A::Error> {
        let (mut api_version, mut kind) = (None, None);
        while let Some(key) = map.next_key::<Scalar>()? {
            match key {
                Scalar::Text(key) if key == "apiVersion" => api_version = Some(map.next_value()?),
                Scalar::Text(key) if key == "kind" => kind = Some(map.next_value()?),
                _ => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(Survey::Object { api_version, kind })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Survey, A::Error> {
        Skip::visit_all(seq)?;
        Ok(Survey::Other("a sequence".to_owned()))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Survey, E> {
        Ok(Survey::Other(format!("the text {}", quote(value))))
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<Survey, E> {
        Ok(Survey::Other(format!("the value {value}")))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Survey, E> {
        Ok(Survey::Other(format!("the number {value}")))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Survey, E> {
        Ok(Survey::Other(format!("the number {value}")))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Survey, E> {
        Ok(Survey::Other(format!("the number {value}")))
    }
}

/// A key or a type field's value: text, or a description of what else it is.
#[derive(Clone)]
enum Scalar {
    /// A string (or anything written as one).
    Text(String),
    /// Not a string: `null`, `5`, `a sequence`, ...
    Other(String),
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a YAML node")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Scalar, E> {
        Ok(Scalar::Text(value.to_owned()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
        Ok(Scalar::Other("null".to_owned()))
    }

    fn visit_none<E: de::Error>(self) -> Result<Scalar, E> {
        Ok(Scalar::Other("null".to_owned()))
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<Scalar, E> {
        Ok(Scalar::Other(value.to_string()))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Scalar, E> {
        Ok(Scalar::Other(value.to_string()))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Scalar, E> {
        Ok(Scalar::Other(value.to_string()))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Scalar, E> {
        Ok(Scalar::Other(value.to_string()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Scalar, A::Error> {
        Skip::visit_all(seq)?;
        Ok(Scalar::Other("a sequence".to_owned()))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Scalar, A::Error> {
        Skip::visit_entries(map)?;
        Ok(Scalar::Other("a mapping".to_owned()))
    }
}

/// Reads and drops any node, reading keys as text so that an error (a duplicate key
/// deep inside `metadata.annotations`, say) is named by its full path. Recursion is
/// bounded by the parser's depth budget.
struct Skip;

impl Skip {
    fn visit_all<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Skip, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }

    fn visit_entries<'de, A: MapAccess<'de>>(mut map: A) -> Result<Skip, A::Error> {
        while map.next_key::<Scalar>()?.is_some() {
            map.next_value::<Skip>()?;
        }
        Ok(Skip)
    }
}

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SkipVisitor)
    }
}

struct SkipVisitor;

impl<'de> Visitor<'de> for SkipVisitor {
    type Value = Skip;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a YAML node")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_none<E: de::Error>(self) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Skip, D::Error> {
        Skip::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Skip, A::Error> {
        Skip::visit_all(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Skip, A::Error> {
        Skip::visit_entries(map)
    }
}

/// Checks the `apiVersion` and `kind` found by the first reading.
fn check_type(
    api_version: Option<Scalar>,
    kind: Option<Scalar>,
    document: &Document<'_>,
    file: &str,
) -> Result<(), PolicyError> {
    let mut problems = Vec::new();
    let versions = API_VERSIONS.join(" or ");
    match api_version {
        None => problems.push(Problem::new(
            &["apiVersion"],
            format!("is required; expected {versions}"),
        )),
        Some(Scalar::Text(version)) if API_VERSIONS.contains(&version.as_str()) => {}
        Some(found) => problems.push(Problem::new(
            &["apiVersion"],
            format!(
                "unknown apiVersion {}; expected {versions}",
                describe(&found)
            ),
        )),
    }
    match kind {
        None => problems.push(Problem::new(
            &["kind"],
            format!("is required; expected {KIND}"),
        )),
        Some(Scalar::Text(kind)) if kind == KIND => {}
        Some(found) => problems.push(Problem::new(
            &["kind"],
            format!("unknown kind {}; expected {KIND}", describe(&found)),
        )),
    }
    located_all(&problems, document, file)
}

fn describe(found: &Scalar) -> String {
    match found {
        Scalar::Text(text) => quote(text),
        Scalar::Other(description) => description.clone(),
    }
}

fn located(problem: &Problem, document: &Document<'_>, file: &str) -> PolicyError {
    PolicyError::Invalid {
        origin: Origin {
            file: file.to_owned(),
            line: problem.line_in(document),
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
        .map(|problem| (problem.line_in(document), problem))
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
        .is_some_and(|ports| !ports.0.is_empty());
    let mode = parse_mode(spec.mtls, &["spec", "mtls", "mode"], &mut problems);
    let port_level = parse_port_level(spec.port_level_mtls, &mut problems);
    let policy = PeerAuthentication {
        name: metadata.name.unwrap_or_default(),
        namespace: metadata.namespace.unwrap_or_default(),
        selector: parse_labels(
            spec.selector.and_then(|selector| selector.match_labels),
            &mut problems,
        ),
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

/// `matchLabels` as a map; a label given twice (say `1:` and `"1":`) is a problem.
fn parse_labels(
    entries: Option<Entries<String, String>>,
    problems: &mut Vec<Problem>,
) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for (entry, (key, value)) in entries?.0.into_iter().enumerate() {
        if labels.contains_key(&key) {
            problems.push(Problem::at_entry(
                &["spec", "selector", "matchLabels", &clip(&key)],
                entry,
                format!(
                    "label {} is listed twice; each label may appear once",
                    quote(&key)
                ),
            ));
        }
        labels.insert(key, value);
    }
    Some(labels).filter(|labels| !labels.is_empty())
}

/// `portLevelMtls` as a map. A port written twice, in any spelling (`8080`, `"8080"`,
/// `08080`), is a problem: last-wins would let a later entry silently undo an earlier one.
fn parse_port_level(
    entries: Option<Entries<RawPort, RawMtls>>,
    problems: &mut Vec<Problem>,
) -> BTreeMap<u16, Mode> {
    let mut port_level = BTreeMap::new();
    let Some(Entries(entries)) = entries else {
        return port_level;
    };
    if entries.is_empty() {
        // Istio's CRD: `portLevelMtls` has MinProperties=1.
        problems.push(Problem::new(
            &["spec", "portLevelMtls"],
            "must list at least one port when present",
        ));
    }
    let mut spelled: BTreeMap<u16, String> = BTreeMap::new();
    for (entry, (key, mtls)) in entries.into_iter().enumerate() {
        let written = clip(&key.0);
        let mode = parse_mode(
            Some(mtls),
            &["spec", "portLevelMtls", &written, "mode"],
            problems,
        );
        let field = ["spec", "portLevelMtls", written.as_str()];
        let Some(number) = key.number() else {
            problems.push(Problem::new(
                &field,
                format!(
                    "{} is not a port number; expected a workload port in 1..=65535",
                    quote(&key.0)
                ),
            ));
            continue;
        };
        match u16::try_from(number) {
            Ok(port) if port != 0 => {
                if let Some(first) = spelled.get(&port) {
                    problems.push(Problem::at_entry(
                        &field,
                        entry,
                        format!(
                            "port {port} is listed twice (first as {}); each port may have \
                             one mode",
                            quote(first)
                        ),
                    ));
                } else {
                    spelled.insert(port, key.0.clone());
                    port_level.insert(port, mode);
                }
            }
            _ => problems.push(Problem::new(&field, port_range_message(number))),
        }
    }
    port_level
}

#[cfg(test)]
mod tests;
