//! `[logins]`: how many wrong passwords a user and a client address may try, and for how
//! long they are then refused. The policy itself is [`crate::logins`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The login throttle's settings. The user lockout follows vCenter SSO's lockout policy
/// (5 failures within 180 s lock the account for 300 s); the per-address limit is ours.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoginSettings {
    /// A user is locked out once this many different client addresses failed to log in
    /// as it within `failure_interval_secs`. Default 5, at least 1.
    pub max_failed_attempts: u32,
    /// How long a failure counts, in seconds. Default 180, at least 1.
    pub failure_interval_secs: u64,
    /// How long a locked-out user, or a blocked address, is refused, in seconds. Default
    /// 300, at least 1.
    pub unlock_time_secs: u64,
    /// An address is blocked (for every user) at this many failures within
    /// `failure_interval_secs`. Default 5, at least 1.
    pub source_max_failed_attempts: u32,
    /// After an address's second failure it waits this long before it may try again (the
    /// failure's answer is held that long), twice as long after each further failure.
    /// Default 1000 ms; 0 = no delays.
    pub source_delay_ms: u64,
    /// Users and addresses remembered, each; the least recently seen are forgotten first
    /// beyond it. Default 10000, at least 1.
    pub max_tracked: u32,
    /// Logins waiting for (or having) a password check at once, from every client
    /// together; a further one is refused at once as busy (API: 503 with Retry-After;
    /// QUIC: a Busy refusal), so that a flood cannot queue real users behind it.
    /// Default 64, at least 1.
    pub max_waiting: u32,
    /// The same per client address: one address cannot take the whole queue.
    /// Default 8, at least 1.
    pub max_waiting_per_source: u32,
    /// Password checks that run at once; the logins waiting for one are served one
    /// client address after the other (round-robin), so that one address's waiting logins
    /// delay another address's by one check, not by all of them. Default 4, at least 1;
    /// more than 4 run as 4 (each check holds 19 MiB and a core for about 20 ms).
    pub max_concurrent_checks: u32,
}

impl Default for LoginSettings {
    fn default() -> Self {
        LoginSettings {
            max_failed_attempts: 5,
            failure_interval_secs: 180,
            unlock_time_secs: 300,
            source_max_failed_attempts: 5,
            source_delay_ms: 1000,
            max_tracked: 10_000,
            max_waiting: 64,
            max_waiting_per_source: 8,
            max_concurrent_checks: 4,
        }
    }
}

impl LoginSettings {
    /// The first setting that must be at least 1 and is 0.
    pub(super) fn zero_setting(&self) -> Option<&'static str> {
        [
            ("logins.max_failed_attempts", u64::from(self.max_failed_attempts)),
            ("logins.failure_interval_secs", self.failure_interval_secs),
            ("logins.unlock_time_secs", self.unlock_time_secs),
            (
                "logins.source_max_failed_attempts",
                u64::from(self.source_max_failed_attempts),
            ),
            ("logins.max_tracked", u64::from(self.max_tracked)),
            ("logins.max_waiting", u64::from(self.max_waiting)),
            ("logins.max_waiting_per_source", u64::from(self.max_waiting_per_source)),
            ("logins.max_concurrent_checks", u64::from(self.max_concurrent_checks)),
        ]
        .into_iter()
        .find_map(|(key, value)| (value == 0).then_some(key))
    }

    pub fn failure_interval(&self) -> Duration {
        Duration::from_secs(self.failure_interval_secs)
    }

    pub fn unlock_time(&self) -> Duration {
        Duration::from_secs(self.unlock_time_secs)
    }

    pub fn source_delay(&self) -> Duration {
        Duration::from_millis(self.source_delay_ms)
    }
}

