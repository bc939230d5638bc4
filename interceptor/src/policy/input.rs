//! Reading policy files with bounds: sizes are checked before anything is read, so a huge,
//! growing or special file is refused at once instead of being loaded into memory.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use super::PolicyError;

/// Largest policy file accepted. A PeerAuthentication is a few hundred bytes; even
/// `kubectl get -o yaml` output of hundreds of them fits easily.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Most YAML files one load may read (files given plus files of directories given).
pub const MAX_FILES: usize = 256;

/// Most bytes one load may read over all its files.
pub const MAX_TOTAL_BYTES: u64 = 2 * 1024 * 1024;

/// What one load is still allowed to read.
pub(super) struct ReadBudget {
    files: usize,
    bytes: u64,
}

impl Default for ReadBudget {
    fn default() -> Self {
        ReadBudget {
            files: MAX_FILES,
            bytes: MAX_TOTAL_BYTES,
        }
    }
}

/// `path` itself if it is not a directory, else its `*.yaml` and `*.yml` files sorted by
/// name, without recursing. Symlinks are followed, so Kubernetes ConfigMap mounts (files
/// that are symlinks into `..data/`) work.
pub(super) fn yaml_files(path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
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
        if is_yaml && fs::metadata(&file).is_ok_and(|metadata| metadata.is_file()) {
            files.push(file);
            if files.len() > MAX_FILES {
                return Err(PolicyError::limit(
                    path.display().to_string(),
                    None,
                    format!("more than {MAX_FILES} policy files; keep policies in fewer files"),
                ));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Reads one file as policy text: a regular file within the size limits, UTF-8, with an
/// optional byte order mark removed.
pub(super) fn read_text(path: &Path, budget: &mut ReadBudget) -> Result<String, PolicyError> {
    let name = path.display().to_string();
    let io_error = |source| PolicyError::Io {
        path: name.clone(),
        source,
    };
    if budget.files == 0 {
        return Err(PolicyError::limit(
            name,
            None,
            format!("more than {MAX_FILES} policy files in one load; keep policies in fewer files"),
        ));
    }
    budget.files -= 1;
    let metadata = fs::metadata(path).map_err(io_error)?;
    if !metadata.is_file() {
        return Err(PolicyError::limit(
            name,
            None,
            "not a regular file; give policy files or directories of them",
        ));
    }
    check_size(&name, metadata.len(), budget)?;
    // Opening a FIFO would block, so the check above comes first; the read is bounded
    // too, in case the file grows after the check.
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    File::open(path)
        .and_then(|file| file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(io_error)?;
    check_size(&name, bytes.len() as u64, budget)?;
    budget.bytes -= bytes.len() as u64;
    decode(bytes, &name)
}

fn check_size(name: &str, size: u64, budget: &ReadBudget) -> Result<(), PolicyError> {
    if size > MAX_FILE_BYTES {
        return Err(PolicyError::limit(
            name.to_owned(),
            None,
            format!(
                "{size} bytes, more than the {MAX_FILE_BYTES} a policy file may have; \
                 split it or remove what is not a PeerAuthentication"
            ),
        ));
    }
    if size > budget.bytes {
        return Err(PolicyError::limit(
            name.to_owned(),
            None,
            format!(
                "policy files of one load exceed {MAX_TOTAL_BYTES} bytes together; \
                 load fewer or smaller files"
            ),
        ));
    }
    Ok(())
}

/// UTF-8 text without a leading byte order mark; invalid bytes are a syntax error at
/// their line and column.
pub(super) fn decode(mut bytes: Vec<u8>, file: &str) -> Result<String, PolicyError> {
    const BOM: &[u8] = "\u{FEFF}".as_bytes();
    if bytes.starts_with(BOM) {
        bytes.drain(..BOM.len());
    }
    String::from_utf8(bytes).map_err(|error| {
        let valid = &error.as_bytes()[..error.utf8_error().valid_up_to()];
        let line_start = valid
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |at| at + 1);
        PolicyError::Syntax {
            file: file.to_owned(),
            line: valid.iter().filter(|&&b| b == b'\n').count() + 1,
            column: String::from_utf8_lossy(&valid[line_start..])
                .chars()
                .count()
                + 1,
            message: format!(
                "not UTF-8 text (byte 0x{:02x}); policy files are YAML text",
                error.as_bytes()[valid.len()]
            ),
        }
    })
}
