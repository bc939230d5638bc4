//! `cargo xtask setup`: makes this machine able to build the eBPF programs and run the lab.
//!
//! Idempotent: every step checks first and only acts when something is missing, so a run on a
//! ready machine is quick. Each step prints one line, `setup: <what>: ok (...)` or
//! `setup: <what>: installed (...)`; a failure names what failed and what to do.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::bpf_linker::{self, Found};
use crate::cmd;

/// The Debian packages the lab and the benchmarks use (`python3-h2`: an independent HTTP/2
/// stack for the HBONE interoperability test).
pub const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "tshark",
    "tcpdump",
    "curl",
    "socat",
    "stunnel4",
    "iperf3",
    "bpftool",
    "python3-h2",
];

/// Where bpffs must be mounted (aya pins and bpftool look there).
const BPFFS: &str = "/sys/fs/bpf";

/// Set (to anything but `0`) to make setup take a new user's path for bpf-linker: build it from
/// scratch into a fresh directory under `target/` with the same code, and use that one. CI
/// sets it, so CI cannot pass when a new user's set-up would fail.
pub const FROM_SCRATCH_ENV: &str = "INTERCEPTOR_SETUP_FROM_SCRATCH";

/// The file that pins the eBPF crate's toolchain (read by setup, clippy and the build script).
pub const EBPF_TOOLCHAIN_FILE: &str = "interceptor-ebpf/rust-toolchain.toml";

/// The nightly toolchain that builds the eBPF crate.
pub struct Nightly {
    /// The pinned channel, e.g. `nightly-2026-05-20`.
    pub channel: String,
    /// `rustc +<channel> --print sysroot`.
    sysroot: PathBuf,
    /// `release:` from `rustc +nightly -vV`.
    release: String,
    /// Major of `LLVM version:` from `rustc +nightly -vV`.
    llvm_major: u32,
}

/// Runs every setup step; see the module docs.
pub fn setup() -> Result<()> {
    let start = Instant::now();
    check_root()?;
    let channel = ebpf_channel()?;
    let nightly = ensure_nightly(&channel)?;
    ensure_bpf_linker(&nightly)?;
    ensure_debian_packages()?;
    ensure_kubectl()?;
    ensure_chromium()?;
    let mounts = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    ensure_bpffs(&mounts)?;
    check_cgroup2(&mounts)?;
    println!("setup: done in {:.2}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// The channel pinned in [`EBPF_TOOLCHAIN_FILE`].
pub fn ebpf_channel() -> Result<String> {
    let path = cmd::repo_root().join(EBPF_TOOLCHAIN_FILE);
    let text = fs::read_to_string(&path)
        .with_context(|| format!("setup: cannot read {}", path.display()))?;
    channel_from_toolchain_file(&text).with_context(|| {
        format!(
            "setup: {}: no `channel = \"...\"` line under [toolchain]",
            path.display()
        )
    })
}

/// The `channel = "..."` value of a `rust-toolchain.toml`.
fn channel_from_toolchain_file(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let value = line.trim().strip_prefix("channel")?.trim_start();
        let value = value.strip_prefix('=')?.trim();
        Some(value.strip_prefix('"')?.strip_suffix('"')?.to_string())
    })
}

/// Fails unless the effective user is root (the lab needs it: bpf(), netns, mounts, apt).
fn check_root() -> Result<()> {
    let status =
        fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    match effective_uid(&status) {
        Some(0) => {
            println!("setup: root: ok");
            Ok(())
        }
        Some(uid) => bail!(
            "setup: root: FAILED: running as uid {uid}; interceptor's setup, build and tests need \
             root (eBPF, network namespaces, mounts, apt-get): rerun as root, e.g. `sudo -E cargo xtask ...`"
        ),
        None => bail!("setup: root: FAILED: no Uid line in /proc/self/status; is /proc mounted?"),
    }
}