/// The `[logins]` part of the example config file.
pub(super) const EXAMPLE_TOML: &str = r#"
# Wrong passwords (REST, vAPI and edge agents alike). Each try costs the endpoint an
# argon2 hash (about 20 ms of a core), so tries are refused before any hash once a
# limit is reached. A refused client is told until when; nothing tells whether the
# password it sent was right.
[logins]
# Per client address (IPv4, or the /64 of an IPv6 address): after its second failure an
# address waits `source_delay_ms` before its next try (the failure is answered that much
# later; a try sent meanwhile is refused), twice as long after each further failure, and
# at `source_max_failed_attempts` failures within `failure_interval_secs` it is blocked
# for `unlock_time_secs`, whichever user it tries. One guessing address is stopped here
# and never locks a user out (clients sharing an address behind NAT are blocked with it).
source_max_failed_attempts = 5
source_delay_ms = 1000
# Per user, against guessing from many addresses (vCenter SSO's lockout policy): once
# `max_failed_attempts` different addresses failed as one user within
# `failure_interval_secs`, that user is locked out for `unlock_time_secs`, also with
# the right password. The trade-off: whoever controls that many addresses can lock a
# user out for a while; a lower number locks out sooner, and more easily.
max_failed_attempts = 5
failure_interval_secs = 180
unlock_time_secs = 300
# Users and addresses remembered (each); beyond it the least recently seen are forgotten.
max_tracked = 10000
# Logins waiting for a password check (about 20 ms of a core each, four at a time), in
# all and per client address; a further one is refused at once as busy (the API answers
# 503 with Retry-After), so that a flood of logins cannot queue real users behind it.
max_waiting = 64
max_waiting_per_source = 8
# Password checks at once (at most 4); the waiting logins are served one client address
# after the other, so an address with many logins waiting delays another by one check.
max_concurrent_checks = 4
"#;

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{Config, ConfigError};
    use super::*;

    fn env(list: &[(&str, &str)]) -> Vec<(String, String)> {
        let paths = [
            ("CLOUD_ENDPOINT_CERT", "/pki/endpoint.pem"),
            ("CLOUD_ENDPOINT_KEY", "/pki/endpoint.key"),
            ("CLOUD_ENDPOINT_EDGE_CA", "/pki/ca.pem"),
        ];
        paths
            .iter()
            .chain(list)
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn from_file(dir: &Path, text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let file = dir.join("cloud.toml");
        std::fs::write(&file, text).unwrap();
        Config::load_with_env(Some(&file), &env(vars))
    }

    #[test]
    fn the_defaults_are_vcenters_lockout_policy_and_the_example_shows_them() {
        let c = Config::load_with_env(None, &env(&[])).unwrap();
        assert_eq!(c.logins, LoginSettings::default());
        assert_eq!(c.logins.max_failed_attempts, 5);
        assert_eq!(c.logins.failure_interval(), Duration::from_secs(180));
        assert_eq!(c.logins.unlock_time(), Duration::from_secs(300));
        let dir = tempfile::tempdir().unwrap();
        let example = from_file(dir.path(), &Config::example_toml(), &[]).unwrap();
        assert_eq!(example.logins, LoginSettings::default());
        assert!(Config::example_toml().contains("[logins]\n"));
    }

    #[test]
    fn settings_come_from_file_or_environment_and_zero_limits_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = from_file(
            dir.path(),
            "[logins]\nunlock_time_secs = 2\nsource_delay_ms = 0\n",
            &[("CLOUD_ENDPOINT_LOGINS__MAX_FAILED_ATTEMPTS", "3")],
        )
        .unwrap();
        assert_eq!(c.logins.unlock_time(), Duration::from_secs(2));
        assert_eq!(c.logins.source_delay(), Duration::ZERO);
        assert_eq!(c.logins.max_failed_attempts, 3);
        assert_eq!(c.logins.failure_interval_secs, 180);

        let err = from_file(dir.path(), "", &[("CLOUD_ENDPOINT_LOGINS__MAX_TRACKED", "0")]).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                ConfigError::ZeroLoginLimit {
                    key: "logins.max_tracked",
                    ..
                }
            ) && msg.contains("CLOUD_ENDPOINT_LOGINS__MAX_TRACKED")
                && msg.contains("at least 1"),
            "{msg}"
        );
        let err = from_file(dir.path(), "[logins]\nunlock_time_secs = 0\n", &[]).unwrap_err();
        assert!(err.to_string().contains("logins.unlock_time_secs"), "{err}");
        let err = from_file(dir.path(), "[logins]\nlockout_secs = 3\n", &[]).unwrap_err();
        assert!(err.to_string().contains("lockout_secs"), "{err}");
    }
}
