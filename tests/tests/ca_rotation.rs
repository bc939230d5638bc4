//! Rotating the mesh CA on the lab (`interceptor ca rotate`, then `ca finish-rotation`), the
//! way an operator rolls agents: at every step each agent trusts the CA of every other, so
//! the meshed call keeps working over mutual TLS from start to end.

use std::{path::Path, process::Command};

use anyhow::{Context, ensure};
use interceptor_tests::{
    lab::{Lab, Pod, interceptor_bin},
    scenario::{curl, records, walkthrough_lab},
};

/// The meshed call of the walkthrough, which must succeed over mutual TLS, after `step`.
fn meshed_call(lab: &Lab, sleep: &Pod, tracker: &Pod, step: &str) -> anyhow::Result<()> {
    let url = format!("http://{}:8080/vehicles/", tracker.ip);
    let out = curl(lab.in_pod(sleep, "curl")?, &url, &["-o", "/dev/null"])?;
    ensure!(
        out.status.success(),
        "{step}: the meshed call failed: {}\nnode 1:\n{}\nnode 2:\n{}",
        String::from_utf8_lossy(&out.stderr),
        lab.agent_log(1),
        lab.agent_log(2)
    );
    let newest = records(lab, 1)?
        .into_iter()
        .find(|r| r["direction"] == "outbound")
        .context("no outbound record")?;
    ensure!(
        newest["security"] == "mutual_tls" && newest["verdict"] == "allowed",
        "{step}: {newest:#}"
    );
    Ok(())
}

fn restart(lab: &mut Lab, node: u8) -> anyhow::Result<()> {
    lab.kill_agent(node)?;
    lab.start_agent(node)
}

fn ca(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(interceptor_bin()?)
        .arg("ca")
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "interceptor ca {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn path(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("lab path")
}

#[test]
fn a_ca_rotation_keeps_the_meshed_call_working_at_every_step() -> anyhow::Result<()> {
    let (mut lab, sleep, tracker) = walkthrough_lab()?;
    let (old, new) = (lab.dir.join("ca"), lab.dir.join("ca-new"));
    meshed_call(&lab, &sleep, &tracker, "before the rotation")?;

    let said = ca(&["rotate", "--dir", path(&old)?, "--new-dir", path(&new)?])?;
    ensure!(said.contains("finish-rotation"), "{said}");

    // 1. Every agent restarts on the old CA, now trusting both.
    for node in [1, 2] {
        restart(&mut lab, node)?;
    }
    meshed_call(&lab, &sleep, &tracker, "all agents trust both CAs")?;

    // 2. One by one, agents sign with the new CA. Node 1 signs with the old one while node 2
    //    signs with the new: each must accept the other's certificate.
    lab.set_ca_dir(2, new.clone())?;
    restart(&mut lab, 2)?;
    meshed_call(&lab, &sleep, &tracker, "node 1 old CA, node 2 new CA")?;
    lab.set_ca_dir(1, new.clone())?;
    restart(&mut lab, 1)?;
    meshed_call(&lab, &sleep, &tracker, "both agents sign with the new CA")?;

    // 3. The new CA trusts only itself again: every certificate in use must now come from
    //    it, including those of the pods restored after each restart.
    ca(&["finish-rotation", "--dir", path(&new)?])?;
    for node in [1, 2] {
        restart(&mut lab, node)?;
    }
    meshed_call(&lab, &sleep, &tracker, "after finish-rotation")?;

    // An agent still on the old CA alone is now a stranger: its calls are refused.
    std::fs::remove_file(old.join("trust-bundle.pem"))?;
    lab.set_ca_dir(1, old)?;
    restart(&mut lab, 1)?;
    let url = format!("http://{}:8080/vehicles/", tracker.ip);
    let out = curl(lab.in_pod(&sleep, "curl")?, &url, &["-o", "/dev/null"])?;
    ensure!(
        !out.status.success(),
        "an agent of the retired CA was still trusted"
    );
    Ok(())
}
