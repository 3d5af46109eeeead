//! `[api]`: the bounds of the HTTPS API, so that no client, logged in or not, can hold
//! what the others need: connections (in all and per client address), how long a
//! connection may sit idle or take over its TLS handshake, and sessions (in all, per
//! user, idle and absolute lifetime). The API itself is [`crate::api`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The API's bounds. Each default is safe for an endpoint that faces the internet.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// Connections served at once, from every client together; one more waits in the
    /// kernel's backlog. Default 256, at least 1.
    pub max_connections: u32,
    /// Connections one client address (IPv4, or the /64 of an IPv6 address) may hold at
    /// once; a further one is closed right after it is accepted. Lower than
    /// `max_connections`, so that one client cannot hold them all. Default 32, at least 1.
    pub max_connections_per_client: u32,
    /// Seconds a client has to finish its TLS handshake. Default 10, at least 1.
    pub handshake_timeout_secs: u64,
    /// Seconds a connection may stay open with no request running (HTTP/2 included: a
    /// silent HTTP/2 client is closed with a GOAWAY). Default 60, at least 1.
    pub idle_timeout_secs: u64,
    /// Seconds between HTTP/2 pings while a connection is open, and seconds an answer
    /// may take before the connection counts as dead. Defaults 30 and 20, at least 1.
    pub keep_alive_interval_secs: u64,
    pub keep_alive_timeout_secs: u64,
    /// Sessions held at once, of all users; at the limit a new login is refused (no one
    /// else's session is ended for it). Default 1000, at least 1.
    pub max_sessions: u32,
    /// Sessions one user may hold; a further login ends that user's own least recently
    /// used session. Default 100, at least 1.
    pub max_sessions_per_user: u32,
    /// Seconds a session lives unused (vCenter's default: 30 minutes). Default 1800.
    pub session_idle_timeout_secs: u64,
    /// Seconds a session lives at most, however often it is used; then the client logs
    /// in again. Default 43200 (12 hours).
    pub session_max_lifetime_secs: u64,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            max_connections: 256,
            max_connections_per_client: 32,
            handshake_timeout_secs: 10,
            idle_timeout_secs: 60,
            keep_alive_interval_secs: 30,
            keep_alive_timeout_secs: 20,
            max_sessions: 1000,
            max_sessions_per_user: 100,
            session_idle_timeout_secs: 30 * 60,
            session_max_lifetime_secs: 12 * 3600,
        }
    }
}

impl ApiSettings {
    /// The first setting that must be at least 1 and is 0.
    pub(super) fn zero_setting(&self) -> Option<&'static str> {
        [
            ("api.max_connections", u64::from(self.max_connections)),
            (
                "api.max_connections_per_client",
                u64::from(self.max_connections_per_client),
            ),
            ("api.handshake_timeout_secs", self.handshake_timeout_secs),
            ("api.idle_timeout_secs", self.idle_timeout_secs),
            ("api.keep_alive_interval_secs", self.keep_alive_interval_secs),
            ("api.keep_alive_timeout_secs", self.keep_alive_timeout_secs),
            ("api.max_sessions", u64::from(self.max_sessions)),
            ("api.max_sessions_per_user", u64::from(self.max_sessions_per_user)),
            ("api.session_idle_timeout_secs", self.session_idle_timeout_secs),
            ("api.session_max_lifetime_secs", self.session_max_lifetime_secs),
        ]
        .into_iter()
        .find_map(|(key, value)| (value == 0).then_some(key))
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    pub fn keep_alive_interval(&self) -> Duration {
        Duration::from_secs(self.keep_alive_interval_secs)
    }

    pub fn keep_alive_timeout(&self) -> Duration {
        Duration::from_secs(self.keep_alive_timeout_secs)
    }

    pub fn session_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.session_idle_timeout_secs)
    }

    pub fn session_max_lifetime(&self) -> Duration {
        Duration::from_secs(self.session_max_lifetime_secs)
    }
}

/// The `[api]` part of the example config file.
pub(super) const EXAMPLE_TOML: &str = r#"
# Bounds of the HTTPS API, so that no client can hold what the others need.
[api]
# Connections at once, in all and per client address (IPv4, or the /64 of an IPv6
# address). One client cannot hold them all; clients behind one NAT share its limit.
max_connections = 256
max_connections_per_client = 32
# Seconds for the TLS handshake, and seconds a connection may stay open with no request
# running (a silent HTTP/2 client is closed too).
handshake_timeout_secs = 10
idle_timeout_secs = 60
# HTTP/2 pings: every `keep_alive_interval_secs`; no answer within
# `keep_alive_timeout_secs` closes the connection (a dead client frees its slot).
keep_alive_interval_secs = 30
keep_alive_timeout_secs = 20
# Sessions: at most `max_sessions` in all (a login beyond it is refused, no one else's
# session is ended for it) and `max_sessions_per_user` per user (a further login of that
# user ends its own least recently used session). A session ends after
# `session_idle_timeout_secs` unused, and `session_max_lifetime_secs` after its login.
max_sessions = 1000
max_sessions_per_user = 100
session_idle_timeout_secs = 1800
session_max_lifetime_secs = 43200
"#;
