//! Detecting and installing `bpf-linker`, built against the nightly toolchain's own libLLVM.
//!
//! No prebuilt bpf-linker can be downloaded here, and its LLVM must match the one of the
//! nightly rustc that compiles the eBPF crate. So it is built with `cargo install`, linked
//! against the `libLLVM.so.*-rust-*` shipped in the nightly sysroot through a persistent
//! prefix directory (the binary keeps an rpath to `<prefix>/lib`).

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd;

/// The bpf-linker release that is installed.
pub const VERSION: &str = "0.13.0";

/// The LLVM majors bpf-linker [`VERSION`] has a cargo feature (`llvm-NN`) for.
pub const SUPPORTED_LLVM: &[u32] = &[21, 22, 23];

/// What was found on `PATH`.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// A bpf-linker that runs, with its `--version` line and the LLVM major it links (if known).
    Working {
        /// First line of `bpf-linker --version`.
        version: String,
        /// The libLLVM major it is dynamically linked to, when `ldd` tells.
        llvm_major: Option<u32>,
    },
    /// No bpf-linker on `PATH`.
    Missing,
    /// A bpf-linker that does not run (e.g. its libLLVM is gone after a nightly update).
    Broken(String),
}

/// The LLVM major from `rustc -vV` output (`LLVM version: 22.1.4` gives 22).
pub fn llvm_major_from_rustc_vv(rustc_vv: &str) -> Option<u32> {
    rustc_vv.lines().find_map(|line| {
        let version = line.trim().strip_prefix("LLVM version:")?.trim();
        version.split('.').next()?.parse().ok()
    })
}

/// The bpf-linker cargo feature for an LLVM major, if that bpf-linker release supports it.
pub fn feature_for(llvm_major: u32) -> Option<String> {
    SUPPORTED_LLVM
        .contains(&llvm_major)
        .then(|| format!("llvm-{llvm_major}"))
}

/// The LLVM major of the libLLVM named in `ldd` output, e.g. from
/// `libLLVM.so.22.1-rust-1.97.0-nightly => ...`, `libLLVM-21.so => ...` or `libLLVM.so.22 => ...`.
pub fn llvm_major_from_ldd(ldd: &str) -> Option<u32> {
    ldd.lines().find_map(|line| {
        let name = line.split_whitespace().next()?;
        let rest = name.strip_prefix("libLLVM")?;
        let digits = rest
            .strip_prefix(".so.")
            .or_else(|| rest.strip_prefix('-'))?;
        let major: String = digits.chars().take_while(char::is_ascii_digit).collect();
        major.parse().ok()
    })
}

/// Whether `ldd` output reports a missing shared library.
fn ldd_missing_lib(ldd: &str) -> Option<String> {
    ldd.lines()
        .find(|l| l.contains("not found"))
        .map(|l| l.trim().to_string())
}

/// The rust-shipped libLLVM shared object in the nightly sysroot's `lib` directory.
///
/// A sysroot can hold several `libLLVM*-rust-*` names: the shared object itself
/// (`libLLVM.so.22.1-rust-1.97.0-nightly`, whose SONAME is that name) and a one-line linker
/// script beside it (`libLLVM-22-rust-1.97.0-nightly.so`, `INPUT(libLLVM.so.22.1-...)`). The
/// linker script names its target relative to the sysroot, so linking through a symlink to it
/// from elsewhere fails; this follows scripts to the ELF file they name and returns that file.
pub fn find_rust_libllvm(sysroot_lib: &Path) -> Result<PathBuf> {
    let entries = fs::read_dir(sysroot_lib)
        .with_context(|| format!("cannot read {}", sysroot_lib.display()))?;
    let mut candidates: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM") && n.contains("-rust-"))
        })
        .collect();
    candidates.sort();
    let mut shared_objects: Vec<PathBuf> = candidates
        .iter()
        .filter_map(|candidate| resolve_shared_object(sysroot_lib, candidate))
        .collect();
    shared_objects.sort();
    shared_objects.dedup();
    match shared_objects.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no libLLVM shared object (an ELF file named libLLVM*-rust-*) in {} (found {}); the \
             nightly toolchain looks incomplete or renamed its LLVM library: reinstall the \
             toolchain that interceptor-ebpf/rust-toolchain.toml names with `rustup toolchain \
             install <channel> --force`, or teach find_rust_libllvm in xtask/src/bpf_linker.rs \
             the new name",
            sysroot_lib.display(),
            names(&candidates),
        ),
        several => bail!(
            "more than one libLLVM shared object in {} ({}); cannot tell which one the nightly's \
             rustc uses: reinstall the toolchain that interceptor-ebpf/rust-toolchain.toml names \
             with `rustup toolchain install <channel> --force`",
            sysroot_lib.display(),
            names(several),
        ),
    }
}

