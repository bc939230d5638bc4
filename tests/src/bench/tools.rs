//! Running the load tools with time limits, and reading processes' CPU time and memory.

use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use serde_json::Value;

/// What a bounded command printed.
pub struct Finished {
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Runs `command` to completion, killing it if it runs longer than `limit`; fails unless it
/// exits successfully within the limit.
pub fn run_bounded(mut command: Command, limit: Duration) -> anyhow::Result<Finished> {
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    // Readers on threads, so a chatty tool never blocks on a full pipe.
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = out.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let finished = Finished {
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    match status {
        None => bail!(
            "{shown} ran longer than {limit:?} and was killed; stderr: {}",
            finished.stderr.trim()
        ),
        Some(status) if !status.success() => bail!(
            "{shown} failed ({status}): {}{}",
            finished.stdout.trim(),
            finished.stderr.trim()
        ),
        Some(_) => Ok(finished),
    }
}

/// Runs `commands` together: each is started with a pipe on its standard input and held by a
/// gate (a `read` before it execs the real program, see `bench::GATE`), and once all have
/// started every gate gets its line at the same moment. Waits for all of them, killing those
/// still running after `limit`; fails unless every one exits successfully in time.
pub fn run_together(commands: Vec<Command>, limit: Duration) -> anyhow::Result<Vec<Finished>> {
    let mut children = Vec::with_capacity(commands.len());
    let kill_all = |children: &mut Vec<(String, std::process::Child)>| {
        for (_, child) in children.iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    };
    for mut command in commands {
        let shown = format!("{command:?}");
        match command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => children.push((shown, child)),
            Err(e) => {
                kill_all(&mut children);
                return Err(e).with_context(|| format!("starting {shown}"));
            }
        }
    }
    // Let the last ones reach their gate, then open every gate.
    std::thread::sleep(Duration::from_millis(200));
    let mut readers = Vec::with_capacity(children.len());
    for (_, child) in &mut children {
        if let Some(mut gate) = child.stdin.take() {
            // A gate that already failed shows in the exit status below.
            let _ = std::io::Write::write_all(&mut gate, b"go\n");
        }
        let mut out = child.stdout.take().context("stdout")?;
        let mut err = child.stderr.take().context("stderr")?;
        // Readers on threads, so a chatty tool never blocks on a full pipe.
        readers.push((
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = out.read_to_string(&mut text);
                text
            }),
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = err.read_to_string(&mut text);
                text
            }),
        ));
    }
    let deadline = Instant::now() + limit;
    let mut statuses = vec![None; children.len()];
    while statuses.iter().any(Option::is_none) {
        for (i, (_, child)) in children.iter_mut().enumerate() {
            if statuses[i].is_none() {
                statuses[i] = child.try_wait()?;
            }
        }
        if Instant::now() > deadline {
            kill_all(&mut children);
            let running = statuses.iter().filter(|s| s.is_none()).count();
            bail!(
                "{running} of {} commands ran longer than {limit:?} and were killed, e.g. {}",
                children.len(),
                children[statuses.iter().position(Option::is_none).unwrap_or(0)].0
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut finished = Vec::with_capacity(children.len());
    for (((shown, _), status), (out, err)) in children.iter().zip(statuses).zip(readers) {
        let done = Finished {
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        };
        if let Some(status) = status
            && !status.success()
        {
            bail!(
                "{shown} failed ({status}): {}{}",
                done.stdout.trim(),
                done.stderr.trim()
            );
        }
        finished.push(done);
    }
    Ok(finished)
}

/// The last line of a tool's output that parses as a JSON object.
pub fn last_json(finished: &Finished) -> anyhow::Result<Value> {
    finished
        .stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(Value::is_object)
        .with_context(|| format!("no JSON in output: {}", finished.stdout.trim()))
}

/// A number field of a JSON object.
pub fn number(value: &Value, pointer: &str) -> anyhow::Result<f64> {
    value
        .pointer(pointer)
        .and_then(Value::as_f64)
        .with_context(|| format!("no number at {pointer} in {value}"))
}

/// CPU time (user + system) a process has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // The command name (field 2) may contain spaces; fields after it are plain numbers.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    ensure!(fields.len() > 12, "short /proc/{pid}/stat");
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// Resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS for process {pid}"))
}

/// Total CPU seconds of several processes.
pub fn total_cpu(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|&pid| cpu_seconds(pid)).sum()
}

/// Total RSS of several processes, in KiB.
pub fn total_rss(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|&pid| rss_kib(pid)).sum()
}

/// One line of a command's output, or "unknown".
pub fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with("Initializing"))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_cpu_and_memory() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(rss_kib(pid).unwrap() > 0);
    }

    #[test]
    fn bounded_runs_stop_and_report() {
        let mut sleep = Command::new("sleep");
        sleep.arg("5");
        let err = run_bounded(sleep, Duration::from_millis(100))
            .err()
            .unwrap();
        assert!(err.to_string().contains("was killed"), "{err}");
        let mut echo = Command::new("echo");
        echo.arg("{\"a\":1.5}");
        let out = run_bounded(echo, Duration::from_secs(5)).unwrap();
        assert_eq!(number(&last_json(&out).unwrap(), "/a").unwrap(), 1.5);
    }

    /// `sh` held at a gate like the benchmark's, printing the time it was let through.
    fn gated(extra: &str) -> Command {
        let mut sh = Command::new("sh");
        sh.args([
            "-c",
            "read go && exec \"$0\" \"$@\"",
            "sh",
            "-c",
            &format!("date +%s%N{extra}"),
        ]);
        sh
    }

    #[test]
    fn commands_run_together_after_the_gate() {
        let started = Instant::now();
        let out =
            run_together((0..5).map(|_| gated("")).collect(), Duration::from_secs(10)).unwrap();
        assert_eq!(out.len(), 5);
        let times: Vec<u128> = out
            .iter()
            .map(|f| f.stdout.trim().parse().unwrap())
            .collect();
        // All passed the gate after the pause that lets every one reach it.
        assert!(started.elapsed() >= Duration::from_millis(200));
        let spread = times.iter().max().unwrap() - times.iter().min().unwrap();
        assert!(spread < 150_000_000, "started {spread} ns apart");
        let err = run_together(vec![gated(""), gated("; exit 3")], Duration::from_secs(10))
            .err()
            .unwrap();
        assert!(err.to_string().contains("exit status: 3"), "{err}");
        let err = run_together(vec![gated("; sleep 5")], Duration::from_millis(300))
            .err()
            .unwrap();
        assert!(err.to_string().contains("were killed"), "{err}");
    }
}
