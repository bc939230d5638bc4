//! Small file helpers with errors that name the file.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rustls::pki_types::CertificateDer;

use super::IdentityError;

/// Wraps an I/O error with what was being done and to which file.
pub(crate) fn io_error(
    action: &'static str,
    path: &Path,
) -> impl FnOnce(io::Error) -> IdentityError {
    let path = path.to_owned();
    move |cause| IdentityError::Io {
        action,
        path,
        cause,
    }
}

/// Reads a whole file as UTF-8 text.
pub(crate) fn read_text(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(io_error("reading", path))
}

/// Reads every `CERTIFICATE` PEM block of a file; there must be at least one.
pub(crate) fn read_pem_certificates(
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let text = read_text(path)?;
    let certs = rustls_pemfile::certs(&mut text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::InvalidFile {
            path: path.to_owned(),
            reason: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::InvalidFile {
            path: path.to_owned(),
            reason: "no CERTIFICATE PEM block".into(),
        });
    }
    Ok(certs)
}

/// Creates `path` with the given permission bits and writes `contents`,
/// failing with [`io::ErrorKind::AlreadyExists`] if the file exists (even as a
/// dangling symlink), so nothing is ever overwritten.
pub(crate) fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}
