//! Small helpers around `std::process::Command` shared by the xtask commands.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Puts `$HOME/.cargo/bin` on this process's `PATH` (and so on every child's), because
/// `cargo install` puts bpf-linker there and aya-build looks it up on `PATH`.
pub fn ensure_cargo_bin_on_path() {
    let Some(home) = env::var_os("HOME") else {
        return;
    };
    let cargo_bin = Path::new(&home).join(".cargo/bin");
    let path = env::var_os("PATH").unwrap_or_default();
    if env::split_paths(&path).any(|p| p == cargo_bin) {
        return;
    }
    let mut dirs = vec![cargo_bin];
    dirs.extend(env::split_paths(&path));
    if let Ok(joined) = env::join_paths(dirs) {
        // SAFETY: called first thing in `main`, before any other thread exists.
        unsafe { env::set_var("PATH", joined) };
    }
}

/// The workspace root (the parent of the xtask crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// A `cargo` command run from the workspace root.
pub fn cargo<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let mut cmd = Command::new("cargo");
    cmd.args(args.into_iter().map(Into::into))
        .current_dir(repo_root());
    cmd
}

/// The command line of `cmd`, for messages.
pub fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` with its output streamed to ours (stdin closed); fails on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("could not start `{line}` (is it installed and on PATH?)"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails (with its stderr) on a non-zero exit.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{line}` (is it installed and on PATH?)"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The first executable file named `name` in a `PATH` directory.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|dir| dir.join(name)).find(|p| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}
