//! Text-level helpers for precise error lines: splitting a multi-document YAML file into
//! its documents, and finding the line of a (block-style) key path inside a document.
//!
//! The parser reports positions for syntax and schema errors but not for values that
//! are only found wrong afterwards (a bad mode, a port out of range, a port given twice),
//! so those are located by reading the text. Splitting is done here too, so that each
//! document is parsed on its own: an error in one does not hide the errors of the others,
//! and each document's size is checked before it is parsed.

/// One YAML document of a file: a contiguous run of whole lines.
#[derive(Debug)]
pub(super) struct Document<'a> {
    /// The document text, including its `---` marker line if it has one.
    pub text: &'a str,
    /// 0-based index, in the file, of the first line of `text`.
    pub first_line: usize,
}

/// How one line takes part in the document structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineKind {
    /// `---`, optionally followed by a space and more.
    DocumentStart,
    /// `...`, optionally followed by a space and more.
    DocumentEnd,
    /// `%YAML` / `%TAG`: belongs to the document that follows.
    Directive,
    /// Empty or comment-only.
    Blank,
    /// Anything else.
    Content,
}

fn classify(line: &str) -> LineKind {
    let line = line.trim_end_matches(['\n', '\r']);
    if is_marker(line, "---") {
        LineKind::DocumentStart
    } else if is_marker(line, "...") {
        LineKind::DocumentEnd
    } else if line.starts_with('%') {
        LineKind::Directive
    } else if is_blank_or_comment(line) {
        LineKind::Blank
    } else {
        LineKind::Content
    }
}

/// Markers only count at column 0 and followed by whitespace or the end of the line.
fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

fn is_blank_or_comment(line: &str) -> bool {
    let trimmed = line.trim();
    trimmed.is_empty() || trimmed.starts_with('#')
}

/// Splits `text` at document markers. Comments and directives before a `---` stay with
/// the document that `---` opens; documents may be empty (the caller skips those).
pub(super) fn split_documents(text: &str) -> Vec<Document<'_>> {
    let mut documents = Vec::new();
    let mut start_byte = 0;
    let mut start_line = 0;
    // Whether the current document already has a marker or content, so that the
    // next `---` opens a new one.
    let mut has_body = false;
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        match classify(line) {
            LineKind::DocumentStart => {
                if has_body {
                    documents.push(Document {
                        text: &text[start_byte..offset],
                        first_line: start_line,
                    });
                    start_byte = offset;
                    start_line = index;
                }
                has_body = true;
            }
            LineKind::DocumentEnd => {
                documents.push(Document {
                    text: &text[start_byte..offset + line.len()],
                    first_line: start_line,
                });
                start_byte = offset + line.len();
                start_line = index + 1;
                has_body = false;
            }
            LineKind::Content => has_body = true,
            LineKind::Directive | LineKind::Blank => {}
        }
        offset += line.len();
    }
    if start_byte < text.len() {
        documents.push(Document {
            text: &text[start_byte..],
            first_line: start_line,
        });
    }
    documents
}

impl Document<'_> {
    /// Converts a 1-based line within the document into a 1-based line of the file.
    pub fn file_line(&self, line_in_document: usize) -> usize {
        self.first_line + line_in_document
    }

    /// 1-based file line where the object starts: its first content line.
    pub fn start_line(&self) -> usize {
        let lines: Vec<&str> = self.text.lines().collect();
        let first_content = lines
            .iter()
            .position(|line| classify(line) == LineKind::Content)
            .or_else(|| {
                lines
                    .iter()
                    .position(|line| classify(line) == LineKind::DocumentStart)
            })
            .unwrap_or(0);
        self.file_line(first_content + 1)
    }

    /// 1-based file line of the deepest key of `path` that can be found in block style
    /// (`spec:` / `  mtls:` / `    mode:`); the object's start line if not even the
    /// first key is found. Flow style (`mtls: {mode: X}`) thus yields the line of
    /// `mtls`, which is the right line for one-line flow mappings.
    pub fn line_of<S: AsRef<str>>(&self, path: &[S]) -> usize {
        let lines: Vec<&str> = self.text.lines().collect();
        let mut found = None;
        let mut from = 0;
        let mut parent_indent = None;
        for key in path {
            match find_key(&lines, from, parent_indent, key.as_ref()) {
                Some((index, indent)) => {
                    found = Some(index);
                    from = index + 1;
                    parent_indent = Some(indent);
                }
                None => break,
            }
        }
        match found {
            Some(index) => self.file_line(index + 1),
            None => self.start_line(),
        }
    }
}

