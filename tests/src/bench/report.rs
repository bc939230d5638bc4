//! Medians, ratios and targets of a benchmark run, as a text table, a Markdown section and
//! JSON.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::{
    Run, Variant,
    stats::{difference, median, ratio},
};

/// A metric the benchmark reports.
pub struct Metric {
    /// Key in [`Run::metric`] and in the JSON file.
    pub key: &'static str,
    /// What it measures.
    pub label: &'static str,
    /// Its unit.
    pub unit: &'static str,
    /// Whether more is better.
    pub higher_is_better: bool,
    /// Shown (with "–" where nothing was measured) whenever this other metric has runs, so a
    /// value the agent could not give appears as missing rather than disappearing.
    pub shown_with: Option<&'static str>,
}

/// Every metric, in report order.
pub const METRICS: &[Metric] = &[
    Metric {
        key: "tput_1",
        label: "Throughput, 1 stream",
        unit: "Gbit/s",
        higher_is_better: true,
        shown_with: None,
    },
    Metric {
        key: "tput_4",
        label: "Throughput, 4 streams",
        unit: "Gbit/s",
        higher_is_better: true,
        shown_with: None,
    },
    Metric {
        key: "rr1_p50",
        label: "1 B request/response, p50",
        unit: "µs",
        higher_is_better: false,
        shown_with: None,
    },
    Metric {
        key: "rr1_p99",
        label: "1 B request/response, p99",
        unit: "µs",
        higher_is_better: false,
        shown_with: None,
    },
    Metric {
        key: "rr1k_p50",
        label: "1 KiB request/response, p50",
        unit: "µs",
        higher_is_better: false,
        shown_with: None,
    },
    Metric {
        key: "rr1k_p99",
        label: "1 KiB request/response, p99",
        unit: "µs",
        higher_is_better: false,
        shown_with: None,
    },
    Metric {
        key: "conn_rate",
        label: "New connections, 1 client pod (64 B each way)",
        unit: "conn/s",
        higher_is_better: true,
        shown_with: None,
    },
    Metric {
        key: "reuse_1",
        label: "Tunnel reuse during new connections, 1 client pod",
        unit: "ratio",
        higher_is_better: true,
        shown_with: Some("conn_rate"),
    },
    Metric {
        key: "conn_rate_50",
        label: "New connections, 50 client pods to 1 server pod (64 B each way)",
        unit: "conn/s",
        higher_is_better: true,
        shown_with: None,
    },
    Metric {
        key: "reuse_50",
        label: "Tunnel reuse during new connections, 50 client pods",
        unit: "ratio",
        higher_is_better: true,
        shown_with: Some("conn_rate_50"),
    },
    Metric {
        key: "mem_1000",
        label: "Proxy RSS growth per 1,000 idle connections, both ends",
        unit: "MiB",
        higher_is_better: false,
        shown_with: None,
    },
    Metric {
        key: "cpu_gb_1",
        label: "Proxy CPU per GB, 1 stream, both ends",
        unit: "s/GB",
        higher_is_better: false,
        shown_with: None,
    },
    Metric {
        key: "cpu_gb_4",
        label: "Proxy CPU per GB, 4 streams, both ends",
        unit: "s/GB",
        higher_is_better: false,
        shown_with: None,
    },
];

/// Medians of one metric.
pub struct Row {
    /// The metric.
    pub metric: &'static Metric,
    /// Median per variant, in [`Variant::ALL`] order.
    pub medians: [Option<f64>; 3],
    /// Every run's value per variant, in round order.
    pub values: [Vec<f64>; 3],
}

impl Row {
    /// The median of a variant.
    pub fn of(&self, variant: Variant) -> Option<f64> {
        self.medians[index(variant)]
    }

    /// The interceptor against direct, as a ratio (for latencies too).
    pub fn versus_direct(&self) -> Option<f64> {
        ratio(self.of(Variant::Interceptor), self.of(Variant::Direct))
    }

    /// For latencies, the time the interceptor adds over direct, in µs.
    pub fn added_over_direct(&self) -> Option<f64> {
        if self.metric.unit == "µs" {
            difference(self.of(Variant::Interceptor), self.of(Variant::Direct))
        } else {
            None
        }
    }

