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
}

/// Every metric, in report order.
pub const METRICS: &[Metric] = &[
    Metric {
        key: "tput_1",
        label: "Throughput, 1 stream",
        unit: "Gbit/s",
        higher_is_better: true,
    },
    Metric {
        key: "tput_4",
        label: "Throughput, 4 streams",
        unit: "Gbit/s",
        higher_is_better: true,
    },
    Metric {
        key: "rr1_p50",
        label: "1 B request/response, p50",
        unit: "µs",
        higher_is_better: false,
    },
    Metric {
        key: "rr1_p99",
        label: "1 B request/response, p99",
        unit: "µs",
        higher_is_better: false,
    },
    Metric {
        key: "rr1k_p50",
        label: "1 KiB request/response, p50",
        unit: "µs",
        higher_is_better: false,
    },
    Metric {
        key: "rr1k_p99",
        label: "1 KiB request/response, p99",
        unit: "µs",
        higher_is_better: false,
    },
    Metric {
        key: "conn_rate",
        label: "New connections (64 B each way)",
        unit: "conn/s",
        higher_is_better: true,
    },
    Metric {
        key: "mem_1000",
        label: "Proxy RSS growth per 1,000 idle connections, both ends",
        unit: "MiB",
        higher_is_better: false,
    },
    Metric {
        key: "cpu_gb_1",
        label: "Proxy CPU per GB, 1 stream, both ends",
        unit: "s/GB",
        higher_is_better: false,
    },
    Metric {
        key: "cpu_gb_4",
        label: "Proxy CPU per GB, 4 streams, both ends",
        unit: "s/GB",
        higher_is_better: false,
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

    /// The interceptor against direct: a ratio, or the added time for latencies.
    pub fn versus_direct(&self) -> Option<f64> {
        let (mesh, direct) = (self.of(Variant::Interceptor), self.of(Variant::Direct));
        if self.metric.unit == "µs" {
            difference(mesh, direct)
        } else {
            ratio(mesh, direct)
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
            if values.iter().all(Vec::is_empty) {
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

/// A target of the issue, checked against the medians.
pub struct Target {
    /// What is asked.
    pub goal: String,
    /// What was measured.
    pub measured: String,
    /// Met, missed, or unknown when the metric did not run.
    pub met: Option<bool>,
}

/// The targets for this machine.
pub fn targets(rows: &[Row]) -> Vec<Target> {
    let row = |key: &str| rows.iter().find(|r| r.metric.key == key);
    let mut out = Vec::new();
    for (key, streams) in [("tput_1", "1 stream"), ("tput_4", "4 streams")] {
        let r = row(key);
        let vs_direct = r.and_then(Row::versus_direct);
        let vs_stunnel = r.and_then(Row::versus_stunnel);
        out.push(Target {
            goal: format!("throughput ({streams}) ≥ 0.45 × direct and above stunnel"),
            measured: format!(
                "{} × direct, {} × stunnel",
                fmt(vs_direct, 2),
                fmt(vs_stunnel, 2)
            ),
            met: vs_direct.zip(vs_stunnel).map(|(d, s)| d >= 0.45 && s > 1.0),
        });
    }
    for (key, limit) in [("rr1_p50", 40.0), ("rr1_p99", 100.0)] {
        let added = row(key).and_then(Row::versus_direct);
        let pct = &key[4..];
        out.push(Target {
            goal: format!("1 B request/response {pct} ≤ {limit} µs over direct"),
            measured: format!("+{} µs", fmt(added, 1)),
            met: added.map(|a| a <= limit),
        });
    }
    let rate = row("conn_rate").and_then(|r| r.of(Variant::Interceptor));
    out.push(Target {
        goal: "≥ 5,000 new connections/s through the mesh".into(),
        measured: format!("{} /s", fmt(rate, 0)),
        met: rate.map(|r| r >= 5000.0),
    });
    // MiB per 1,000 connections to KiB per connection.
    let memory = row("mem_1000")
        .and_then(|r| r.of(Variant::Interceptor))
        .map(|mib| mib * 1024.0 / 1000.0);
    out.push(Target {
        goal: "≤ 64 KiB of agent memory per proxied connection, both agents".into(),
        measured: format!("{} KiB", fmt(memory, 1)),
        met: memory.map(|m| m <= 64.0),
    });
    out
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
        "Gbit/s" | "s/GB" => 2,
        "conn/s" => 0,
        _ => 1,
    }
}

fn versus_direct_text(row: &Row) -> String {
    match row.versus_direct() {
        None => "–".into(),
        Some(v) if row.metric.unit == "µs" => format!("{v:+.1} µs"),
        Some(v) => format!("{v:.2}×"),
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
        let verdict = match target.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not measured",
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
                "interceptor_vs_direct_kind": if row.metric.unit == "µs" { "added_us" } else { "ratio" },
                "interceptor_vs_stunnel": row.versus_stunnel(),
            })
        })
        .collect();
    let targets: Vec<Value> = targets
        .iter()
        .map(|t| json!({"target": t.goal, "measured": t.measured, "met": t.met}))
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
        runs.push(run("rr1_p50", Variant::Interceptor, 1, 95.0));
        let rows = rows(&runs);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].of(Variant::Direct), Some(11.0));
        assert_eq!(rows[0].versus_direct(), Some(5.0 / 11.0));
        assert_eq!(rows[0].versus_stunnel(), Some(5.0 / 4.0));
        assert_eq!(rows[1].versus_direct(), Some(45.0));
        let targets = targets(&rows);
        assert_eq!(targets[0].met, Some(true));
        assert_eq!(targets[1].met, None);
        assert_eq!(targets[2].met, Some(false));
        let text = table(&rows);
        assert!(
            text.contains(
                "| Throughput, 1 stream | Gbit/s | 11.00 | 5.00 | 4.00 | 0.45× | 1.25× |"
            ),
            "{text}"
        );
        assert!(text.contains("+45.0 µs"), "{text}");
    }
}
