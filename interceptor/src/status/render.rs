//! The `interceptor status` table.

use std::fmt::Write;

use crate::admin::protocol::StatusReport;
use crate::records::{ConnectionRecord, Direction, Security, Verdict};

const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const RED: &str = "\x1b[31m";
const RESET: &str = "\x1b[0m";

/// The whole report: totals per workload, then recent records (in the order given).
pub fn report(report: &StatusReport, colour: bool) -> String {
    let mut out = String::new();
    let k = &report.kernel;
    let _ = writeln!(
        out,
        "node {}  (kernel: {} connects redirected, {} plaintext accepted, {} plaintext refused, {} events lost)\n",
        report.node, k.redirected, k.plaintext_accepted, k.strict_drops, k.events_lost
    );
    let _ = writeln!(
        out,
        "{:<30} {:<48} {:>6} {:>9} {:>7} {:>6} {:>10} {:>10}",
        "WORKLOAD", "IDENTITY", "MTLS", "PLAINTEXT", "DROPPED", "FAILED", "SENT", "RECEIVED"
    );
    for w in &report.workloads {
        let t = &w.totals;
        let _ = writeln!(
            out,
            "{:<30} {:<48} {:>6} {:>9} {:>7} {:>6} {:>10} {:>10}",
            w.workload,
            w.identity.as_deref().unwrap_or("-"),
            t.mutual_tls,
            t.plaintext,
            t.dropped,
            t.failed,
            bytes(t.bytes_sent),
            bytes(t.bytes_received)
        );
    }
    let _ = writeln!(out, "\nRECENT CONNECTIONS (newest first)");
    let _ = writeln!(out, "{}", record_header());
    for record in &report.records {
        let _ = writeln!(out, "{}", record_row(record, colour));
    }
    out
}

/// Column titles of [`record_row`].
pub fn record_header() -> String {
    format!(
        "{:<12} {:<3} {:<21} {:<44} {:<21} {:<24} {:<12} {:<8} {:>9} {:>9} {:>8} {:<6} REASON",
        "TIME",
        "DIR",
        "SOURCE",
        "SOURCE IDENTITY",
        "DESTINATION",
        "DESTINATION WORKLOAD",
        "SECURITY",
        "VERDICT",
        "SENT",
        "RECEIVED",
        "DURATION",
        "STATE"
    )
}

/// One record as a table row.
pub fn record_row(r: &ConnectionRecord, colour: bool) -> String {
    let security = match r.connection.security {
        Security::MutualTls => paint("mutual_tls", GREEN, colour),
        Security::Plaintext => paint("plaintext", YELLOW, colour),
    };
    let verdict = match r.verdict {
        Verdict::Allowed => "allowed".to_owned(),
        Verdict::Dropped => paint("dropped", RED, colour),
        Verdict::Failed => paint("failed", RED, colour),
    };
    // Pad before painting so escape codes do not upset the columns.
    let pad = |text: String, plain_len: usize, width: usize| {
        format!("{text}{}", " ".repeat(width.saturating_sub(plain_len)))
    };
    let security_len = match r.connection.security {
        Security::MutualTls => 10,
        Security::Plaintext => 9,
    };
    let verdict_len = match r.verdict {
        Verdict::Allowed => 7,
        Verdict::Dropped => 7,
        Verdict::Failed => 6,
    };
    format!(
        "{:<12} {:<3} {:<21} {:<44} {:<21} {:<24} {} {} {:>9} {:>9} {:>8} {:<6} {}",
        clock(r.start_unix_ms),
        match r.connection.direction {
            Direction::Inbound => "in",
            Direction::Outbound => "out",
        },
        r.connection.source.to_string(),
        r.connection.source_identity.as_deref().unwrap_or("unknown"),
        r.connection.destination.to_string(),
        r.connection
            .destination_workload
            .as_ref()
            .map_or_else(|| "-".to_owned(), |w| w.to_string()),
        pad(security, security_len, 12),
        pad(verdict, verdict_len, 8),
        bytes(r.bytes_sent),
        bytes(r.bytes_received),
        format!("{:.1}s", r.duration_ms as f64 / 1000.0),
        if r.open { "open" } else { "closed" },
        reason(r)
    )
}

/// The reason, with the count of an aggregated record.
fn reason(r: &ConnectionRecord) -> String {
    let text = r.reason.as_deref().unwrap_or("");
    if r.count > 1 {
        format!("{text} (×{} from this address)", r.count)
    } else {
        text.to_owned()
    }
}

fn paint(text: &str, colour_code: &str, colour: bool) -> String {
    if colour {
        format!("{colour_code}{text}{RESET}")
    } else {
        text.to_owned()
    }
}

/// 1536 -> "1.5 KiB".
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// UTC time of day with milliseconds.
fn clock(unix_ms: u64) -> String {
    let ms = unix_ms % 1000;
    let secs = unix_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{ms:03}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(100 * 1024 * 1024), "100.0 MiB");
    }

    #[test]
    fn clock_is_utc_time_of_day() {
        assert_eq!(clock(3_723_004), "01:02:03.004");
    }
}
