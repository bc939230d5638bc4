//! The lab itself: complete teardown, also when the process that built it is killed.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, ensure};
use interceptor_tests::lab::{Lab, LabOptions};

/// Everything a lab named `name` may leave behind, as paths that exist.
fn leftovers(name: &str) -> anyhow::Result<Vec<String>> {
    let cgroup2 = interceptor::cgroup::cgroup2_mount()?;
    let mut found: Vec<String> = std::fs::read_dir("/run/netns")?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|ns| ns.starts_with(&format!("{name}-")))
        .collect();
    for path in [
        cgroup2.join("interceptor-lab").join(name),
        Path::new("/sys/fs/bpf/interceptor-lab").join(name),
        std::env::temp_dir().join("interceptor-lab").join(name),
    ] {
        if path.exists() {
            found.push(path.display().to_string());
        }
    }
    let agents = Command::new("pgrep")
        .args(["-f", &format!("interceptor-lab/{name}/")])
        .output()?;
    found.extend(
        String::from_utf8_lossy(&agents.stdout)
            .lines()
            .map(|pid| format!("process {pid}")),
    );
    Ok(found)
}

#[test]
fn dropping_a_lab_removes_everything() -> anyhow::Result<()> {
    let lab = Lab::new(LabOptions::default())?;
    let name = lab.name.clone();
    ensure!(
        !leftovers(&name)?.is_empty(),
        "the probe for leftovers sees nothing of a live lab"
    );
    drop(lab);
    let left = leftovers(&name)?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

#[test]
fn a_lab_of_a_killed_process_is_removed_by_the_next_lab() -> anyhow::Result<()> {
    let mut holder = Command::new(interceptor_tests::lab::sibling_tool("lab-up")?)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(holder.stdout.take().context("stdout")?).lines();
    let name = lines
        .next()
        .context("lab-up printed nothing")??
        .strip_prefix("lab ")
        .context("first line names the lab")?
        .to_owned();
    for line in lines.by_ref() {
        if line?.starts_with("ready") {
            break;
        }
    }
    ensure!(!leftovers(&name)?.is_empty(), "lab-up did not build a lab");
    holder.kill()?;
    holder.wait()?;
    // The next lab collects it.
    let next = Lab::new(LabOptions::default())?;
    let left = leftovers(&name)?;
    drop(next);
    ensure!(left.is_empty(), "a killed run left behind: {left:?}");
    Ok(())
}
