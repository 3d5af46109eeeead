//! `[metrics]`: where Prometheus scrapes the endpoint (docs/operations.md).
//!
//! Two ways, as operators usually run them: a plain-HTTP listener of its own
//! (`metrics.listen`, off by default) on an address only the monitoring network reaches,
//! with no credentials, which is what a Prometheus scrape job expects; and `GET /metrics`
//! on the HTTPS API port, for a scraper that comes through the same door as API clients:
//! it needs an API session, or the bearer token `metrics.bearer_token` when one is set
//! (Prometheus' `authorization` setting sends it).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// TCP address of a plain-HTTP listener serving `GET /metrics` without credentials, or
    /// "off" (default). Bind it to a loopback or monitoring-network address: the metrics
    /// name migrations, datastores and the host.
    #[serde(with = "super::api_listen_setting")]
    pub listen: Option<SocketAddr>,
    /// A token that lets a scraper read `GET /metrics` on the HTTPS API port with
    /// `Authorization: Bearer TOKEN` instead of a session. Default none (a session is
    /// needed there). Prefer the variable CLOUD_ENDPOINT_METRICS__BEARER_TOKEN to the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token: Option<String>,
}

pub(super) const EXAMPLE_TOML: &str = r#"
# Prometheus metrics (docs/operations.md lists them).
[metrics]
# A plain-HTTP listener serving GET /metrics with no credentials, e.g. "127.0.0.1:9464",
# or "off". Bind it to an address only the monitoring network reaches.
listen = "off"
# GET /metrics on the HTTPS API port needs an API session, or this bearer token when set
# (better from the variable CLOUD_ENDPOINT_METRICS__BEARER_TOKEN than from this file).
# bearer_token = "..."
"#;
