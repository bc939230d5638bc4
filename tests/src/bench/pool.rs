//! The tunnel pool's reuse ratio, read from the client-side agent's `/metrics` (Prometheus
//! text) before and after a new-connections measurement.
//!
//! The agent counts, per source pod, the HBONE tunnels it opened
//! (`interceptor_hbone_tunnels_opened_total`) and the streams it opened over them
//! (`interceptor_hbone_streams_opened_total`), both labelled `workload` (the pod) and
//! `workload_namespace`. Over a measurement, reuse = (streams − tunnels) / streams: 0 when
//! every connection opened its own tunnel, near 1 when nearly all rode an open one. An agent
//! that does not expose the counters gives no ratio, never a guessed one.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// Tunnels opened, per source pod.
pub const TUNNELS: &str = "interceptor_hbone_tunnels_opened_total";
/// Streams opened over tunnels, per source pod.
pub const STREAMS: &str = "interceptor_hbone_streams_opened_total";

/// A pod as the counters label it: (namespace, name).
pub type PodKey = (String, String);

/// One counter family's values per pod, as one scrape showed them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Family {
    /// Value per (namespace, pod); a pod without a sample has not counted anything yet.
    pub per_pod: BTreeMap<PodKey, f64>,
}

impl Family {
    /// The sum over `pods` (a pod without a sample counts 0).
    fn sum(&self, pods: &[PodKey]) -> f64 {
        pods.iter()
            .map(|pod| self.per_pod.get(pod).copied().unwrap_or(0.0))
            .sum()
    }
}

/// The pool counters of one scrape; `None` for a family the agent does not expose.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scrape {
    /// [`TUNNELS`].
    pub tunnels: Option<Family>,
    /// [`STREAMS`].
    pub streams: Option<Family>,
}

impl Scrape {
    /// Reads both families out of a Prometheus text exposition. A family counts as exposed
    /// when it has a `# TYPE` line or at least one sample.
    pub fn parse(text: &str) -> Scrape {
        Scrape {
            tunnels: family(text, TUNNELS),
            streams: family(text, STREAMS),
        }
    }
}

fn family(text: &str, name: &str) -> Option<Family> {
    let mut exposed = false;
    let mut per_pod = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            exposed |= rest.split_whitespace().next() == Some(name);
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // `name{labels} value [timestamp]` or `name value`; a longer name is another family.
        let (labels, value) = if let Some(inner) = rest.strip_prefix('{') {
            let Some((labels, after)) = split_labels(inner) else {
                continue;
            };
            (labels, after)
        } else if rest.starts_with([' ', '\t']) {
            (Vec::new(), rest)
        } else {
            continue;
        };
        let Some(value) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        exposed = true;
        let label = |key: &str| {
            labels
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        *per_pod
            .entry((label("workload_namespace"), label("workload")))
            .or_insert(0.0) += value;
    }
    exposed.then_some(Family { per_pod })
}

/// Parses `key="value",...}` (after the opening brace); returns the labels and the text after
/// the closing brace, or `None` when malformed.
fn split_labels(text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = rest.split_once('=')?;
        let mut chars = after.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.push((key.trim().to_owned(), value));
        rest = &after[1 + end + 1..];
    }
}

/// What the counters said about one measurement.
#[derive(Clone, Debug, PartialEq)]
pub enum Reuse {
    /// Both counters moved as expected.
    Measured {
        /// Tunnels opened during the measurement, summed over the pods.
        tunnels: f64,
        /// Streams opened during the measurement, summed over the pods.
        streams: f64,
    },
    /// No ratio, and why.
    Unknown(String),
}

impl Reuse {
    /// Compares two scrapes of the same agent process for `pods`. A family missing from the
    /// first scrape but present in the second counts as zero before (its counters had not
    /// been incremented yet); missing from the second, there is no ratio.
    pub fn between(before: &Scrape, after: &Scrape, pods: &[PodKey]) -> Reuse {
        let (Some(tunnels_after), Some(streams_after)) = (&after.tunnels, &after.streams) else {
            return Reuse::Unknown(format!(
                "agent 1 does not expose {TUNNELS} and {STREAMS} on /metrics"
            ));
        };
        let empty = Family::default();
        let tunnels = tunnels_after.sum(pods) - before.tunnels.as_ref().unwrap_or(&empty).sum(pods);
        let streams = streams_after.sum(pods) - before.streams.as_ref().unwrap_or(&empty).sum(pods);
        if tunnels < 0.0 || streams < 0.0 {
            return Reuse::Unknown("the counters went down (was the agent restarted?)".into());
        }
        if streams == 0.0 {
            return Reuse::Unknown("no streams were counted for these pods".into());
        }
        Reuse::Measured { tunnels, streams }
    }