    /// The interceptor against stunnel, as a ratio.
    pub fn versus_stunnel(&self) -> Option<f64> {
        ratio(self.of(Variant::Interceptor), self.of(Variant::Stunnel))
    }
}

fn index(variant: Variant) -> usize {
    Variant::ALL
        .iter()
        .position(|v| *v == variant)
        .unwrap_or_default()
}

/// The rows of the metrics that have runs.
pub fn rows(runs: &[Run]) -> Vec<Row> {
    METRICS
        .iter()
        .filter_map(|metric| {
            let values = Variant::ALL.map(|variant| {
                let mut of: Vec<&Run> = runs
                    .iter()
                    .filter(|r| r.metric == metric.key && r.variant == variant)
                    .collect();
                of.sort_by_key(|r| r.round);
                of.iter().map(|r| r.value).collect::<Vec<f64>>()
            });
            let companion_ran = metric
                .shown_with
                .is_some_and(|key| runs.iter().any(|r| r.metric == key));
            if values.iter().all(Vec::is_empty) && !companion_ran {
                return None;
            }
            let medians = [0, 1, 2].map(|i| median(&values[i]));
            Some(Row {
                metric,
                medians,
                values,
            })
        })
        .collect()
}

/// A target of issue 13, checked against the medians.
pub struct Target {
    /// What is asked.
    pub goal: String,
    /// What was measured.
    pub measured: String,
    /// Met, missed, or unknown when the metric did not run.
    pub met: Option<bool>,
    /// The moonshot, where the issue sets one: met, missed, or unknown.
    pub moonshot: Option<Option<bool>>,
}

/// Issue 13's targets: ratios against direct (or stunnel) measured in the same run, and the
/// memory per connection.
pub fn targets(rows: &[Row]) -> Vec<Target> {
    let row = |key: &str| rows.iter().find(|r| r.metric.key == key);
    let mut out = Vec::new();
    let rate = row("conn_rate");
    let vs_direct = rate.and_then(Row::versus_direct);
    out.push(Target {
        goal: "new connections/s through the mesh, 1 client pod, ≥ 0.35× direct (moonshot ≥ 0.5×)"
            .into(),
        measured: measured(vs_direct, |v| {
            format!(
                "{v:.2}× ({} against {} /s)",
                fmt(rate.and_then(|r| r.of(Variant::Interceptor)), 0),
                fmt(rate.and_then(|r| r.of(Variant::Direct)), 0),
            )
        }),
        met: vs_direct.map(|v| v >= 0.35),
        moonshot: Some(vs_direct.map(|v| v >= 0.5)),
    });
    for (key, name, limit, moonshot) in [
        ("rr1_p50", "p50", 1.35, Some(1.25)),
        ("rr1_p99", "p99", 1.5, None),
    ] {
        let r = row(key);
        let vs_direct = r.and_then(Row::versus_direct);
        let added = r.and_then(Row::added_over_direct);
        out.push(Target {
            goal: match moonshot {
                Some(m) => format!("1 B round trip {name} ≤ {limit}× direct (moonshot ≤ {m}×)"),
                None => format!("1 B round trip {name} ≤ {limit}× direct"),
            },
            measured: measured(vs_direct, |v| format!("{v:.2}× (+{} µs)", fmt(added, 1))),
            met: vs_direct.map(|v| v <= limit),
            moonshot: moonshot.map(|m| vs_direct.map(|v| v <= m)),
        });
    }
    for (key, streams) in [("tput_1", "1 stream"), ("tput_4", "4 streams")] {
        let vs_direct = row(key).and_then(Row::versus_direct);
        out.push(Target {
            goal: format!("throughput, {streams}, ≥ 0.5× direct"),
            measured: measured(vs_direct, |v| format!("{v:.2}×")),
            met: vs_direct.map(|v| v >= 0.5),
            moonshot: None,
        });
    }
    // MiB per 1,000 connections to KiB per connection.
    let memory = row("mem_1000")
        .and_then(|r| r.of(Variant::Interceptor))
        .map(|mib| mib * 1024.0 / 1000.0);
    out.push(Target {
        goal: "agent memory per idle proxied connection, both ends, ≤ 32 KiB".into(),
        measured: measured(memory, |m| format!("{m:.1} KiB")),
        met: memory.map(|m| m <= 32.0),
        moonshot: None,
    });
    for (key, streams) in [("cpu_gb_1", "1 stream"), ("cpu_gb_4", "4 streams")] {
        let vs_stunnel = row(key).and_then(Row::versus_stunnel);
        out.push(Target {
            goal: format!("agent CPU per GB, both ends, {streams}, ≤ 0.5× stunnel"),
            measured: measured(vs_stunnel, |v| format!("{v:.2}× stunnel")),
            met: vs_stunnel.map(|v| v <= 0.5),
            moonshot: None,
        });
    }
    out
}