/// `candidate` itself if it is an ELF file, the ELF file its `INPUT(...)` names if it is a
/// linker script (names resolve inside `dir`), or `None`.
fn resolve_shared_object(dir: &Path, candidate: &Path) -> Option<PathBuf> {
    let head = read_head(candidate)?;
    if head.starts_with(ELF_MAGIC) {
        return Some(candidate.to_path_buf());
    }
    let target = linker_script_input(&String::from_utf8_lossy(&head))?;
    let target = dir.join(Path::new(&target).file_name()?);
    read_head(&target)?
        .starts_with(ELF_MAGIC)
        .then_some(target)
}

/// The first bytes of `path` (enough for the ELF magic or a one-line linker script).
fn read_head(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(512);
    fs::File::open(path)
        .ok()?
        .take(512)
        .read_to_end(&mut head)
        .ok()?;
    Some(head)
}

/// The first file named by a GNU ld script's `INPUT(...)` or `GROUP(...)`.
pub fn linker_script_input(script: &str) -> Option<String> {
    let script = script.trim_start();
    let rest = script
        .strip_prefix("INPUT")
        .or_else(|| script.strip_prefix("GROUP"))?
        .trim_start()
        .strip_prefix('(')?;
    let inner = &rest[..rest.find(')')?];
    inner
        .split(|c: char| c.is_whitespace() || c == ',')
        .find(|word| !word.is_empty() && *word != "AS_NEEDED")
        .map(str::to_string)
}

/// The first four bytes of every ELF file.
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// File names of `paths`, comma separated, for messages.
fn names(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "nothing".to_string();
    }
    paths
        .iter()
        .filter_map(|p| p.file_name()?.to_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Fills `prefix/lib` with the names bpf-linker's build and its binary need, all pointing at
/// `shared_object`: `libLLVM.so` (what llvm-sys passes to the linker as `-lLLVM`) and the
/// object's own name (its SONAME, which the loader looks up through the rpath).
pub fn populate_prefix(prefix: &Path, shared_object: &Path) -> Result<()> {
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    let file_name = shared_object
        .file_name()
        .context("libLLVM path has no file name")?;
    for link in [prefix_lib.join("libLLVM.so"), prefix_lib.join(file_name)] {
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("cannot remove {}", link.display()))?;
        }
        symlink(shared_object, &link).with_context(|| {
            format!(
                "cannot symlink {} -> {}",
                link.display(),
                shared_object.display()
            )
        })?;
    }
    Ok(())
}

/// Looks for a working bpf-linker on `PATH`.
pub fn detect() -> Found {
    let Some(path) = cmd::find_in_path("bpf-linker") else {
        return Found::Missing;
    };
    let version = match cmd::output(Command::new(&path).arg("--version")) {
        Ok(out) => out.lines().next().unwrap_or_default().trim().to_string(),
        Err(err) => return Found::Broken(format!("{}: {err:#}", path.display())),
    };
    // `ldd` is best effort: without it the LLVM major is just unknown.
    let ldd = cmd::output(Command::new("ldd").arg(&path)).unwrap_or_default();
    if let Some(missing) = ldd_missing_lib(&ldd) {
        return Found::Broken(format!("{}: {missing}", path.display()));
    }
    Found::Working {
        version,
        llvm_major: llvm_major_from_ldd(&ldd),
    }
}

/// The persistent LLVM prefix bpf-linker is built against (`~/.local/share/interceptor/llvm`).
pub fn llvm_prefix() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(Path::new(&home).join(".local/share/interceptor/llvm"))
}

/// Where one bpf-linker build goes.
pub struct InstallPlan {
    /// `cargo install --root`; `None` installs into `~/.cargo/bin` like a user would.
    pub root: Option<PathBuf>,
    /// The LLVM prefix (`LLVM_PREFIX`); it must outlive the binary, which keeps an rpath to it.
    pub llvm_prefix: PathBuf,
    /// `cargo install --target-dir`; `None` is cargo's own temporary directory.
    pub target_dir: Option<PathBuf>,
    /// The build's whole output goes here, so a failure prints one sentence, not a dump.
    pub log: PathBuf,
}

