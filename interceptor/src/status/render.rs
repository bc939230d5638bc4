//! The `interceptor status` table.

use std::fmt::Write;

use crate::admin::protocol::StatusReport;
use crate::graph::short_identity;
use crate::records::{ConnectionRecord, Direction, Security, Verdict};

const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const RED: &str = "\x1b[31m";
const RESET: &str = "\x1b[0m";

/// The default table's width: it fits a 120-column terminal.
pub const TABLE_WIDTH: usize = 120;

/// The whole report: totals per workload, then recent records (in the order given); within
/// [`TABLE_WIDTH`] columns unless `wide`.
pub fn report(report: &StatusReport, colour: bool, wide: bool) -> String {
    let mut out = String::new();
    let k = &report.kernel;
    let _ = writeln!(
        out,
        "node {}  (kernel: {} connects redirected, {} plaintext accepted, {} plaintext refused, {} events lost)\n",
        report.node, k.redirected, k.plaintext_accepted, k.strict_drops, k.events_lost
    );
    // Narrow: 32 + 26 + 54 = 112 columns with the spaces.
    let (workload_width, identity_width) = if wide { (30, 48) } else { (32, 26) };
    let _ = writeln!(
        out,
        "{:<workload_width$} {:<identity_width$} {:>6} {:>9} {:>7} {:>6} {:>10} {:>10}",
        "WORKLOAD", "IDENTITY", "MTLS", "PLAINTEXT", "DROPPED", "FAILED", "SENT", "RECEIVED"
    );
    for w in &report.workloads {
        let t = &w.totals;
        let identity = match (&w.identity, wide) {
            (None, _) => "-".to_owned(),
            (Some(identity), true) => identity.clone(),
            (Some(identity), false) => fit_name(&short_identity(identity), identity_width),
        };
        let workload = if wide {
            w.workload.clone()
        } else {
            fit_name(&w.workload, workload_width)
        };
        let _ = writeln!(
            out,
            "{:<workload_width$} {:<identity_width$} {:>6} {:>9} {:>7} {:>6} {:>10} {:>10}",
            workload,
            identity,
            t.mutual_tls,
            t.plaintext,
            t.dropped,
            t.failed,
            bytes(t.bytes_sent),
            bytes(t.bytes_received)
        );
    }
    let _ = writeln!(out, "\nRECENT CONNECTIONS (newest first)");
    let _ = writeln!(out, "{}", record_header(wide));
    for record in &report.records {
        let _ = writeln!(out, "{}", record_row(record, colour, wide));
    }
    out
}