/// What a target measured, or "–" when it did not run.
fn measured(value: Option<f64>, text: impl FnOnce(f64) -> String) -> String {
    value.map_or_else(|| "–".into(), text)
}

/// A number with `decimals`, or "–" when missing.
pub fn fmt(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(v) => format!("{v:.decimals$}"),
        None => "–".into(),
    }
}

fn decimals(metric: &Metric) -> usize {
    match metric.unit {
        "ratio" => 3,
        "Gbit/s" | "s/GB" => 2,
        "conn/s" => 0,
        _ => 1,
    }
}

fn versus_direct_text(row: &Row) -> String {
    match (row.versus_direct(), row.added_over_direct()) {
        (None, _) => "–".into(),
        (Some(v), Some(added)) => format!("{v:.2}× ({added:+.1} µs)"),
        (Some(v), None) => format!("{v:.2}×"),
    }
}

fn versus_stunnel_text(row: &Row) -> String {
    match row.versus_stunnel() {
        None => "–".into(),
        Some(v) => format!("{v:.2}×"),
    }
}

/// The results as a Markdown table (also readable as plain text).
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| Metric | Unit | direct | interceptor | stunnel | interceptor vs direct | interceptor vs stunnel |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
    for row in rows {
        let d = decimals(row.metric);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.metric.label,
            row.metric.unit,
            fmt(row.of(Variant::Direct), d),
            fmt(row.of(Variant::Interceptor), d),
            fmt(row.of(Variant::Stunnel), d),
            versus_direct_text(row),
            versus_stunnel_text(row),
        );
    }
    out
}

/// The targets as a Markdown table.
pub fn targets_table(targets: &[Target]) -> String {
    let mut out = String::from("| Target | Measured | |\n|---|---|---|\n");
    for target in targets {
        let verdict = match (target.met, target.moonshot) {
            (None, _) => "not measured",
            (Some(true), Some(Some(true))) => "met, moonshot too",
            (Some(true), Some(Some(false))) => "met (moonshot missed)",
            (Some(true), _) => "met",
            (Some(false), _) => "**missed**",
        };
        let _ = writeln!(out, "| {} | {} | {verdict} |", target.goal, target.measured);
    }
    out
}

