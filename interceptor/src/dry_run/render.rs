//! Text for people: the dry-run report, and the plaintext-callers block of `status`.

use std::fmt::Write;

use super::{CallerVerdict, DryRunReport, EXIT_WOULD_REFUSE, Outcome, PlaintextCallers};

/// The dry-run report: mode changes, then callers by outcome, then the verdict line.
pub fn report(report: &DryRunReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "DRY RUN: {} on node {} (nothing was changed)\n",
        report.change, report.node
    );
    let changed: Vec<_> = report.modes.iter().filter(|m| m.changed).collect();
    let _ = writeln!(out, "MODE CHANGES (workload, port: before -> after)");
    if changed.is_empty() {
        let _ = writeln!(
            out,
            "  none: no workload's mode or deciding policy would change"
        );
    }
    for m in &changed {
        let port = m
            .port
            .map_or_else(|| "default".to_owned(), |p| format!("port {p}"));
        let _ = writeln!(
            out,
            "  {:<40} {:<10} {} -> {}",
            m.workload, port, m.before, m.after
        );
    }
    let unchanged = report.modes.len() - changed.len();
    if unchanged > 0 {
        let _ = writeln!(out, "  ({unchanged} unchanged)");
    }
    let w = &report.window;
    let _ = writeln!(
        out,
        "\nPLAINTEXT CALLERS: {} record(s) judged, {}{}",
        w.plaintext_records - w.unjudged_records,
        match (w.since_unix_ms, w.oldest_kept_unix_ms) {
            (Some(since), _) => format!("since {}", timestamp(since)),
            (None, Some(oldest)) => format!("all kept (oldest from {})", timestamp(oldest)),
            (None, None) => "none kept yet".to_owned(),
        },
        if w.unjudged_records > 0 {
            format!(
                "; {} record(s) of workloads no longer enrolled not judged",
                w.unjudged_records
            )
        } else {
            String::new()
        }
    );
    for (outcome, title) in [
        (Outcome::CutOff, "WOULD BE REFUSED (let in now)"),
        (
            Outcome::AllowedByPortException,
            "ALLOWED ONLY BY A PORT-LEVEL EXCEPTION",
        ),
        (Outcome::StillRefused, "REFUSED NOW AND AFTER"),
    ] {
        let callers: Vec<&CallerVerdict> = report
            .callers
            .iter()
            .filter(|c| c.outcome == outcome)
            .collect();
        if callers.is_empty() && outcome != Outcome::CutOff {
            continue;
        }
        let _ = writeln!(out, "\n{title}");
        if callers.is_empty() {
            let _ = writeln!(out, "  none");
            continue;
        }
        let _ = writeln!(
            out,
            "  {:<16} {:<36} {:>5} {:>11}  {:<20} {:<20} AFTER",
            "CALLER", "WORKLOAD", "PORT", "CONNECTIONS", "FIRST SEEN", "LAST SEEN"
        );
        for c in callers {
            let _ = writeln!(
                out,
                "  {:<16} {:<36} {:>5} {:>11}  {:<20} {:<20} {}",
                c.caller.to_string(),
                c.workload,
                c.port,
                c.connections,
                timestamp(c.first_seen_unix_ms),
                timestamp(c.last_seen_unix_ms),
                c.after.decision
            );
        }
    }
    let _ = if report.would_refuse == 0 {
        writeln!(
            out,
            "\nRESULT: no plaintext caller let in now would be refused"
        )
    } else {
        writeln!(
            out,
            "\nRESULT: {} caller(s) let in now would be refused (exit status {EXIT_WOULD_REFUSE})",
            report.would_refuse
        )
    };
    out
}

/// The `status` block: per workload under PERMISSIVE, its distinct plaintext callers.
pub fn plaintext_callers(rows: &[PlaintextCallers]) -> String {
    let mut out = String::new();
    if rows.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "\nPLAINTEXT CALLERS UNDER PERMISSIVE (in the kept records: what STRICT would refuse)"
    );
    let _ = writeln!(
        out,
        "{:<40} {:<24} {:>7} {:>11}  LAST SEEN",
        "WORKLOAD", "MODE", "CALLERS", "CONNECTIONS"
    );
    for row in rows {
        let mode = if row.permissive_ports.is_empty() {
            row.default_mode.to_string()
        } else {
            let ports: Vec<String> = row.permissive_ports.iter().map(u16::to_string).collect();
            format!("PERMISSIVE on {}", ports.join(","))
        };
        let _ = writeln!(
            out,
            "{:<40} {:<24} {:>7} {:>11}  {}",
            row.workload,
            mode,
            row.callers,
            row.connections,
            row.last_seen_unix_ms
                .map_or_else(|| "-".to_owned(), timestamp)
        );
    }
    out
}

/// UTC date and time to the second: `2026-11-30 08:01:02`.
fn timestamp(unix_ms: u64) -> String {
    let seconds = i64::try_from(unix_ms / 1000).unwrap_or(i64::MAX);
    match time::OffsetDateTime::from_unix_timestamp(seconds) {
        Ok(t) => format!(
            "{} {:02}:{:02}:{:02}",
            t.date(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{unix_ms} ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc() {
        assert_eq!(timestamp(1_796_025_662_000), "2026-11-30 08:01:02");
    }
}
