//! `interceptor status`.

use std::{io::IsTerminal, time::Duration};

use clap::{Args, ValueEnum};

use super::AdminSocket;
use crate::{
    admin::{
        client,
        protocol::{Request, StatusReport},
    },
    dry_run, graph,
    records::{ConnectionRecord, Security, Verdict, unix_ms},
    status::{graph as status_graph, render},
};

/// Show what the mesh did on this node: per workload, connections over mutual TLS, in
/// plaintext and dropped, then recent connections, newest first; or, with --graph, who talks
/// to whom.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only dropped connections.
    #[arg(long)]
    dropped: bool,
    /// Only plaintext connections.
    #[arg(long)]
    plaintext: bool,
    /// Only connections of this workload (pod name).
    #[arg(long)]
    workload: Option<String>,
    /// Only connections of workloads in this namespace.
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Only connections that started within this long (e.g. 30s, 5m, 2h).
    #[arg(long, value_parser = parse_duration)]
    since: Option<Duration>,
    /// Keep running and print new records as they come.
    #[arg(long, conflicts_with = "graph")]
    watch: bool,
    /// Who talks to whom: one line per kind of connection between two workloads or callers,
    /// with a padlock on mutual TLS (the page on the agent's --metrics-addr draws the same).
    #[arg(long)]
    graph: bool,
    /// Output format: `table` fits 120 columns, `wide` shows every field.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(flatten)]
    admin: AdminSocket,
}

/// How status is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// A table for people, at most 120 columns: workloads instead of addresses where
    /// known, short identities.
    Table,
    /// The table with every field: addresses, full identities, duration, whole reasons.
    Wide,
    /// JSON for scripts (schema in ARCHITECTURE.md).
    Json,
}

/// Parses `90s`, `5m`, `2h`, `1d` or plain seconds.
pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, "s"), |i| text.split_at(i));
    let value: u64 = number.parse().map_err(|_| {
        format!("duration {text:?} must be a number with an optional unit s, m, h or d")
    })?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "duration {text:?} has unknown unit {other:?}; use s, m, h or d"
            ));
        }
    };
    Ok(Duration::from_secs(value * seconds))
}

/// Which records the user asked for.
pub struct Filter {
    dropped: bool,
    plaintext: bool,
    workload: Option<String>,
    namespace: Option<String>,
    since_unix_ms: Option<u64>,
}

impl Filter {
    fn from_args(args: &StatusArgs) -> Self {
        Self {
            dropped: args.dropped,
            plaintext: args.plaintext,
            workload: args.workload.clone(),
            namespace: args.namespace.clone(),
            since_unix_ms: args.since.map(|d| {
                unix_ms(std::time::SystemTime::now()).saturating_sub(d.as_millis() as u64)
            }),
        }
    }

    /// Whether a record passes every filter given.
    pub fn matches(&self, record: &ConnectionRecord) -> bool {
        let workloads = [
            &record.connection.source_workload,
            &record.connection.destination_workload,
        ];
        (!self.dropped || record.verdict == Verdict::Dropped)
            && (!self.plaintext || record.connection.security == Security::Plaintext)
            && self.workload.as_ref().is_none_or(|name| {
                workloads
                    .iter()
                    .any(|w| w.as_ref().is_some_and(|w| &w.name == name))
            })
            && self.namespace.as_ref().is_none_or(|ns| {
                workloads
                    .iter()
                    .any(|w| w.as_ref().is_some_and(|w| &w.namespace == ns))
            })
            && self
                .since_unix_ms
                .is_none_or(|since| record.start_unix_ms >= since)
    }
}

/// Runs `interceptor status`.
pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let filter = Filter::from_args(&args);
    let wide = args.output == Output::Wide;
    let colour = args.output != Output::Json && std::io::stdout().is_terminal();
    if args.watch {
        if args.output != Output::Json {
            println!("{}", render::record_header(wide));
        }
        client::stream(
            &args.admin.path,
            &Request::Watch,
            |record: ConnectionRecord| {
                if filter.matches(&record) {
                    let line = match args.output {
                        Output::Json => {
                            serde_json::to_string(&record).map_err(std::io::Error::other)?
                        }
                        Output::Table | Output::Wide => render::record_row(&record, colour, wide),
                    };
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{line}")?;
                    out.flush()?;
                }
                Ok(())
            },
        )?;
        return Ok(());
    }
    let mut report: StatusReport = client::call(&args.admin.path, &Request::Status)?;
    report.records.retain(|record| filter.matches(record));
    report.records.reverse();
    if args.graph {
        let now = unix_ms(std::time::SystemTime::now());
        let graph = graph::build(&report, args.since.map(|d| d.as_secs()), None, now);
        match args.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&graph)?),
            Output::Table | Output::Wide => print!("{}", status_graph::render(&graph, colour)),
        }
        return Ok(());
    }
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table | Output::Wide => {
            print!("{}", render::report(&report, colour, wide));
            print!(
                "{}",
                dry_run::render::plaintext_callers(&report.plaintext_callers)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("5w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("m").is_err());
    }
}