/// Builds and installs bpf-linker [`VERSION`] against the nightly's libLLVM, as `plan` says.
pub fn install(nightly_sysroot: &Path, llvm_major: u32, plan: &InstallPlan) -> Result<()> {
    let feature = feature_for(llvm_major).with_context(|| {
        format!(
            "the nightly toolchain uses LLVM {llvm_major}, but bpf-linker {VERSION} only supports \
             LLVM {SUPPORTED_LLVM:?}; pin a nightly with one of those in \
             interceptor-ebpf/rust-toolchain.toml (or update VERSION in xtask/src/bpf_linker.rs)"
        )
    })?;
    let lib = find_rust_libllvm(&nightly_sysroot.join("lib"))?;
    populate_prefix(&plan.llvm_prefix, &lib)?;
    if let Some(parent) = plan.log.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let log = fs::File::create(&plan.log)
        .with_context(|| format!("cannot create {}", plan.log.display()))?;
    let log_err = log
        .try_clone()
        .with_context(|| format!("cannot reopen {}", plan.log.display()))?;
    println!(
        "setup: bpf-linker: building bpf-linker {VERSION} ({feature}) against {} \
         (a few minutes on 2 cores; output in {})",
        lib.display(),
        plan.log.display()
    );
    let mut command = Command::new("cargo");
    command
        .args(["install", "bpf-linker", "--locked", "--force", "--version", VERSION])
        .args(["--no-default-features", "--features", &feature])
        .env("LLVM_PREFIX", &plan.llvm_prefix)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log_err);
    if let Some(root) = &plan.root {
        command.arg("--root").arg(root);
    }
    if let Some(target_dir) = &plan.target_dir {
        command.arg("--target-dir").arg(target_dir);
    }
    let status = command
        .status()
        .context("could not start `cargo install` (is cargo on PATH?)")?;
    if !status.success() {
        let output = fs::read_to_string(&plan.log).unwrap_or_default();
        bail!(
            "building bpf-linker {VERSION} failed ({status}): {}; the whole output is in {} \
             (it needs a C toolchain, `apt-get install build-essential`, and crates.io)",
            first_error(&output).unwrap_or("no `error` line in the output"),
            plan.log.display()
        );
    }
    Ok(())
}