/// Every run of every metric, per variant, as Markdown lines.
pub fn runs_table(rows: &[Row]) -> String {
    let mut out = String::from("| Metric | direct | interceptor | stunnel |\n|---|---|---|---|\n");
    for row in rows {
        let d = decimals(row.metric);
        let list = |values: &Vec<f64>| {
            if values.is_empty() {
                "–".to_owned()
            } else {
                values
                    .iter()
                    .map(|v| format!("{v:.d$}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let _ = writeln!(
            out,
            "| {} ({}) | {} | {} | {} |",
            row.metric.label,
            row.metric.unit,
            list(&row.values[0]),
            list(&row.values[1]),
            list(&row.values[2]),
        );
    }
    out
}

/// The JSON results file.
pub fn json(runs: &[Run], rows: &[Row], targets: &[Target], facts: Value) -> Value {
    let summary: Vec<Value> = rows
        .iter()
        .map(|row| {
            json!({
                "metric": row.metric.key,
                "label": row.metric.label,
                "unit": row.metric.unit,
                "higher_is_better": row.metric.higher_is_better,
                "median": {
                    "direct": row.of(Variant::Direct),
                    "interceptor": row.of(Variant::Interceptor),
                    "stunnel": row.of(Variant::Stunnel),
                },
                "interceptor_vs_direct": row.versus_direct(),
                "interceptor_added_us": row.added_over_direct(),
                "interceptor_vs_stunnel": row.versus_stunnel(),
            })
        })
        .collect();
    let targets: Vec<Value> = targets
        .iter()
        .map(|t| {
            json!({
                "target": t.goal,
                "measured": t.measured,
                "met": t.met,
                "moonshot_met": t.moonshot.flatten(),
            })
        })
        .collect();
    let runs: Vec<Value> = runs
        .iter()
        .map(|r| {
            json!({
                "metric": r.metric,
                "variant": r.variant.name(),
                "round": r.round,
                "value": r.value,
                "detail": r.detail,
            })
        })
        .collect();
    json!({
        "setup": facts,
        "summary": summary,
        "targets": targets,
        "runs": runs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(metric: &'static str, variant: Variant, round: usize, value: f64) -> Run {
        Run {
            metric,
            variant,
            round,
            value,
            detail: Value::Null,
        }
    }

    #[test]
    fn medians_ratios_and_targets() {
        let mut runs = Vec::new();
        for (round, (d, i, s)) in [(10.0, 5.0, 4.0), (12.0, 6.0, 3.0), (11.0, 4.0, 5.0)]
            .into_iter()
            .enumerate()
        {
            runs.push(run("tput_1", Variant::Direct, round + 1, d));
            runs.push(run("tput_1", Variant::Interceptor, round + 1, i));
            runs.push(run("tput_1", Variant::Stunnel, round + 1, s));
        }
        runs.push(run("rr1_p50", Variant::Direct, 1, 50.0));
        runs.push(run("rr1_p50", Variant::Interceptor, 1, 62.5));
        runs.push(run("conn_rate", Variant::Direct, 1, 10000.0));
        runs.push(run("conn_rate", Variant::Interceptor, 1, 5500.0));
        runs.push(run("conn_rate_50", Variant::Interceptor, 1, 3000.0));
        runs.push(run("reuse_50", Variant::Interceptor, 1, 0.99));
        let rows = rows(&runs);
        let keys: Vec<&str> = rows.iter().map(|r| r.metric.key).collect();
        // reuse_1 has no run but is shown with conn_rate; report order is kept.
        assert_eq!(
            keys,
            [
                "tput_1",
                "rr1_p50",
                "conn_rate",
                "reuse_1",
                "conn_rate_50",
                "reuse_50"
            ]
        );
        assert_eq!(rows[0].of(Variant::Direct), Some(11.0));
        assert_eq!(rows[0].versus_direct(), Some(5.0 / 11.0));
        assert_eq!(rows[0].versus_stunnel(), Some(5.0 / 4.0));
        assert_eq!(rows[0].added_over_direct(), None);
        assert_eq!(rows[1].versus_direct(), Some(1.25));
        assert_eq!(rows[1].added_over_direct(), Some(12.5));
        assert_eq!(rows[3].of(Variant::Interceptor), None);
        let targets = targets(&rows);
        // Connections: 0.55× direct, met and the moonshot too.
        assert_eq!(targets[0].met, Some(true));
        assert_eq!(targets[0].moonshot, Some(Some(true)));
        assert!(
            targets[0].measured.starts_with("0.55×"),
            "{}",
            targets[0].measured
        );
        // p50 1.25×: met, and the moonshot (≤ 1.25×) too; p99 did not run.
        assert_eq!(targets[1].met, Some(true));
        assert_eq!(targets[1].moonshot, Some(Some(true)));
        assert_eq!(targets[2].met, None);
        assert_eq!(targets[2].measured, "–");
        // Throughput 0.45× < 0.5×.
        assert_eq!(targets[3].met, Some(false));
        assert_eq!(targets[4].met, None);
        let text = table(&rows);
        assert!(
            text.contains(
                "| Throughput, 1 stream | Gbit/s | 11.00 | 5.00 | 4.00 | 0.45× | 1.25× |"
            ),
            "{text}"
        );
        assert!(text.contains("| 1.25× (+12.5 µs) |"), "{text}");
        assert!(
            text.contains(
                "| Tunnel reuse during new connections, 1 client pod | ratio | – | – | – | – | – |"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "| Tunnel reuse during new connections, 50 client pods | ratio | – | 0.990 | – | – | – |"
            ),
            "{text}"
        );
        let verdicts = targets_table(&targets);
        assert!(verdicts.contains("| met, moonshot too |"), "{verdicts}");
        assert!(verdicts.contains("| **missed** |"), "{verdicts}");
        assert!(verdicts.contains("| not measured |"), "{verdicts}");
    }
}
