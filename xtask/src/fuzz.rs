//! `cargo xtask fuzz`: the libFuzzer targets of `fuzz/` (cargo-fuzz), each run for a while
//! from its checked-in seeds.
//!
//! The targets read untrusted input: a policy file, the tunnel port's request, an admin
//! request, a mesh directory entry, a PeerAuthentication object from the Kubernetes API and
//! the Pods, Namespaces, Services and EndpointSlices the watches decode.
//! Each run keeps what it learns in `fuzz/corpus/<target>` (not checked in) and starts from
//! `fuzz/seeds/<target>` (checked in); a crash leaves its input in `fuzz/artifacts/<target>`,
//! which becomes a regression test.

use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{cmd, run::step, setup};

/// Every target, as named in fuzz/Cargo.toml.
pub const TARGETS: [&str; 6] = [
    "policy",
    "tunnel_request",
    "admin_request",
    "mesh_entry",
    "api_policy",
    "kube_objects",
];

/// Runs `targets` (all when empty) for `seconds` each.
pub fn fuzz(seconds: u64, targets: &[String]) -> Result<()> {
    for target in targets {
        if !TARGETS.contains(&target.as_str()) {
            bail!("unknown fuzz target {target:?}; the targets are {TARGETS:?}");
        }
    }
    setup::setup()?;
    ensure_cargo_fuzz()?;
    let toolchain = format!("+{}", setup::ebpf_channel()?);
    let chosen: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    let fuzz_dir = cmd::repo_root().join("fuzz");
    for target in chosen {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus).with_context(|| format!("{}", corpus.display()))?;
        let seeds = fuzz_dir.join("seeds").join(target);
        let started = Instant::now();
        step(
            &format!("fuzz {target} for {seconds} s"),
            cmd::cargo([toolchain.as_str(), "fuzz", "run", target])
                .arg(&corpus)
                .arg(&seeds)
                .args([
                    "--",
                    &format!("-max_total_time={seconds}"),
                    "-print_final_stats=1",
                ])
                .current_dir(&fuzz_dir),
        )?;
        println!(
            "xtask: fuzz {target}: no crash in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Seconds each target runs in the smoke of `cargo xtask test`.
pub const SMOKE_SECONDS: u64 = 20;

/// How the smoke builds the targets: without a sanitizer and in 16 codegen units, which
/// builds several times cheaper than cargo-fuzz's default (AddressSanitizer, one codegen
/// unit; see RELIABILITY.md for the figures). The targets read untrusted input in safe Rust,
/// where what a smoke must catch is a panic, an overflow (debug assertions stay on), a
/// stack overflow or a hang, which libFuzzer reports without a sanitizer. Its own target
/// directory keeps it from rebuilding the sanitizer build of `cargo xtask fuzz`.
const SMOKE_BUILD: [&str; 6] = [
    "--sanitizer",
    "none",
    "--codegen-units",
    "16",
    "--target-dir",
    "target-smoke",
];

/// The smoke `cargo xtask test` runs: every target built once, then run for `seconds` from
/// its seeds and the corpus earlier runs left. A crash (or a target that does not build)
/// fails it; the crashing input is left in `fuzz/artifacts/<target>`.
pub fn smoke(seconds: u64) -> Result<()> {
    ensure_cargo_fuzz()?;
    let toolchain = format!("+{}", setup::ebpf_channel()?);
    let fuzz_dir = cmd::repo_root().join("fuzz");
    step(
        "fuzz smoke: build",
        cmd::cargo([toolchain.as_str(), "fuzz", "build"])
            .args(SMOKE_BUILD)
            .current_dir(&fuzz_dir),
    )?;
    let mut crashed = Vec::new();
    for target in TARGETS {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus).with_context(|| format!("{}", corpus.display()))?;
        let ran = step(
            &format!("fuzz smoke: {target} for {seconds} s"),
            cmd::cargo([toolchain.as_str(), "fuzz", "run"])
                .args(SMOKE_BUILD)
                .arg(target)
                .arg(&corpus)
                .arg(fuzz_dir.join("seeds").join(target))
                .args(["--", &format!("-max_total_time={seconds}")])
                .current_dir(&fuzz_dir),
        );
        if ran.is_err() {
            crashed.push(target);
        }
    }
    if !crashed.is_empty() {
        bail!(
            "fuzz targets failed: {}; the inputs are in fuzz/artifacts/<target>",
            crashed.join(", ")
        );
    }
    Ok(())
}

/// The cargo-fuzz release installed when none is present (the one the runs here used; a
/// newer one may need a newer rustc).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Installs cargo-fuzz from crates.io when it is missing.
fn ensure_cargo_fuzz() -> Result<()> {
    let present = std::process::Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if present {
        return Ok(());
    }
    step(
        "install cargo-fuzz",
        &mut cmd::cargo([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ]),
    )
}