/// The first line of cargo or linker output that reports an error, trimmed.
pub fn first_error(output: &str) -> Option<&str> {
    output
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("error") || line.contains(": error:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NIGHTLY_VV: &str = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)
binary: rustc
commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a
commit-date: 2026-05-19
host: x86_64-unknown-linux-gnu
release: 1.97.0-nightly
LLVM version: 22.1.4
";

    #[test]
    fn parses_llvm_major_from_rustc_vv() {
        assert_eq!(llvm_major_from_rustc_vv(NIGHTLY_VV), Some(22));
        assert_eq!(llvm_major_from_rustc_vv("LLVM version: 21.0.0\n"), Some(21));
        assert_eq!(llvm_major_from_rustc_vv("LLVM version: 23\n"), Some(23));
        assert_eq!(llvm_major_from_rustc_vv("rustc 1.97.0\nhost: x\n"), None);
        assert_eq!(llvm_major_from_rustc_vv("LLVM version: unknown\n"), None);
    }

    #[test]
    fn picks_feature_for_supported_llvm_only() {
        assert_eq!(feature_for(21).as_deref(), Some("llvm-21"));
        assert_eq!(feature_for(22).as_deref(), Some("llvm-22"));
        assert_eq!(feature_for(23).as_deref(), Some("llvm-23"));
        assert_eq!(feature_for(20), None);
        assert_eq!(feature_for(24), None);
        let major = llvm_major_from_rustc_vv(NIGHTLY_VV).unwrap();
        assert_eq!(feature_for(major).as_deref(), Some("llvm-22"));
    }

    #[test]
    fn parses_llvm_major_from_ldd() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)
\tlibLLVM.so.22.1-rust-1.97.0-nightly => /root/.local/share/interceptor/llvm/lib/libLLVM.so.22.1-rust-1.97.0-nightly (0x00007f86abc00000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)
";
        assert_eq!(llvm_major_from_ldd(ldd), Some(22));
        assert_eq!(ldd_missing_lib(ldd), None);
        assert_eq!(
            llvm_major_from_ldd("\tlibLLVM-21.so => /usr/lib/libLLVM-21.so (0x1)\n"),
            Some(21)
        );
        assert_eq!(
            llvm_major_from_ldd("\tlibLLVM.so.23 => /x/libLLVM.so.23 (0x1)\n"),
            Some(23)
        );
        assert_eq!(
            llvm_major_from_ldd("\tlibc.so.6 => /lib/libc.so.6 (0x1)\n"),
            None
        );
    }

    #[test]
    fn notices_missing_libllvm() {
        let ldd = "\tlibLLVM.so.22.1-rust-1.97.0-nightly => not found\n";
        assert!(ldd_missing_lib(ldd).is_some());
    }

    /// A scratch directory unique to one test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The sysroot `lib/` of nightly 1.97.0 (2026-05-19) as it is: the linker script and the
    /// shared object it names, with the script's real content, plus a neighbour.
    fn nightly_2026_05_lib(dir: &Path) {
        fs::write(
            dir.join("libLLVM-22-rust-1.97.0-nightly.so"),
            b"INPUT(libLLVM.so.22.1-rust-1.97.0-nightly)\n",
        )
        .unwrap();
        let mut elf = ELF_MAGIC.to_vec();
        elf.extend_from_slice(&[2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        fs::write(dir.join("libLLVM.so.22.1-rust-1.97.0-nightly"), elf).unwrap();
        fs::write(dir.join("librustc_driver-abc.so"), ELF_MAGIC).unwrap();
    }

    #[test]
    fn follows_the_linker_script_to_the_shared_object() {
        let dir = scratch("libllvm");
        nightly_2026_05_lib(&dir);
        let found = find_rust_libllvm(&dir).unwrap();
        assert_eq!(found, dir.join("libLLVM.so.22.1-rust-1.97.0-nightly"));

        // With only the script left, its target is missing: a clear refusal, no guess.
        fs::remove_file(&found).unwrap();
        let err = format!("{:#}", find_rust_libllvm(&dir).unwrap_err());
        assert!(err.contains("libLLVM-22-rust-1.97.0-nightly.so"), "{err}");
        assert!(err.contains("rustup toolchain install"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_prefix_holds_every_name_linker_and_loader_need() {
        let dir = scratch("prefix");
        let sysroot_lib = dir.join("sysroot/lib");
        fs::create_dir_all(&sysroot_lib).unwrap();
        nightly_2026_05_lib(&sysroot_lib);
        let prefix = dir.join("llvm");
        let lib = find_rust_libllvm(&sysroot_lib).unwrap();
        populate_prefix(&prefix, &lib).unwrap();
        // Twice: a rerun replaces the links instead of failing on them.
        populate_prefix(&prefix, &lib).unwrap();
        for name in ["libLLVM.so", "libLLVM.so.22.1-rust-1.97.0-nightly"] {
            let head = fs::read(prefix.join("lib").join(name)).unwrap();
            assert!(head.starts_with(ELF_MAGIC), "{name} must reach the ELF object");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_linker_scripts() {
        assert_eq!(
            linker_script_input("INPUT(libLLVM.so.22.1-rust-1.97.0-nightly)\n").as_deref(),
            Some("libLLVM.so.22.1-rust-1.97.0-nightly")
        );
        assert_eq!(
            linker_script_input("GROUP ( AS_NEEDED ( libfoo.so.1 ) )").as_deref(),
            Some("libfoo.so.1")
        );
        assert_eq!(linker_script_input("\x7fELF"), None);
    }

    #[test]
    fn a_failed_build_is_summed_up_by_its_first_error() {
        let output = "   Compiling llvm-sys v221.0.0\n\
                      rust-lld: error: /p/lib/libLLVM.so:1: unable to find libLLVM.so.22.1\n\
                      error: could not compile `bpf-linker`\n";
        assert_eq!(
            first_error(output),
            Some("rust-lld: error: /p/lib/libLLVM.so:1: unable to find libLLVM.so.22.1")
        );
        assert_eq!(first_error("   Compiling x\n"), None);
    }
}
