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

use anyhow::{Context, Result};

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

/// The rust-shipped libLLVM in the nightly sysroot's `lib` directory.
pub fn find_rust_libllvm(sysroot_lib: &Path) -> Result<PathBuf> {
    let entries = fs::read_dir(sysroot_lib)
        .with_context(|| format!("cannot read {}", sysroot_lib.display()))?;
    let mut libs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM") && n.contains("-rust-"))
        })
        .collect();
    libs.sort();
    libs.into_iter().next().with_context(|| {
        format!(
            "no libLLVM*-rust-* in {}; the nightly toolchain looks incomplete \
             (try `rustup toolchain install nightly --force`)",
            sysroot_lib.display()
        )
    })
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

/// Builds and installs bpf-linker [`VERSION`] into `~/.cargo/bin` against the nightly's libLLVM.
pub fn install(nightly_sysroot: &Path, llvm_major: u32) -> Result<()> {
    let feature = feature_for(llvm_major).with_context(|| {
        format!(
            "the nightly toolchain uses LLVM {llvm_major}, but bpf-linker {VERSION} only supports \
             LLVM {SUPPORTED_LLVM:?}; pin a nightly with one of those (or update VERSION in \
             xtask/src/bpf_linker.rs)"
        )
    })?;
    let lib = find_rust_libllvm(&nightly_sysroot.join("lib"))?;
    let prefix = llvm_prefix()?;
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    let file_name = lib.file_name().context("libLLVM path has no file name")?;
    for link in [prefix_lib.join("libLLVM.so"), prefix_lib.join(file_name)] {
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("cannot remove {}", link.display()))?;
        }
        symlink(&lib, &link)
            .with_context(|| format!("cannot symlink {} -> {}", link.display(), lib.display()))?;
    }
    println!(
        "setup: bpf-linker: building bpf-linker {VERSION} ({feature}) against {} \
         (takes ~6 minutes on 2 cores)",
        lib.display()
    );
    cmd::run(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--force", "--version", VERSION])
            .args(["--no-default-features", "--features", &feature])
            .env("LLVM_PREFIX", &prefix),
    )
    .context(
        "building bpf-linker failed; it needs a C toolchain (`apt-get install build-essential`) \
         and crates.io access; the output above has the cause",
    )?;
    Ok(())
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

    #[test]
    fn finds_rust_libllvm_in_sysroot_lib() {
        let dir = std::env::temp_dir().join(format!("xtask-libllvm-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for name in [
            "librustc_driver-abc.so",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
        ] {
            fs::write(dir.join(name), b"").unwrap();
        }
        let found = find_rust_libllvm(&dir).unwrap();
        assert_eq!(
            found.file_name().unwrap(),
            "libLLVM.so.22.1-rust-1.97.0-nightly"
        );
        fs::remove_file(&found).unwrap();
        assert!(find_rust_libllvm(&dir).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