impl Document<'_> {
    /// 1-based file line of the `index`-th entry (0-based, in document order) of the
    /// block mapping at `map_path`; the line of `map_path` itself when the mapping is
    /// written in flow style or has fewer entries. Used for entries whose keys differ as
    /// text but mean the same (`8080` and `"8080"`), which [`Document::line_of`] cannot
    /// tell apart.
    pub fn line_of_entry<S: AsRef<str>>(&self, map_path: &[S], index: usize) -> usize {
        let lines: Vec<&str> = self.text.lines().collect();
        let mut from = 0;
        let mut parent_indent = None;
        for key in map_path {
            match find_key(&lines, from, parent_indent, key.as_ref()) {
                Some((line, indent)) => {
                    from = line + 1;
                    parent_indent = Some(indent);
                }
                None => return self.line_of(map_path),
            }
        }
        let mut entry_indent = None;
        let mut seen = 0;
        for (line, text) in lines.iter().enumerate().skip(from) {
            if classify(text) != LineKind::Content {
                continue;
            }
            let indent = text.len() - text.trim_start_matches(' ').len();
            if parent_indent.is_some_and(|parent| indent <= parent) {
                break;
            }
            let entry_indent = *entry_indent.get_or_insert(indent);
            if indent < entry_indent {
                break;
            }
            if indent == entry_indent {
                if seen == index {
                    return self.file_line(line + 1);
                }
                seen += 1;
            }
        }
        self.line_of(map_path)
    }
}

/// Finds `key` among the entries of the block mapping that starts at line `from` and is
/// indented deeper than `parent_indent`. Returns its line index and indentation.
fn find_key(
    lines: &[&str],
    from: usize,
    parent_indent: Option<usize>,
    key: &str,
) -> Option<(usize, usize)> {
    let mut entry_indent = None;
    for (index, line) in lines.iter().enumerate().skip(from) {
        if classify(line) != LineKind::Content {
            continue;
        }
        let indent = line.len() - line.trim_start_matches(' ').len();
        if parent_indent.is_some_and(|parent| indent <= parent) {
            return None; // the parent's block has ended
        }
        let entry_indent = *entry_indent.get_or_insert(indent);
        if indent < entry_indent {
            return None;
        }
        if indent == entry_indent && key_matches(&line[indent..], key) {
            return Some((index, indent));
        }
    }
    None
}

