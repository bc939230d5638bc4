//! The traffic graph page on the metrics port: `/` (the page), `/graph/app.js`,
//! `/graph/style.css`, `/graph/icon.svg` and `/graph.json` (the data).
//!
//! Every asset is compiled into the binary, so the page works with no network access. The
//! page and its data are read-only: nothing here changes the agent, and the metrics server
//! answers only GET and HEAD. Names taken from workloads and policies reach the browser only
//! inside JSON, and the script puts them into the page as text, never as markup; the
//! Content-Security-Policy allows no inline script and no other origin, as a second wall.

use crate::{
    graph::{self, Graph},
    metrics::StatusSource,
    records::unix_ms,
};

const PAGE: &str = include_str!("../assets/graph/index.html");
const SCRIPT: &str = include_str!("../assets/graph/app.js");
const STYLE: &str = include_str!("../assets/graph/style.css");
const ICON: &str = include_str!("../assets/graph/icon.svg");

/// Scripts and styles only from the agent itself, data only from it, no frames, no forms.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// An HTTP answer of the page's routes.
pub struct Reply {
    /// Status line text, e.g. `200 OK`.
    pub status: &'static str,
    /// Content-Type.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Reply {
    fn ok(content_type: &'static str, body: impl Into<String>) -> Self {
        Reply {
            status: "200 OK",
            content_type,
            body: body.into(),
        }
    }
}

/// Answers a GET of `path` with `query` (the text after `?`), or `None` when the path is not
/// the page's.
pub async fn route(path: &str, query: &str, status: &dyn StatusSource) -> Option<Reply> {
    Some(match path {
        "/" | "/graph" => Reply::ok("text/html; charset=utf-8", PAGE),
        "/graph/app.js" => Reply::ok("text/javascript; charset=utf-8", SCRIPT),
        "/graph/style.css" => Reply::ok("text/css; charset=utf-8", STYLE),
        "/graph/icon.svg" => Reply::ok("image/svg+xml", ICON),
        "/graph.json" => match window(query) {
            Ok(window_secs) => {
                let graph = graph_of(status, window_secs).await;
                match serde_json::to_string(&graph) {
                    Ok(json) => Reply::ok("application/json", json),
                    Err(err) => Reply {
                        status: "500 Internal Server Error",
                        content_type: "text/plain; charset=utf-8",
                        body: format!("cannot encode the graph: {err}\n"),
                    },
                }
            }
            Err(message) => Reply {
                status: "400 Bad Request",
                content_type: "text/plain; charset=utf-8",
                body: message,
            },
        },
        _ => return None,
    })
}

/// The graph of the agent's status now, over the last `window_secs` (all records if `None`).
async fn graph_of(status: &dyn StatusSource, window_secs: Option<u64>) -> Graph {
    let report = status.status().await;
    let now = unix_ms(std::time::SystemTime::now());
    let since = window_secs.map(|w| now.saturating_sub(w.saturating_mul(1000)));
    graph::build(&report, window_secs, since, now)
}

/// `window=<seconds>` from a query string; absent or 0 means every record kept.
fn window(query: &str) -> Result<Option<u64>, String> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == "window" {
            return match value.parse::<u64>() {
                Ok(0) => Ok(None),
                Ok(secs) => Ok(Some(secs)),
                Err(_) => Err(format!(
                    "/graph.json: window={value:?} must be a number of seconds (0 for every \
                     record kept)\n"
                )),
            };
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_parameter() {
        assert_eq!(window(""), Ok(None));
        assert_eq!(window("window=300"), Ok(Some(300)));
        assert_eq!(window("x=1&window=0"), Ok(None));
        assert!(window("window=5m").unwrap_err().contains("seconds"));
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere_and_has_no_inline_script() {
        for asset in [PAGE, SCRIPT, STYLE, ICON] {
            for needle in ["http://", "https://", "//cdn", "@import"] {
                let found = asset
                    .match_indices(needle)
                    .any(|(i, _)| !asset[i..].starts_with("http://www.w3.org/"));
                assert!(!found, "{needle} in an asset");
            }
        }
        assert!(PAGE.contains("src=\"/graph/app.js\""));
        assert_eq!(
            PAGE.matches("<script").count(),
            1,
            "only the external script"
        );
        assert!(!SCRIPT.contains("innerHTML") && !SCRIPT.contains("insertAdjacentHTML"));
        assert!(!SCRIPT.contains("eval("));
    }
}
