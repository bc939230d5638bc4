//! `cargo xtask build | test | demo | bench | soak`: setup, then cargo with output streamed.

use std::process::Command;
use std::time::Instant;

use anyhow::{Result, bail};

use crate::{cmd, setup};

/// The eBPF crate: it only builds for `bpfel-unknown-none` (interceptor's build.rs does that),
/// so host-target cargo commands over the whole workspace leave it out.
const EBPF_PACKAGE: &str = "interceptor-ebpf";

/// `cargo xtask build`: setup, then a release build of the agent (which builds the eBPF crate).
pub fn build() -> Result<()> {
    setup::setup()?;
    step("build", &mut build_cmd())
}

/// `cargo xtask test`: setup, build, tests, then clippy and rustfmt; see `--help`.
pub fn test(test_args: &[String]) -> Result<()> {
    setup::setup()?;
    let outcome = |result: &Result<()>| if result.is_ok() { "ok" } else { "FAILED" };
    let mut results: Vec<(&str, &str)> = Vec::new();

    let built = step("build", &mut build_cmd());
    results.push(("build", outcome(&built)));
    let mut counts = cmd::TestCounts::default();
    if built.is_ok() {
        let mut command = test_cmd(test_args);
        println!("xtask: tests: {}", cmd::display(&command));
        let (tested, summed) = cmd::run_counting_tests(&mut command);
        counts = summed;
        match &tested {
            Ok(()) => println!("xtask: tests: ok"),
            Err(err) => eprintln!("xtask: tests: FAILED: {err:#}"),
        }
        results.push(("tests", outcome(&tested)));
    } else {
        println!("xtask: tests: skipped, the build failed");
        results.push(("tests", "skipped (build failed)"));
    }
    // A filter runs some tests only; the fuzz smoke belongs to the whole run.
    if test_args.is_empty() {
        let fuzzed = crate::fuzz::smoke(crate::fuzz::SMOKE_SECONDS);
        results.push(("fuzz smoke", outcome(&fuzzed)));
    }
    let linted = step("clippy", &mut clippy_host_cmd());
    results.push(("clippy", outcome(&linted)));
    let linted = clippy_ebpf_cmd().and_then(|mut clippy| step("clippy (eBPF)", &mut clippy));
    results.push(("clippy (eBPF)", outcome(&linted)));
    let formatted = step("fmt", &mut fmt_cmd());
    results.push(("fmt", outcome(&formatted)));

    println!("xtask: summary:");
    for (name, outcome) in &results {
        println!("xtask:   {name}: {outcome}");
    }
    // The closing line CI reads: every test of every test binary, summed.
    println!("tests: {} passed, {} failed", counts.passed, counts.failed);
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, outcome)| *outcome != "ok")
        .map(|(name, _)| *name)
        .collect();
    if !failed.is_empty() {
        bail!("not green: {}", failed.join(", "));
    }
    Ok(())
}

/// `cargo xtask demo`: setup, then the `lab-demo` binary of interceptor-tests.
pub fn demo(args: &[String]) -> Result<()> {
    setup::setup()?;
    step("build", &mut build_cmd())?;
    step("demo", &mut lab_bin_cmd("lab-demo", args))
}

/// `cargo xtask soak`: setup, then the `lab-soak` binary of interceptor-tests.
pub fn soak(args: &[String]) -> Result<()> {
    setup::setup()?;
    step("build", &mut build_cmd())?;
    step("soak", &mut lab_bin_cmd("lab-soak", args))
}

/// `cargo xtask bench`: setup, then the `lab-bench` binary of interceptor-tests.
pub fn bench(args: &[String]) -> Result<()> {
    setup::setup()?;
    step("build", &mut build_cmd())?;
    step("bench", &mut lab_bin_cmd("lab-bench", args))
}

/// Runs one step with streamed output, framed by a header and its duration.
pub fn step(name: &str, command: &mut Command) -> Result<()> {
    println!("xtask: {name}: {}", cmd::display(command));
    let start = Instant::now();
    let result = cmd::run(command);
    let secs = start.elapsed().as_secs_f64();
    match &result {
        Ok(()) => println!("xtask: {name}: ok ({secs:.1}s)"),
        Err(err) => eprintln!("xtask: {name}: FAILED ({secs:.1}s): {err:#}"),
    }
    result
}

/// The agent (which builds the eBPF crate) and the lab tools the tests, demo and bench run.
pub fn build_cmd() -> Command {
    cmd::cargo([
        "build",
        "--release",
        "-p",
        "interceptor",
        "-p",
        "interceptor-tests",
        "--bins",
    ])
}

/// The workspace's tests (host crates), one test at a time (the integration tests share a lab).
fn test_cmd(test_args: &[String]) -> Command {
    let mut c = cmd::cargo([
        "test",
        "--workspace",
        "--exclude",
        EBPF_PACKAGE,
        "--release",
        "--no-fail-fast",
        "--",
        "--test-threads=1",
    ]);
    c.args(test_args);
    c
}

/// Clippy on the host crates, warnings denied.
fn clippy_host_cmd() -> Command {
    cmd::cargo([
        "clippy",
        "--workspace",
        "--exclude",
        EBPF_PACKAGE,
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])
}

/// Clippy on the eBPF crate for its real target (on the host target it cannot even compile),
/// with the toolchain pinned for it.
fn clippy_ebpf_cmd() -> Result<Command> {
    let toolchain = format!("+{}", setup::ebpf_channel()?);
    Ok(cmd::cargo([
        toolchain.as_str(),
        "clippy",
        "-p",
        EBPF_PACKAGE,
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))
}

/// `cargo fmt --all -- --check`.
fn fmt_cmd() -> Command {
    cmd::cargo(["fmt", "--all", "--", "--check"])
}

/// `cargo run --release -p interceptor-tests --bin <bin> -- <args>`.
fn lab_bin_cmd(bin: &str, args: &[String]) -> Command {
    // Run what `build_cmd` just built: `cargo run -p interceptor-tests` alone would resolve
    // features differently and rebuild half the dependency tree.
    let mut c = Command::new(cmd::target_dir().join("release").join(bin));
    c.current_dir(cmd::repo_root());
    c.args(args);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_args_go_after_test_threads() {
        let line = cmd::display(&test_cmd(&["--nocapture".into(), "lab_".into()]));
        assert!(
            line.ends_with("--release --no-fail-fast -- --test-threads=1 --nocapture lab_"),
            "{line}"
        );
        assert!(line.contains("--exclude interceptor-ebpf"), "{line}");
    }

    #[test]
    fn bench_args_are_forwarded() {
        let line = cmd::display(&lab_bin_cmd("lab-bench", &["--quick".into()]));
        assert!(line.ends_with("target/release/lab-bench --quick"), "{line}");
    }
}
