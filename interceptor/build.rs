//! Builds the eBPF programs (interceptor-ebpf) for bpf with the toolchain pinned in
//! `interceptor-ebpf/rust-toolchain.toml`, and copies the object to `OUT_DIR/interceptor`.
//!
//! Like aya-build's `build_ebpf`, but quiet: the nested cargo's progress lines stay hidden
//! (cargo shows a build script's `cargo:warning=` lines as warnings, which a new user reads as
//! trouble). Real compiler warnings are still shown; the whole output is shown if it fails.
//! `AYA_BUILD_SKIP=1` skips the build (for tools that only need the host code to type-check).

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The eBPF crate, its binary and the workspace-relative file that pins its toolchain.
const EBPF_PACKAGE: &str = "interceptor-ebpf";

fn main() -> Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        println!("cargo:warning=AYA_BUILD_SKIP is set; the eBPF programs are not built");
        return Ok(());
    }
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir.parent().context("interceptor is in a workspace")?;
    let ebpf_dir = workspace.join(EBPF_PACKAGE);
    // The eBPF binary is not a dependency cargo tracks, so watch its sources and the shared types.
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("interceptor-common").display()
    );
    let toolchain = pinned_toolchain(&ebpf_dir.join("rust-toolchain.toml"))?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN")?.as_str() {
        "big" => "bpfeb-unknown-none",
        _ => "bpfel-unknown-none",
    };
    let arch = match env::var("CARGO_CFG_TARGET_ARCH")?.as_str() {
        "riscv64" => "riscv64".to_string(),
        other if other.starts_with("arm") => "arm".to_string(),
        other => other.to_string(),
    };
    let object = build(&toolchain, target, &arch, &ebpf_dir, &out_dir)?;
    std::fs::copy(&object, out_dir.join("interceptor"))
        .with_context(|| format!("cannot copy {}", object.display()))?;
    Ok(())
}

/// The `channel = "..."` of the eBPF crate's `rust-toolchain.toml`.
fn pinned_toolchain(file: &Path) -> Result<String> {
    println!("cargo:rerun-if-changed={}", file.display());
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    text.lines()
        .find_map(|line| {
            let value = line.trim().strip_prefix("channel")?.trim_start();
            let value = value.strip_prefix('=')?.trim();
            Some(value.strip_prefix('"')?.strip_suffix('"')?.to_string())
        })
        .with_context(|| format!("{}: no `channel = \"...\"` line", file.display()))
}

/// Runs the nested cargo build and returns the path of the eBPF object it produced.
fn build(
    toolchain: &str,
    target: &str,
    arch: &str,
    ebpf_dir: &Path,
    out_dir: &Path,
) -> Result<PathBuf> {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", toolchain, "cargo", "build", "--package", EBPF_PACKAGE])
        .args(["--bins", "--release", "--message-format=json"])
        .args(["--target", target, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(out_dir.join("ebpf-target"))
        .current_dir(ebpf_dir)
        // The outer cargo's compiler must not leak into the nested (nightly) build.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        )
        .stdin(Stdio::null());
    let output = cmd.output().with_context(|| {
        format!("cannot run rustup to build the eBPF programs with {toolchain}; run `cargo xtask setup`")
    })?;
    let mut object = None;
    let mut warnings = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        match message["reason"].as_str() {
            Some("compiler-artifact") => {
                if let Some(exe) = message["executable"].as_str() {
                    object = Some(PathBuf::from(exe));
                }
            }
            Some("compiler-message") => {
                if let Some(rendered) = message["message"]["rendered"].as_str() {
                    warnings.push(rendered.to_string());
                }
            }
            _ => {}
        }
    }
    if !output.status.success() {
        // A failed build script's stderr is shown whole by cargo: the full story, once.
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        for message in &warnings {
            eprintln!("{message}");
        }
        bail!(
            "building the eBPF programs with {toolchain} failed ({}); the output above has the \
             cause (a missing bpf-linker or rust-src: run `cargo xtask setup`)",
            output.status
        );
    }
    for message in warnings {
        for line in message.lines() {
            println!("cargo:warning={line}");
        }
    }
    object.context("the eBPF build produced no executable")
}