/// The effective uid from `/proc/self/status` (`Uid: real effective saved fs`).
fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Makes sure the pinned nightly toolchain exists and has the `rust-src` and `clippy` components.
fn ensure_nightly(channel: &str) -> Result<Nightly> {
    let plus = format!("+{channel}");
    let vv = match cmd::output(Command::new("rustc").args([&plus, "-vV"])) {
        Ok(vv) => {
            println!("setup: eBPF toolchain {channel}: ok");
            vv
        }
        Err(_) => {
            println!("setup: eBPF toolchain {channel}: missing; installing");
            cmd::run(Command::new("rustup").args([
                "toolchain",
                "install",
                channel,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
                "--component",
                "clippy",
            ]))
            .with_context(|| {
                format!(
                    "setup: eBPF toolchain: FAILED to install {channel} (pinned in \
                     {EBPF_TOOLCHAIN_FILE}); run `rustup toolchain install {channel} --component \
                     rust-src --component clippy`, or pin a nightly rustup can install"
                )
            })?;
            let vv =
                cmd::output(Command::new("rustc").args([&plus, "-vV"])).with_context(|| {
                    format!("setup: eBPF toolchain: FAILED: installed but `rustc {plus} -vV` fails")
                })?;
            println!("setup: eBPF toolchain {channel}: installed");
            vv
        }
    };
    let release = vv
        .lines()
        .find_map(|l| l.strip_prefix("release:"))
        .unwrap_or("?")
        .trim()
        .to_string();
    let llvm_major = bpf_linker::llvm_major_from_rustc_vv(&vv).with_context(|| {
        format!("setup: eBPF toolchain: FAILED: no `LLVM version:` in `rustc {plus} -vV`:\n{vv}")
    })?;
    let sysroot = PathBuf::from(
        cmd::output(Command::new("rustc").args([&plus, "--print", "sysroot"]))
            .with_context(|| {
                format!("setup: eBPF toolchain: FAILED: `rustc {plus} --print sysroot`")
            })?
            .trim(),
    );

    let missing = missing_components(&sysroot);
    if missing.is_empty() {
        println!("setup: {channel} rust-src, clippy: ok ({release}, LLVM {llvm_major})");
    } else {
        cmd::run(
            Command::new("rustup")
                .args(["component", "add", "--toolchain", channel])
                .args(&missing),
        )
        .with_context(|| {
            format!(
                "setup: eBPF toolchain components: FAILED to add {}; run \
                 `rustup component add {} --toolchain {channel}`",
                missing.join(", "),
                missing.join(" ")
            )
        })?;
        let still = missing_components(&sysroot);
        if !still.is_empty() {
            bail!(
                "setup: eBPF toolchain components: FAILED: still missing after rustup: {} (sysroot {})",
                still.join(", "),
                sysroot.display()
            );
        }
        println!(
            "setup: {channel} {}: installed ({release}, LLVM {llvm_major})",
            missing.join(", ")
        );
    }
    Ok(Nightly {
        channel: channel.to_string(),
        sysroot,
        release,
        llvm_major,
    })
}

/// The nightly components (`rust-src` for `-Z build-std`, `clippy`) absent from `sysroot`.
fn missing_components(sysroot: &Path) -> Vec<&'static str> {
    let mut missing = Vec::new();
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        missing.push("rust-src");
    }
    if !sysroot.join("bin/cargo-clippy").is_file() {
        missing.push("clippy");
    }
    missing
}