    /// (streams − tunnels) / streams, when measured.
    pub fn ratio(&self) -> Option<f64> {
        match self {
            Reuse::Measured { tunnels, streams } => Some((streams - tunnels) / streams),
            Reuse::Unknown(_) => None,
        }
    }

    /// For the JSON file.
    pub fn detail(&self) -> Value {
        match self {
            Reuse::Measured { tunnels, streams } => json!({
                "tunnels_opened": tunnels,
                "streams_opened": streams,
                "reuse_ratio": self.ratio(),
            }),
            Reuse::Unknown(why) => json!({"reuse_ratio": null, "why": why}),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> PodKey {
        ("default".into(), name.into())
    }

    const BEFORE: &str = "\
# HELP interceptor_hbone_tunnels_opened_total TLS tunnels opened.
# TYPE interceptor_hbone_tunnels_opened_total counter
interceptor_hbone_tunnels_opened_total{workload=\"client\",workload_namespace=\"default\"} 2
interceptor_hbone_tunnels_opened_total{workload=\"other\",workload_namespace=\"default\"} 7
# TYPE interceptor_hbone_streams_opened_total counter
interceptor_hbone_streams_opened_total{workload=\"client\",workload_namespace=\"default\"} 10
interceptor_hbone_streams_opened_total_created{workload=\"client\",workload_namespace=\"default\"} 99
";

    const AFTER: &str = "\
# TYPE interceptor_hbone_tunnels_opened_total counter
interceptor_hbone_tunnels_opened_total{workload_namespace=\"default\",workload=\"client\"} 4
interceptor_hbone_tunnels_opened_total{workload=\"other\",workload_namespace=\"default\"} 50
interceptor_hbone_tunnels_opened_total{workload=\"we\\\"ird,}\",workload_namespace=\"default\"} 1 1700000000
# TYPE interceptor_hbone_streams_opened_total counter
interceptor_hbone_streams_opened_total{workload=\"client\",workload_namespace=\"default\"} 110
interceptor_hbone_streams_opened_total{workload=\"we\\\"ird,}\",workload_namespace=\"default\"} 3
";

    #[test]
    fn reads_counters_per_pod() {
        let scrape = Scrape::parse(AFTER);
        let tunnels = scrape.tunnels.unwrap();
        assert_eq!(tunnels.per_pod[&pod("client")], 4.0);
        assert_eq!(tunnels.per_pod[&pod("other")], 50.0);
        assert_eq!(tunnels.per_pod[&pod("we\"ird,}")], 1.0);
        // A longer metric name is another family.
        let before = Scrape::parse(BEFORE);
        assert_eq!(before.streams.unwrap().per_pod[&pod("client")], 10.0);
    }

    #[test]
    fn ratio_counts_only_the_pods_measured() {
        let reuse = Reuse::between(
            &Scrape::parse(BEFORE),
            &Scrape::parse(AFTER),
            &[pod("client")],
        );
        assert_eq!(
            reuse,
            Reuse::Measured {
                tunnels: 2.0,
                streams: 100.0
            }
        );
        assert_eq!(reuse.ratio(), Some(0.98));
        // Two pods: a pod with no sample before counts from zero.
        let both = Reuse::between(
            &Scrape::parse(BEFORE),
            &Scrape::parse(AFTER),
            &[pod("client"), pod("we\"ird,}")],
        );
        assert_eq!(both.ratio(), Some((103.0 - 3.0) / 103.0));
    }

    #[test]
    fn missing_counters_give_no_ratio() {
        let today = "# TYPE istio_tcp_connections_opened_total counter\n\
                     istio_tcp_connections_opened_total{reporter=\"source\"} 5\n";
        let reuse = Reuse::between(
            &Scrape::parse(today),
            &Scrape::parse(today),
            &[pod("client")],
        );
        assert!(matches!(reuse, Reuse::Unknown(_)), "{reuse:?}");
        assert_eq!(reuse.ratio(), None);
        // Exposed only after the measurement: counted from zero.
        let later = Reuse::between(
            &Scrape::parse(today),
            &Scrape::parse(AFTER),
            &[pod("client")],
        );
        assert_eq!(later.ratio(), Some((110.0 - 4.0) / 110.0));
        // Nothing counted for the pods, or counters that went down: no ratio.
        let none = Reuse::between(&Scrape::parse(AFTER), &Scrape::parse(AFTER), &[pod("x")]);
        assert_eq!(none.ratio(), None);
        let down = Reuse::between(
            &Scrape::parse(AFTER),
            &Scrape::parse(BEFORE),
            &[pod("client")],
        );
        assert_eq!(down.ratio(), None);
    }
}