/// Whether a line (without indentation) is the mapping entry `key:`, plain or quoted.
fn key_matches(line: &str, key: &str) -> bool {
    let after_key = line
        .strip_prefix(key)
        .or_else(|| strip_quoted(line, key, '"'))
        .or_else(|| strip_quoted(line, key, '\''));
    after_key
        .map(|rest| rest.trim_start_matches([' ', '\t']))
        .and_then(|rest| rest.strip_prefix(':'))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

fn strip_quoted<'a>(line: &'a str, key: &str, quote: char) -> Option<&'a str> {
    line.strip_prefix(quote)?
        .strip_prefix(key)?
        .strip_prefix(quote)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(input: &str) -> Vec<(usize, &str)> {
        split_documents(input)
            .into_iter()
            .map(|document| (document.first_line, document.text))
            .collect()
    }

    #[test]
    fn single_document_without_marker() {
        assert_eq!(texts("a: 1\nb: 2\n"), vec![(0, "a: 1\nb: 2\n")]);
    }

    #[test]
    fn splits_at_markers_and_keeps_leading_comments_with_first_document() {
        let input = "# header\n---\na: 1\n---\n---\n# only a comment\n---\nb: 2";
        assert_eq!(
            texts(input),
            vec![
                (0, "# header\n---\na: 1\n"),
                (3, "---\n"),
                (4, "---\n# only a comment\n"),
                (6, "---\nb: 2"),
            ]
        );
    }

    #[test]
    fn document_end_marker_closes_a_document() {
        let input = "a: 1\n...\nb: 2\n";
        assert_eq!(texts(input), vec![(0, "a: 1\n...\n"), (2, "b: 2\n")]);
    }

    #[test]
    fn marker_like_text_inside_a_line_is_not_a_marker() {
        let input = "a: ---\nb: '--- x'\n----: 1\n";
        assert_eq!(texts(input).len(), 1);
    }

    #[test]
    fn directives_stay_with_the_following_document() {
        let input = "a: 1\n...\n%YAML 1.2\n---\nb: 2\n";
        assert_eq!(
            texts(input),
            vec![(0, "a: 1\n...\n"), (2, "%YAML 1.2\n---\nb: 2\n")]
        );
    }

    const OBJECT: &str = "\
---
# comment
apiVersion: v
metadata:
  name: a
  labels:
    mode: not-this-one
spec:
  selector:
    matchLabels:
      \"app\": x
  mtls:

    # comment
    mode: STRICT
  portLevelMtls:
    '8080':
      mode: DISABLE
    9090: {mode: STRICT}
";

    fn document() -> Document<'static> {
        Document {
            text: OBJECT,
            first_line: 10,
        }
    }

    #[test]
    fn start_line_is_first_content_line() {
        assert_eq!(document().start_line(), 13);
    }

    #[test]
    fn finds_nested_block_keys() {
        let document = document();
        assert_eq!(document.line_of(&["spec", "mtls", "mode"]), 25);
        assert_eq!(
            document.line_of(&["spec", "selector", "matchLabels", "app"]),
            21
        );
        assert_eq!(
            document.line_of(&["spec", "portLevelMtls", "8080", "mode"]),
            28
        );
        assert_eq!(document.line_of(&["metadata", "name"]), 15);
    }

    #[test]
    fn does_not_match_a_key_of_another_block() {
        // `mode` under metadata.labels must not be taken for spec.mtls.mode.
        assert_eq!(document().line_of(&["metadata", "mode"]), 14);
    }

    #[test]
    fn falls_back_to_deepest_found_key_or_object_start() {
        let document = document();
        // Flow mapping: the port's own line.
        assert_eq!(
            document.line_of(&["spec", "portLevelMtls", "9090", "mode"]),
            29
        );
        assert_eq!(document.line_of(&["spec", "nothing"]), 18);
        assert_eq!(document.line_of(&["nothing"]), 13);
    }

    #[test]
    fn finds_the_nth_entry_of_a_block_mapping() {
        let document = document();
        assert_eq!(document.line_of_entry(&["spec", "portLevelMtls"], 0), 27);
        assert_eq!(document.line_of_entry(&["spec", "portLevelMtls"], 1), 29);
        // Past the end, or a path not found: the mapping's (or nearest key's) line.
        assert_eq!(document.line_of_entry(&["spec", "portLevelMtls"], 2), 26);
        assert_eq!(document.line_of_entry(&["spec", "nothing"], 0), 18);
    }

    #[test]
    fn key_matching_requires_colon_and_separator() {
        assert!(key_matches("mode: STRICT", "mode"));
        assert!(key_matches("mode:", "mode"));
        assert!(key_matches("\"8080\" : x", "8080"));
        assert!(!key_matches("modes: x", "mode"));
        assert!(!key_matches("80800: x", "8080"));
        assert!(!key_matches("mode:x", "mode"));
    }
}