/// Column titles of [`record_row`].
pub fn record_header(wide: bool) -> String {
    if !wide {
        return format!(
            "{:<8} {:<3} {:<21} {:<20} {:<5} {:<7} {:<19} REASON",
            "TIME", "DIR", "SOURCE", "DESTINATION", "SEC", "VERDICT", "SENT/RECEIVED"
        );
    }
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

/// One record as a table row: within [`TABLE_WIDTH`] columns, or every field when `wide`.
pub fn record_row(r: &ConnectionRecord, colour: bool, wide: bool) -> String {
    if !wide {
        return narrow_row(r, colour);
    }
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

/// Columns of a narrow row before its reason: 8 3 21 20 5 7 19, each followed by a space.
const NARROW_BEFORE_REASON: usize = 90;

/// The narrow row: the workload (else the short identity, else the address) of each end, the
/// bytes in one column, and the reason cut to what is left of [`TABLE_WIDTH`].
fn narrow_row(r: &ConnectionRecord, colour: bool) -> String {
    let c = &r.connection;
    let (security, security_colour) = match c.security {
        Security::MutualTls => ("mTLS", GREEN),
        Security::Plaintext => ("plain", YELLOW),
    };
    let (verdict, verdict_colour) = match (r.verdict, r.open) {
        (Verdict::Dropped, _) => ("dropped", Some(RED)),
        (Verdict::Failed, _) => ("failed", Some(RED)),
        (Verdict::Allowed, true) => ("open", None),
        (Verdict::Allowed, false) => ("allowed", None),
    };
    let line = format!(
        "{:<8} {:<3} {:<21} {:<20} {} {} {:<19} ",
        &clock(r.start_unix_ms)[..8],
        match c.direction {
            Direction::Inbound => "in",
            Direction::Outbound => "out",
        },
        fit_name(
            &end_name(
                c.source_workload.as_ref(),
                c.source_identity.as_deref(),
                c.source
            ),
            21
        ),
        fit_name(
            &end_name(
                c.destination_workload.as_ref(),
                c.destination_identity.as_deref(),
                c.destination
            ),
            20
        ),
        paint(&format!("{security:<5}"), security_colour, colour),
        match verdict_colour {
            Some(code) => paint(&format!("{verdict:<7}"), code, colour),
            None => format!("{verdict:<7}"),
        },
        format!("{}/{}", bytes(r.bytes_sent), bytes(r.bytes_received)),
    );
    let reason = short_reason(r);
    format!("{line}{}", fit(&reason, TABLE_WIDTH - NARROW_BEFORE_REASON))
        .trim_end()
        .to_owned()
}

/// A record's end as people name it: `namespace/name`, else the short identity, else the
/// address.
fn end_name(
    workload: Option<&crate::workloads::WorkloadKey>,
    identity: Option<&str>,
    address: std::net::SocketAddr,
) -> String {
    match (workload, identity) {
        (Some(workload), _) => workload.to_string(),
        (None, Some(identity)) => short_identity(identity),
        (None, None) => address.to_string(),
    }
}

/// The reason without the words the SEC and VERDICT columns already say.
fn short_reason(r: &ConnectionRecord) -> String {
    let text = reason(r);
    ["plaintext allowed: ", "plaintext refused: "]
        .iter()
        .find_map(|prefix| text.strip_prefix(prefix))
        .unwrap_or(&text)
        .replace(" (mesh default, no policy)", " (mesh default)")
}

/// A `/`-separated name (`namespace/name`, `ns/sa/account`) cut to `width` characters: its
/// first parts give way to `…` before its last one is cut, since the last names the pod.
fn fit_name(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut rest = text;
    while let Some((_, tail)) = rest.split_once('/') {
        rest = tail;
        if rest.chars().count() + 2 <= width {
            return format!("…/{rest}");
        }
    }
    fit_middle(rest, width)
}

/// A name cut to `width` characters by replacing its middle with `…`.
fn fit_middle(text: &str, width: usize) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= width {
        return text.to_owned();
    }
    let keep = width.saturating_sub(1);
    let head = keep / 2;
    let tail = keep - head;
    let mut cut: String = chars[..head].iter().collect();
    cut.push('…');
    cut.extend(&chars[chars.len() - tail..]);
    cut
}

/// `text` cut to `width` characters, ending with `…` when cut.
fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
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

/// `text` in a colour when `colour` is on.
pub fn paint(text: &str, colour_code: &str, colour: bool) -> String {
    if colour {
        format!("{colour_code}{text}{RESET}")
    } else {
        text.to_owned()
    }
}

/// 1536 -> "1.5 KiB".
pub fn bytes(n: u64) -> String {
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

    fn long_report() -> StatusReport {
        use crate::records::Connection;
        use crate::workloads::WorkloadKey;
        let long = WorkloadKey {
            namespace: "a-namespace-with-a-rather-long-name".into(),
            name: "a-pod-name-that-goes-on-and-on-0123456789".into(),
        };
        let identity = format!(
            "spiffe://cluster.local/ns/{}/sa/a-service-account-name",
            long.namespace
        );
        let record = ConnectionRecord {
            id: 1,
            start_unix_ms: 3_723_004,
            connection: Connection {
                direction: Direction::Inbound,
                source: "198.18.0.11:40001".parse().unwrap(),
                source_identity: Some(identity.clone()),
                source_workload: Some(long.clone()),
                destination: "198.19.2.10:8080".parse().unwrap(),
                destination_identity: Some(identity.clone()),
                destination_workload: Some(long.clone()),
                destination_service: None,
                peer_certificate_serial: None,
                security: Security::Plaintext,
            },
            verdict: Verdict::Dropped,
            reason: Some("plaintext refused: STRICT by istio-system/default".into()),
            bytes_sent: 100 * 1024 * 1024,
            bytes_received: 100 * 1024 * 1024,
            duration_ms: 0,
            open: false,
            count: 1,
        };
        StatusReport {
            node: "node-2".into(),
            workloads: vec![crate::admin::protocol::WorkloadStatus {
                workload: long.to_string(),
                identity: Some(identity),
                ip: Some("198.19.2.10".parse().unwrap()),
                labels: Default::default(),
                totals: Default::default(),
            }],
            kernel: Default::default(),
            records: vec![record],
            plaintext_callers: Vec::new(),
        }
    }

    #[test]
    fn the_default_table_fits_120_columns_and_wide_shows_everything() {
        let report = long_report();
        let narrow = super::report(&report, false, false);
        for line in narrow.lines() {
            assert!(line.chars().count() <= TABLE_WIDTH, "{line:?}");
        }
        assert!(
            narrow.contains("STRICT by istio-system/default"),
            "{narrow}"
        );
        // Long names keep their last part, the pod's name, as long as they can.
        assert!(
            narrow.contains("a-pod-name-that…nd-on-0123456789 "),
            "{narrow}"
        );
        assert!(narrow.contains("…/a-service-account-name "), "{narrow}");
        assert!(
            narrow.contains(" a-pod-name…0123456789 a-pod-nam…0123456789 "),
            "{narrow}"
        );
        assert!(!narrow.contains("spiffe://"), "{narrow}");
        let wide = super::report(&report, false, true);
        assert!(wide.contains("spiffe://cluster.local/ns/a-namespace-with-a-rather-long-name/sa/a-service-account-name"));
        assert!(wide.contains("198.18.0.11:40001"));
        assert!(wide.lines().any(|l| l.chars().count() > TABLE_WIDTH));
        // Colour codes do not move the columns.
        let coloured = record_row(&report.records[0], true, false);
        let plain = record_row(&report.records[0], false, false);
        let stripped = coloured
            .replace(GREEN, "")
            .replace(YELLOW, "")
            .replace(RED, "")
            .replace(RESET, "");
        assert_eq!(stripped, plain);
    }

    #[test]
    fn the_narrow_row_names_the_workload_else_the_address() {
        let mut report = long_report();
        let record = &mut report.records[0];
        record.connection.source_workload = None;
        record.connection.source_identity = None;
        let row = record_row(record, false, false);
        assert!(row.starts_with("01:02:03 in  198.18.0.11:40001"), "{row}");
        record.connection.source_identity = Some("spiffe://cluster.local/ns/foo/sa/sleep".into());
        assert!(record_row(record, false, false).contains(" foo/sa/sleep "));
    }

    #[test]
    fn names_give_up_their_first_parts_first() {
        assert_eq!(
            fit_name("vehicles/position-tracker", 25),
            "vehicles/position-tracker"
        );
        assert_eq!(
            fit_name("vehicles/position-tracker", 20),
            "…/position-tracker"
        );
        assert_eq!(
            fit_name("vehicles/sa/position-tracker", 26),
            "…/sa/position-tracker"
        );
        assert_eq!(fit_name("vehicles/position-tracker", 10), "posi…acker");
        assert_eq!(fit_name("no-slash-but-long", 8), "no-…long");
    }

    #[test]
    fn clock_is_utc_time_of_day() {
        assert_eq!(clock(3_723_004), "01:02:03.004");
    }
}
