//! `cargo xtask image`: the agent's container image, built with rootful podman from
//! `Containerfile` (`FROM scratch` and one static binary), saved as an OCI archive under
//! `target/image/`, then smoke-tested in real containers (`tests/tests/image.rs`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};

use crate::{cmd, run, setup};

/// The target whose binaries link statically (musl), so the image needs no libc.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";

/// The image's name in local podman storage; the tag is the agent's version.
const IMAGE_NAME: &str = "localhost/interceptor";

/// What the smoke test reads to find the image (`podman` reference) and its archive.
const IMAGE_ENV: &str = "INTERCEPTOR_IMAGE";
const ARCHIVE_ENV: &str = "INTERCEPTOR_IMAGE_ARCHIVE";

/// `cargo xtask image`: setup (with podman), build, save, then the smoke test unless `no_test`.
pub fn image(no_test: bool) -> Result<()> {
    let start = Instant::now();
    setup::setup()?;
    setup::ensure_image_tools()?;
    let version = agent_version()?;
    let commit = commit()?;
    let binary = build_static_binary()?;
    let context = stage_context(&binary)?;
    let reference = format!("{IMAGE_NAME}:{version}");
    let mut build = Command::new("podman");
    build
        .args(["build", "--pull=never", "--format", "oci"])
        .args(["--timestamp", &commit.unix_time.to_string()])
        .args(["--file"])
        .arg(context.join("Containerfile"))
        .args(["--tag", &reference]);
    for (key, value) in annotations(&version, &commit) {
        let pair = format!("{key}={value}");
        build.args(["--annotation", &pair, "--label", &pair]);
    }
    build.arg(&context);
    run::step("image build", &mut build)?;
    let archive = image_dir().join(format!("interceptor-{version}.oci.tar"));
    if archive.exists() {
        fs::remove_file(&archive)
            .with_context(|| format!("removing the old {}", archive.display()))?;
    }
    run::step(
        "image save",
        Command::new("podman")
            .args(["save", "--format", "oci-archive", "--output"])
            .arg(&archive)
            .arg(&reference),
    )?;
    let image_bytes: u64 = cmd::output(Command::new("podman").args([
        "image",
        "inspect",
        "--format",
        "{{.Size}}",
        &reference,
    ]))?
    .trim()
    .parse()
    .context("podman image inspect printed no size")?;
    let archive_bytes = fs::metadata(&archive)?.len();
    println!(
        "xtask: image: {reference} ({}, commit {}): {:.1} MiB unpacked, archive {} {:.1} MiB",
        version,
        commit.id,
        mib(image_bytes),
        archive.display(),
        mib(archive_bytes)
    );
    if no_test {
        println!(
            "xtask: image: done in {:.0}s",
            start.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    // The smoke test also runs the lab's own tools (CLI, CA, fixtures) from the host build.
    run::step("build", &mut run::build_cmd())?;
    let smoke_start = Instant::now();
    let mut smoke = cmd::cargo([
        "test",
        "--release",
        "-p",
        "interceptor-tests",
        "--test",
        "image",
        "--",
        "--ignored",
        "--test-threads=1",
    ]);
    smoke.env(IMAGE_ENV, &reference).env(ARCHIVE_ENV, &archive);
    run::step("image smoke test", &mut smoke)?;
    println!(
        "xtask: image: done in {:.0}s (smoke test {:.0}s)",
        start.elapsed().as_secs_f64(),
        smoke_start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `target/image/`: the build context and the OCI archive.
fn image_dir() -> PathBuf {
    cmd::target_dir().join("image")
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The agent's version, from `interceptor/Cargo.toml`.
fn agent_version() -> Result<String> {
    let path = cmd::repo_root().join("interceptor/Cargo.toml");
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    package_version(&text).with_context(|| format!("{}: no version = \"...\"", path.display()))
}

/// The `version = "..."` of a manifest's `[package]` table.
fn package_version(manifest: &str) -> Option<String> {
    let package = manifest.split("[package]").nth(1)?;
    package
        .lines()
        .take_while(|l| !l.trim_start().starts_with('['))
        .find_map(|line| {
            let value = line.trim().strip_prefix("version")?.trim_start();
            let value = value.strip_prefix('=')?.trim();
            Some(value.strip_prefix('"')?.strip_suffix('"')?.to_string())
        })
}

/// The commit the image is built from.
struct Commit {
    /// The full hash, with `-dirty` when the work tree has uncommitted changes.
    id: String,
    /// Its commit time, the image's creation time (so a commit always gives the same image).
    unix_time: u64,
}

fn commit() -> Result<Commit> {
    let git = |args: &[&str]| {
        cmd::output(Command::new("git").args(args).current_dir(cmd::repo_root()))
            .context("the image is labelled with its commit: run it from a git checkout")
    };
    let hash = git(&["rev-parse", "HEAD"])?.trim().to_owned();
    let dirty = !git(&["status", "--porcelain"])?.trim().is_empty();
    let unix_time = git(&["log", "-1", "--format=%ct"])?
        .trim()
        .parse()
        .context("git log printed no commit time")?;
    Ok(Commit {
        id: if dirty { format!("{hash}-dirty") } else { hash },
        unix_time,
    })
}

/// The OCI annotations (also set as labels, which `podman inspect` and Docker tools show).
fn annotations(version: &str, commit: &Commit) -> Vec<(&'static str, String)> {
    vec![
        ("org.opencontainers.image.title", "interceptor".into()),
        (
            "org.opencontainers.image.description",
            "interceptor node agent: sidecar-less mutual TLS for Kubernetes pods".into(),
        ),
        ("org.opencontainers.image.version", version.into()),
        ("org.opencontainers.image.revision", commit.id.clone()),
        ("org.opencontainers.image.licenses", "Apache-2.0".into()),
    ]
}

/// Builds the agent for [`STATIC_TARGET`] and checks that it needs no dynamic loader.
fn build_static_binary() -> Result<PathBuf> {
    run::step(
        "static build",
        &mut cmd::cargo([
            "build",
            "--release",
            "-p",
            "interceptor",
            "--bin",
            "interceptor",
            "--target",
            STATIC_TARGET,
        ]),
    )?;
    let binary = cmd::target_dir()
        .join(STATIC_TARGET)
        .join("release/interceptor");
    let bytes = fs::read(&binary).with_context(|| format!("cannot read {}", binary.display()))?;
    ensure!(
        !needs_loader(&bytes)?,
        "{} asks for a dynamic loader (PT_INTERP); a FROM scratch image has none",
        binary.display()
    );
    Ok(binary)
}

/// Whether a 64-bit little-endian ELF file has a `PT_INTERP` program header, i.e. needs
/// `ld.so` (and with it a libc) to start.
fn needs_loader(elf: &[u8]) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    ensure!(
        elf.get(..6) == Some(b"\x7fELF\x02\x01"),
        "not a 64-bit little-endian ELF file"
    );
    let field = |at: usize, len: usize| -> Result<u64> {
        let bytes = elf.get(at..at + len).context("truncated ELF header")?;
        Ok(bytes
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    };
    let phoff = usize::try_from(field(0x20, 8)?)?;
    let phentsize = usize::try_from(field(0x36, 2)?)?;
    let phnum = usize::try_from(field(0x38, 2)?)?;
    for i in 0..phnum {
        if field(phoff + i * phentsize, 4)? == u64::from(PT_INTERP) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `target/image/context/`: the Containerfile and the binary, nothing else (a small context).
fn stage_context(binary: &Path) -> Result<PathBuf> {
    let context = image_dir().join("context");
    if context.exists() {
        fs::remove_dir_all(&context).with_context(|| format!("removing {}", context.display()))?;
    }
    fs::create_dir_all(&context).with_context(|| format!("creating {}", context.display()))?;
    let containerfile = cmd::repo_root().join("Containerfile");
    fs::copy(&containerfile, context.join("Containerfile"))
        .with_context(|| format!("copying {}", containerfile.display()))?;
    fs::copy(binary, context.join("interceptor"))
        .with_context(|| format!("copying {}", binary.display()))?;
    let stripped = context.join("interceptor");
    if !Command::new("strip")
        .arg(&stripped)
        .status()
        .is_ok_and(|s| s.success())
    {
        bail!("`strip {}` failed (binutils)", stripped.display());
    }
    Ok(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_package_version() {
        let manifest =
            "[package]\nname = \"x\"\nversion = \"1.2.3\"\n\n[dependencies]\nversion = \"9\"\n";
        assert_eq!(package_version(manifest).as_deref(), Some("1.2.3"));
        assert_eq!(package_version("[dependencies]\nversion = \"9\"\n"), None);
        assert!(agent_version().is_ok_and(|v| v.contains('.')));
    }

    #[test]
    fn tells_static_from_dynamic_binaries() {
        // This test binary is built for the host's glibc target: it needs the loader.
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(needs_loader(&me).unwrap());
        // The same header with the PT_INTERP entry renamed to PT_NULL no longer does.
        let mut stripped = me.clone();
        let phoff = u64::from_le_bytes(me[0x20..0x28].try_into().unwrap()) as usize;
        let size = u16::from_le_bytes(me[0x36..0x38].try_into().unwrap()) as usize;
        let count = u16::from_le_bytes(me[0x38..0x3a].try_into().unwrap()) as usize;
        for i in 0..count {
            let at = phoff + i * size;
            if stripped[at..at + 4] == 3u32.to_le_bytes() {
                stripped[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
            }
        }
        assert!(!needs_loader(&stripped).unwrap());
        assert!(needs_loader(b"#!/bin/sh\n").is_err());
    }
}