/// Whether [`FROM_SCRATCH_ENV`] asks for a new user's bpf-linker path.
fn from_scratch_requested() -> bool {
    std::env::var_os(FROM_SCRATCH_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Makes sure a working bpf-linker whose LLVM matches the nightly's is on `PATH`.
fn ensure_bpf_linker(nightly: &Nightly) -> Result<()> {
    if from_scratch_requested() {
        return bpf_linker_from_scratch(nightly);
    }
    let reason = match bpf_linker::detect() {
        Found::Working {
            version,
            llvm_major: Some(major),
        } if major != nightly.llvm_major => format!(
            "{version} links LLVM {major}, but the nightly ({}) uses LLVM {}",
            nightly.release, nightly.llvm_major
        ),
        Found::Working {
            version,
            llvm_major,
        } => {
            let llvm = llvm_major.map_or("LLVM ?".to_string(), |m| format!("LLVM {m}"));
            println!("setup: bpf-linker: ok ({version}, {llvm})");
            return Ok(());
        }
        Found::Missing => "not on PATH".to_string(),
        Found::Broken(why) => format!("does not run: {why}"),
    };
    println!("setup: bpf-linker: {reason}; building it");
    let prefix = bpf_linker::llvm_prefix()?;
    let plan = bpf_linker::InstallPlan {
        root: None,
        log: prefix.with_file_name("bpf-linker-build.log"),
        llvm_prefix: prefix,
        target_dir: None,
    };
    install_and_check(nightly, &plan)
}

/// The new user's path, taken on purpose: a fresh LLVM prefix, a fresh cargo root and a fresh
/// build directory under `target/setup-from-scratch`, then that bpf-linker first on `PATH`.
fn bpf_linker_from_scratch(nightly: &Nightly) -> Result<()> {
    let scratch = cmd::target_dir().join("setup-from-scratch");
    if scratch.exists() {
        fs::remove_dir_all(&scratch)
            .with_context(|| format!("setup: cannot remove {}", scratch.display()))?;
    }
    println!(
        "setup: bpf-linker: {FROM_SCRATCH_ENV} is set; building it from scratch in {} as a new \
         machine would",
        scratch.display()
    );
    let plan = bpf_linker::InstallPlan {
        root: Some(scratch.join("root")),
        llvm_prefix: scratch.join("llvm"),
        target_dir: Some(scratch.join("build")),
        log: scratch.join("bpf-linker-build.log"),
    };
    cmd::prepend_to_path(&scratch.join("root/bin"));
    install_and_check(nightly, &plan)
}

/// Installs bpf-linker as `plan` says, then checks that `PATH` now finds a working one.
fn install_and_check(nightly: &Nightly, plan: &bpf_linker::InstallPlan) -> Result<()> {
    let start = Instant::now();
    bpf_linker::install(&nightly.sysroot, nightly.llvm_major, plan)
        .context("setup: bpf-linker: FAILED")?;
    match bpf_linker::detect() {
        Found::Working {
            version,
            llvm_major,
        } if llvm_major.is_none_or(|m| m == nightly.llvm_major) => {
            println!(
                "setup: bpf-linker: installed ({version}, LLVM {}) in {:.0}s",
                nightly.llvm_major,
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Found::Working { version, .. } => bail!(
            "setup: bpf-linker: FAILED: {version} was built, but PATH finds another bpf-linker \
             first whose LLVM differs from {}'s; remove it or put ~/.cargo/bin first on PATH",
            nightly.channel
        ),
        Found::Missing => bail!(
            "setup: bpf-linker: FAILED: installed, but not found on PATH; add ~/.cargo/bin to PATH"
        ),
        Found::Broken(why) => bail!(
            "setup: bpf-linker: FAILED: installed, but it does not run ({why}); make sure \
             ~/.cargo/bin comes first on PATH and that {} points to the nightly's libLLVM",
            plan.llvm_prefix.join("lib").display()
        ),
    }
}

/// Installs the [`DEBIAN_PACKAGES`] that dpkg does not report as installed.
fn ensure_debian_packages() -> Result<()> {
    install_packages("debian packages", DEBIAN_PACKAGES)
}

/// The Debian packages `cargo xtask image` needs: rootful podman, the runc runtime (the
/// default crun refuses hybrid cgroup layouts), and musl-gcc for the C parts (jemalloc,
/// ring) of the static build.
pub const IMAGE_PACKAGES: &[&str] = &["podman", "runc", "musl-tools"];

/// What `cargo xtask image` needs beyond [`setup`]: [`IMAGE_PACKAGES`] and the Rust
/// standard library for [`crate::image::STATIC_TARGET`].
pub fn ensure_image_tools() -> Result<()> {
    install_packages("image tools", IMAGE_PACKAGES)?;
    let target = crate::image::STATIC_TARGET;
    let installed = cmd::output(Command::new("rustup").args(["target", "list", "--installed"]))
        .context("setup: image tools: FAILED: `rustup target list --installed`")?;
    if installed.lines().any(|l| l.trim() == target) {
        println!("setup: rust target {target}: ok");
        return Ok(());
    }
    cmd::run(Command::new("rustup").args(["target", "add", target])).with_context(|| {
        format!("setup: rust target {target}: FAILED; run `rustup target add {target}`")
    })?;
    println!("setup: rust target {target}: installed");
    Ok(())
}

/// The Debian package that gives `kubectl kustomize`, which renders `deploy/` for the
/// manifest tests.
const KUBECTL_PACKAGE: &str = "kubernetes-client";

/// Makes sure a `kubectl` whose `kustomize` subcommand runs is on `PATH`; installs Debian's
/// [`KUBECTL_PACKAGE`] otherwise (a kubectl already there, from any source, is kept).
fn ensure_kubectl() -> Result<()> {
    let works = || {
        Command::new("kubectl")
            .args(["kustomize", "--help"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works() {
        println!("setup: kubectl: ok");
        return Ok(());
    }
    install_packages("kubectl", &[KUBECTL_PACKAGE])?;
    if !works() {
        bail!(
            "setup: kubectl: FAILED: {KUBECTL_PACKAGE} is installed but `kubectl kustomize \
             --help` fails; check which kubectl is first on PATH"
        );
    }
    Ok(())
}

/// Installs those of `packages` that dpkg does not report as installed; `what` names the
/// step in its messages.
fn install_packages(what: &str, packages: &[&'static str]) -> Result<()> {
    let missing = missing_packages(packages)?;
    if missing.is_empty() {
        println!("setup: {what}: ok ({})", packages.join(" "));
        return Ok(());
    }
    println!("setup: {what}: missing {}; installing", missing.join(" "));
    let hint = format!(
        "run `apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y {}`",
        missing.join(" ")
    );
    cmd::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("setup: {what}: FAILED: apt-get update; {hint}"))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("setup: {what}: FAILED: apt-get install; {hint}"))?;
    let still = missing_packages(packages)?;
    if !still.is_empty() {
        bail!(
            "setup: {what}: FAILED: still not installed after apt-get: {}; {hint}",
            still.join(" ")
        );
    }
    println!("setup: {what}: installed {}", missing.join(" "));
    Ok(())
}

/// Those of `packages` that are not fully installed, per `dpkg-query`.
fn missing_packages(packages: &[&'static str]) -> Result<Vec<&'static str>> {
    // dpkg-query exits 1 when a package is unknown; its stdout still lists the known ones.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package}\t${Status}\n"])
        .args(packages)
        .output()
        .with_context(|| {
            format!(
                "setup: FAILED: cannot run dpkg-query; this setup expects Debian; elsewhere \
                 install the equivalents of {} by hand",
                packages.join(" ")
            )
        })?;
    let installed = installed_packages(&String::from_utf8_lossy(&out.stdout));
    Ok(packages
        .iter()
        .copied()
        .filter(|p| !installed.iter().any(|i| i == p))
        .collect())
}

/// Names of the packages `dpkg-query -f='${Package}\t${Status}\n'` reports fully installed.
fn installed_packages(dpkg_query: &str) -> Vec<String> {
    dpkg_query
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, status)| status.trim() == "install ok installed")
        .map(|(name, _)| name.split(':').next().unwrap_or(name).to_string())
        .collect()
}

/// The headless browser of the traffic graph's browser test and the demo's screenshot.
const CHROMIUM_PACKAGE: &str = "chromium";

/// Installs Debian's `chromium` unless dpkg reports it installed (~15 s, apart from the other
/// packages so that a failure names it).
fn ensure_chromium() -> Result<()> {
    if chromium_installed()? {
        println!("setup: chromium: ok");
        return Ok(());
    }
    println!("setup: chromium: missing; installing (the traffic graph's browser test needs it)");
    let hint = format!(
        "run `apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
         {CHROMIUM_PACKAGE}`"
    );
    for args in [
        &["update"][..],
        &["install", "-y", "--no-install-recommends", CHROMIUM_PACKAGE],
    ] {
        cmd::run(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .with_context(|| format!("setup: chromium: FAILED: apt-get {}; {hint}", args[0]))?;
    }
    if !chromium_installed()? {
        bail!("setup: chromium: FAILED: still not installed after apt-get; {hint}");
    }
    println!("setup: chromium: installed");
    Ok(())
}

/// Whether dpkg reports [`CHROMIUM_PACKAGE`] fully installed.
fn chromium_installed() -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package}\t${Status}\n", CHROMIUM_PACKAGE])
        .output()
        .context("setup: chromium: FAILED: cannot run dpkg-query; install Chromium by hand")?;
    Ok(!installed_packages(&String::from_utf8_lossy(&out.stdout)).is_empty())
}

/// Mounts bpffs at [`BPFFS`] unless it is already.
fn ensure_bpffs(mounts: &str) -> Result<()> {
    if mount_points(mounts, "bpf").iter().any(|m| m == BPFFS) {
        println!("setup: bpffs: ok ({BPFFS})");
        return Ok(());
    }
    fs::create_dir_all(BPFFS)
        .with_context(|| format!("setup: bpffs: FAILED: cannot create {BPFFS}"))?;
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS])).with_context(|| {
        format!(
            "setup: bpffs: FAILED to mount it at {BPFFS}; run `mount -t bpf bpf {BPFFS}` as \
             root (in a container, it must be privileged)"
        )
    })?;
    println!("setup: bpffs: installed (mounted at {BPFFS})");
    Ok(())
}

/// Fails unless a cgroup v2 hierarchy is mounted somewhere.
fn check_cgroup2(mounts: &str) -> Result<()> {
    match mount_points(mounts, "cgroup2").first() {
        Some(path) => {
            println!("setup: cgroup v2: ok ({path})");
            Ok(())
        }
        None => bail!(
            "setup: cgroup v2: FAILED: no cgroup2 mount in /proc/mounts; interceptor attaches its \
             eBPF programs to cgroup v2; mount it, e.g. `mkdir -p /sys/fs/cgroup/unified && \
             mount -t cgroup2 none /sys/fs/cgroup/unified`, or boot with systemd.unified_cgroup_hierarchy=1"
        ),
    }
}

/// The mount points of filesystems of type `fstype` in `/proc/mounts` text.
fn mount_points(mounts: &str, fstype: &str) -> Vec<String> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let (_src, point, ty) = (fields.next()?, fields.next()?, fields.next()?);
            (ty == fstype).then(|| unescape_mount_field(point))
        })
        .collect()
}

/// Undoes the octal escapes (`\040` for a space, ...) of a `/proc/mounts` field.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        {
            out.push(
                digits
                    .iter()
                    .fold(0u8, |acc, d| acc.wrapping_mul(8).wrapping_add(d - b'0')),
            );
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
bpf /sys/fs/bpf bpf rw,relatime 0 0
bpf /tmp/my\\040bpf bpf rw,relatime 0 0
";

    #[test]
    fn finds_mounts_by_type() {
        assert_eq!(mount_points(MOUNTS, "cgroup2"), ["/sys/fs/cgroup/unified"]);
        assert_eq!(mount_points(MOUNTS, "bpf"), ["/sys/fs/bpf", "/tmp/my bpf"]);
        assert!(mount_points(MOUNTS, "tracefs").is_empty());
        assert_eq!(
            mount_points(MOUNTS, "cgroup"),
            ["/sys/fs/cgroup/cpu"],
            "cgroup v1 is not cgroup2"
        );
    }

    #[test]
    fn unescapes_mount_fields() {
        assert_eq!(unescape_mount_field("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_field("/plain"), "/plain");
        assert_eq!(unescape_mount_field("/trailing\\"), "/trailing\\");
        assert_eq!(unescape_mount_field("/short\\04"), "/short\\04");
    }

    #[test]
    fn reads_the_pinned_channel() {
        let file =
            "# why\n[toolchain]\nchannel = \"nightly-2026-05-20\"\ncomponents = [\"rust-src\"]\n";
        assert_eq!(
            channel_from_toolchain_file(file).as_deref(),
            Some("nightly-2026-05-20")
        );
        assert_eq!(channel_from_toolchain_file("[toolchain]\n"), None);
        let pinned = fs::read_to_string(cmd::repo_root().join(EBPF_TOOLCHAIN_FILE)).unwrap();
        assert!(
            channel_from_toolchain_file(&pinned).is_some_and(|c| c.starts_with("nightly-")),
            "the eBPF toolchain is pinned to a dated nightly"
        );
    }

    #[test]
    fn parses_effective_uid() {
        let status = "Name:\tcat\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Uid:\t0\t1000\t0\t0\n"), Some(1000));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn parses_dpkg_query_output() {
        let out = "curl\tinstall ok installed\n\
                   tshark\tdeinstall ok config-files\n\
                   iproute2:amd64\tinstall ok installed\n\
                   socat\tinstall ok unpacked\n";
        assert_eq!(installed_packages(out), ["curl", "iproute2"]);
    }
}
