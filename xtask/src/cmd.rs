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

/// Puts `dir` first on this process's `PATH` (and so on every child's).
pub fn prepend_to_path(dir: &Path) {
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![dir.to_path_buf()];
    dirs.extend(env::split_paths(&path).filter(|p| p != dir));
    if let Ok(joined) = env::join_paths(dirs) {
        // SAFETY: xtask is single-threaded; setup runs before any child or thread exists.
        unsafe { env::set_var("PATH", joined) };
    }
}

/// Cargo's target directory for this workspace (`CARGO_TARGET_DIR` or `<root>/target`).
pub fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
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

/// Test counts summed over every `test result:` line of cargo test output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestCounts {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
}

impl TestCounts {
    /// Adds the counts of one `test result: ok. 3 passed; 1 failed; ...` line, if it is one.
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim_start().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(number)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(number) = number.parse::<u64>() else {
                continue;
            };
            match label {
                "passed" => self.passed += number,
                "failed" => self.failed += number,
                _ => {}
            }
        }
    }
}

/// Like [`run`], echoing stdout line by line and summing the `test result:` lines in it.
pub fn run_counting_tests(cmd: &mut Command) -> (Result<()>, TestCounts) {
    use std::io::{BufRead, BufReader, Write};
    let line = display(cmd);
    let mut counts = TestCounts::default();
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            return (
                Err(anyhow::anyhow!("could not start `{line}`: {e}")),
                counts,
            );
        }
    };
    if let Some(stdout) = child.stdout.take() {
        for text in BufReader::new(stdout).lines().map_while(Result::ok) {
            counts.add_line(&text);
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
        }
    }
    let result = match child.wait() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(anyhow::anyhow!("`{line}` failed ({status})")),
        Err(e) => Err(anyhow::anyhow!("`{line}`: {e}")),
    };
    (result, counts)
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

#[cfg(test)]
mod counting_tests {
    use super::TestCounts;

    #[test]
    fn sums_cargo_test_result_lines() {
        let mut counts = TestCounts::default();
        for line in [
            "test result: ok. 124 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.04s",
            "running 3 tests",
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 5 filtered out; finished in 1.0s",
            "test a_test_named_test_result ... ok",
        ] {
            counts.add_line(line);
        }
        assert_eq!(
            counts,
            TestCounts {
                passed: 126,
                failed: 1
            }
        );
    }
}
