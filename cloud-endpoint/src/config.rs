//! The cloud endpoint's configuration: built-in defaults, then a TOML file, then
//! environment variables prefixed `CLOUD_ENDPOINT_`.
//!
//! Nested keys use a double underscore in the environment:
//! `CLOUD_ENDPOINT_DOMAIN__DATASTORE__NAME=ds2` sets `domain.datastore.name`. Lists take
//! figment's inline syntax: `CLOUD_ENDPOINT_DOMAIN__NETWORKS='["VM Network","web"]'`.
//! An empty variable counts as unset. Relative paths given in the TOML file are resolved
//! against the file's folder; those from the environment or the defaults stay relative to
//! the working directory.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use gateway::plan::DiskFormat;
use serde::{Deserialize, Serialize};

mod api;
mod logins;
mod metrics;

pub use api::ApiSettings;
pub use logins::LoginSettings;
pub use metrics::MetricsSettings;

/// Prefix of every environment variable the configuration reads.
pub const ENV_PREFIX: &str = "CLOUD_ENDPOINT_";

/// Variables under [`ENV_PREFIX`] that are not settings (the binary's own options, such as
/// the config file path or the log filter); the loader skips them instead of rejecting them
/// as unknown keys.
pub const RESERVED_ENV_VARS: &[&str] = &[
    "CLOUD_ENDPOINT_CONFIG",
    "CLOUD_ENDPOINT_LOG",
    "CLOUD_ENDPOINT_LOG_FORMAT",
    crate::server::placement::CRASH_AT_ENV,
];

/// Password of the built-in demo users. Anyone who reads this file knows it: replace the
/// users (or their passwords) in the config file before exposing an endpoint.
pub const DEMO_PASSWORD: &str = "VMware1!Cloud";

/// The user each VM's QEMU runs as when the endpoint runs as root, unless `qemu_user`
/// names another.
pub const DEFAULT_QEMU_USER: &str = "gateway-qemu";

/// The whole configuration of a cloud endpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// UDP address the QUIC server binds. Default `127.0.0.1:4433`.
    pub listen: SocketAddr,
    /// TCP address of the vSphere REST API (HTTPS, the endpoint's certificate, user and
    /// password logins). Default `127.0.0.1:8443`; `"off"` serves no API.
    #[serde(with = "api_listen_setting")]
    pub api_listen: Option<SocketAddr>,
    /// The endpoint's certificate chain (PEM). Required.
    pub cert: PathBuf,
    /// The private key of `cert` (PEM). Required.
    pub key: PathBuf,
    /// CA bundle (PEM) that issued the edge-agent certificates this endpoint trusts. Required.
    pub edge_ca: PathBuf,
    /// A file of revoked edge certificate serial numbers (hex, one per line), checked
    /// right after each handshake and read again when it changes. Default none.
    #[serde(default)]
    pub revoked_edge_serials: Option<PathBuf>,
    /// Folder of the cloud datastore (VM folders, staging). Default `./datastore`.
    pub datastore_dir: PathBuf,
    /// SQLite file of the inventory. Default `./inventory.sqlite3`.
    pub database: PathBuf,
    /// A PostgreSQL database that holds the inventory instead of `database`, shared by
    /// every endpoint of a scale-out domain (`postgres://user:password@host:5432/db`;
    /// `CLOUD_ENDPOINT_DATABASE_URL` keeps the password out of the file). Each endpoint
    /// is the host `domain.host.name` of the domain's cluster. Default none: SQLite.
    #[serde(default)]
    pub database_url: Option<String>,
    /// Seconds a migration's lease lasts: the endpoint serving a migration renews it
    /// every third of this; if that endpoint dies, another may take the migration over
    /// (its edge resumes there) once the lease expired. Default 10; 2 to 300.
    pub migration_lease_secs: u32,
    /// Migrations accepted at once; more wait. Default 32, at least 1.
    pub max_concurrent_migrations: u32,
    /// How long a migration whose connection ended (a dropped link, a killed edge, an
    /// endpoint restart) waits for its edge to resume it before its files are removed.
    /// Default 24 hours.
    pub resume_window_hours: u64,
    /// Which staged chunks are read back and checked before a VM is registered and its
    /// receipt signed: "all" (default) or "resumed" (only those an earlier connection
    /// wrote, taken from the journal).
    pub verify_staged: VerifyStaged,
    /// At a stop (SIGTERM, Ctrl-C), the seconds running migrations get to reach a
    /// resumable state (written chunks synced and journaled) and their connections to
    /// close before the endpoint exits. Default 8, under the 10 s a container engine
    /// waits before it kills; at least 1. A second signal exits at once.
    pub shutdown_grace_secs: u32,
    /// The vCenter-like domain migrated VMs land in.
    pub domain: DomainConfig,
    /// Limits on `edge-agent link-test` (test traffic an edge may ask for).
    pub link_test: LinkTestConfig,
    /// The WAN path edges come over, and bandwidth caps.
    pub transport: TransportSettings,
    /// Limits on wrong passwords, per user and per client address.
    pub logins: LoginSettings,
    /// Bounds of the HTTPS API: connections, idle and handshake times, sessions.
    pub api: ApiSettings,
    /// Where Prometheus scrapes the endpoint: a listener of its own, and who may read
    /// `GET /metrics` on the API port.
    pub metrics: MetricsSettings,
    /// The unprivileged user each VM's QEMU runs as when the endpoint runs as root (it
    /// must exist; `tests/setup.sh` creates it). Default `gateway-qemu`.
    pub qemu_user: String,
    /// Serve on an address other than loopback although a user still has the demo
    /// password ([`DEMO_PASSWORD`]). Default false: the endpoint refuses to start. Only
    /// for a lab; a warning says so at every start.
    pub allow_default_passwords: bool,
}

/// QUIC tuning and bandwidth caps of the migration port.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TransportSettings {
    /// The fastest link edges connect over, e.g. "1gbit": with `link_rtt_ms` it sizes the
    /// QUIC receive windows and UDP buffers (bandwidth x RTT). Default "1gbit".
    pub link_rate: gateway::transport::Rate,
    /// The longest round-trip time edges connect over, in milliseconds. Default 150
    /// (vMotion's long-distance limit).
    pub link_rtt_ms: u32,
    /// Congestion controller for data the endpoint sends (acks, link-test traffic):
    /// "bdp" (default), "bbr", "cubic" or "newreno".
    pub congestion: gateway::transport::Congestion,
    /// Cap on all migrations together, e.g. "2gbit", or "off" (default).
    #[serde(with = "optional_rate")]
    pub max_rate: Option<gateway::transport::Rate>,
    /// Cap on each migration, e.g. "500mbit", or "off" (default).
    #[serde(with = "optional_rate")]
    pub max_rate_per_migration: Option<gateway::transport::Rate>,
    /// Seconds of silence after which a migration's connection is given up and the
    /// migration waits for its edge to resume it. Default 30, at least 1. QUIC uses the
    /// smaller of this and the edge's value.
    pub idle_timeout_secs: u32,
    /// QUIC connections open at once, from all edges (migrations, link tests, live
    /// migrations, and handshakes in progress); one more is refused before its handshake.
    /// Default 256, at least 1. Each costs at most a stream window (1.25 MB) until it has
    /// said Hello.
    pub max_connections: u32,
    /// Connections one edge certificate may have open at once; one more is closed as busy
    /// after the handshake, so one edge cannot take every connection. Default 48 (the
    /// default 32 migration slots, plus link tests and retries), at least 1.
    pub max_connections_per_edge: u32,
    /// Seconds from the handshake to the edge's Hello (its first stream and its
    /// credential); a connection that has not said Hello by then is closed. Default 10,
    /// at least 1.
    pub hello_timeout_secs: u32,
}

impl Default for TransportSettings {
    fn default() -> Self {
        TransportSettings {
            link_rate: gateway::transport::Rate::from_bps(1_000_000_000),
            link_rtt_ms: 150,
            congestion: gateway::transport::Congestion::Bdp,
            max_rate: None,
            max_rate_per_migration: None,
            idle_timeout_secs: 30,
            max_connections: 256,
            max_connections_per_edge: 48,
            hello_timeout_secs: 10,
        }
    }
}

impl TransportSettings {
    pub fn tuning(&self) -> gateway::transport::TransportTuning {
        gateway::transport::TransportTuning {
            congestion: self.congestion,
            idle_timeout: std::time::Duration::from_secs(u64::from(self.idle_timeout_secs)),
            ..gateway::transport::TransportTuning::for_path(gateway::transport::PathEstimate {
                rate_bps: self.link_rate.bps(),
                rtt: std::time::Duration::from_millis(u64::from(self.link_rtt_ms.clamp(1, 10_000))),
            })
        }
    }
}

/// A rate, or "off" for none.
mod optional_rate {
    use gateway::transport::Rate;
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(rate: &Option<Rate>, s: S) -> Result<S::Ok, S::Error> {
        match rate {
            Some(r) => s.collect_str(r),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Rate>, D::Error> {
        let text = String::deserialize(d)?;
        let text = text.trim();
        if text.is_empty() || text.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        text.parse().map(Some).map_err(D::Error::custom)
    }
}

/// The cloud domain seeded into the inventory on first start.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    pub datacenter: String,
    /// VM folder migrated VMs are registered in.
    pub folder: String,
    pub cluster: String,
    pub host: HostConfig,
    pub datastore: DatastoreConfig,
    /// Names of the cloud networks NICs can be mapped to; non-empty, unique.
    pub networks: Vec<String>,
    /// Who may log in to the domain; names unique.
    pub users: Vec<UserConfig>,
    /// More hosts of the cluster, beside `host` (the default placement). Names unique.
    pub extra_hosts: Vec<HostConfig>,
    /// More datastores, beside `datastore` (the default placement, in `datastore_dir`),
    /// each in its own folder on disk. Names and folders unique.
    pub extra_datastores: Vec<ExtraDatastoreConfig>,
    /// More VM folders, beside `folder` (the default placement), in the datacenter's VM
    /// folder. Names unique.
    pub folders: Vec<String>,
    /// Child resource pools of the cluster's root pool ("Resources", always present).
    pub resource_pools: Vec<ResourcePoolConfig>,
}

/// A datastore beside the default one: the same settings plus its folder on disk.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraDatastoreConfig {
    pub name: String,
    /// Its folder (VM folders, staging); relative paths in the file follow the file.
    pub dir: PathBuf,
    /// A quota for migrated disks; `None` means the filesystem's size.
    #[serde(default)]
    pub capacity_bytes: Option<u64>,
    /// As `domain.datastore.disk_format`; `vmdk` when left out.
    #[serde(with = "disk_format_name", default = "default_disk_format")]
    pub disk_format: DiskFormat,
}

fn default_disk_format() -> DiskFormat {
    DiskFormat::VmdkFlat
}

/// A child resource pool of the cluster's root pool.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcePoolConfig {
    pub name: String,
    /// Most memory one VM placed in the pool may have; `None` = no limit but the host's.
    #[serde(default)]
    pub memory_limit_mib: Option<u64>,
    /// Most vCPUs one VM placed in the pool may have; `None` = no limit but the host's.
    #[serde(default)]
    pub cpu_limit_cores: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    pub name: String,
    pub cpu_cores: u32,
    pub memory_mib: u64,
    /// Only `domain.host`'s: where the other endpoints of a scale-out domain reach this
    /// one's API (`https://esx-a.cloud.internal:8443`), to have it serve the power
    /// operations and consoles of the VMs on its host. Default: `https://` and the
    /// address the API listens on, unless that is 0.0.0.0 or [::] (then none, and the
    /// other endpoints answer that this host's endpoint has no address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatastoreConfig {
    pub name: String,
    /// A quota for migrated disks; `None` means the filesystem's size.
    pub capacity_bytes: Option<u64>,
    /// Format of migrated disks when the migration asks for none: `vmdk` (monolithicFlat,
    /// for vSphere; the default), `qcow2` (v3, for KVM clouds) or `raw` (sparse images).
    #[serde(with = "disk_format_name")]
    pub disk_format: DiskFormat,
}

/// A [`DiskFormat`] by the name the edge agent's `--disk-format` takes.
mod disk_format_name {
    use gateway::plan::DiskFormat;
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(format: &DiskFormat, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(format.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DiskFormat, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

/// `api_listen`: an address, or `"off"` for none. (An empty environment variable counts as
/// unset, so `CLOUD_ENDPOINT_API_LISTEN=off` is how the environment turns the API off.)
mod api_listen_setting {
    use std::net::SocketAddr;

    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        let text = text.trim();
        if text.is_empty() || text.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|e| {
            D::Error::custom(format!(
                "{text:?} is not an address such as 127.0.0.1:8443 or \"off\": {e}"
            ))
        })
    }
}

/// A user of the cloud domain. Exactly one of `password` / `password_hash` is set.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Plain password; hashed with argon2id before it is stored.
    pub password: Option<String>,
    /// An argon2 PHC string (`$argon2id$v=19$...`), stored as is.
    pub password_hash: Option<String>,
    pub role: Role,
}

// Passwords stay out of logs and panic messages.
impl fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_hash", &self.password_hash.as_ref().map(|_| "<redacted>"))
            .field("role", &self.role)
            .finish()
    }
}

/// What a user of the cloud domain may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Role {
    /// Everything.
    Administrator,
    /// Migrate VMs in, and read the inventory.
    MigrationOperator,
    /// Read the inventory only.
    ReadOnly,
}

impl Role {
    /// Whether this role may start a migration into the domain.
    pub fn may_migrate(self) -> bool {
        matches!(self, Role::Administrator | Role::MigrationOperator)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Administrator => "Administrator",
            Role::MigrationOperator => "MigrationOperator",
            Role::ReadOnly => "ReadOnly",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of `Administrator`, `MigrationOperator`, `ReadOnly`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown role {0:?}; use Administrator, MigrationOperator or ReadOnly")]
pub struct ParseRoleError(pub String);

impl FromStr for Role {
    type Err = ParseRoleError;

    fn from_str(s: &str) -> Result<Role, ParseRoleError> {
        match s {
            "Administrator" => Ok(Role::Administrator),
            "MigrationOperator" => Ok(Role::MigrationOperator),
            "ReadOnly" => Ok(Role::ReadOnly),
            other => Err(ParseRoleError(other.to_owned())),
        }
    }
}

impl Default for DomainConfig {
    fn default() -> Self {
        let user = |name: &str, role| UserConfig {
            name: name.to_owned(),
            password: Some(DEMO_PASSWORD.to_owned()),
            password_hash: None,
            role,
        };
        DomainConfig {
            datacenter: "Cloud-DC".to_owned(),
            folder: "Migrated VMs".to_owned(),
            cluster: "Cloud-Cluster".to_owned(),
            host: HostConfig::default(),
            datastore: DatastoreConfig::default(),
            networks: ["VM Network", "cloud-web", "cloud-db"].map(String::from).to_vec(),
            users: vec![
                user("administrator@cloud.local", Role::Administrator),
                user("migrator@cloud.local", Role::MigrationOperator),
                user("auditor@cloud.local", Role::ReadOnly),
            ],
            // One of each by default: placement choices are opt-in, and a fresh
            // endpoint's datastore is one folder (see the example for more).
            extra_hosts: Vec::new(),
            extra_datastores: Vec::new(),
            folders: Vec::new(),
            resource_pools: Vec::new(),
        }
    }
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            name: "esx-cloud-01.local".to_owned(),
            cpu_cores: 32,
            memory_mib: 262_144,
            api_url: None,
        }
    }
}

impl Default for DatastoreConfig {
    fn default() -> Self {
        DatastoreConfig {
            name: "cloud-ds1".to_owned(),
            capacity_bytes: None,
            disk_format: DiskFormat::VmdkFlat,
        }
    }
}

/// How much test traffic `edge-agent link-test` may ask of this endpoint. A link test
/// sends incompressible data both ways as fast as the path allows, so every edge with a
/// trusted certificate could otherwise keep the uplink full.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LinkTestConfig {
    /// Whether link tests are answered at all. Default true.
    pub enabled: bool,
    /// Longest measurement per direction, in seconds; longer requests are clamped (and
    /// told so). Default 10.
    pub max_seconds: u32,
    /// Link tests running at once; one more is refused as busy. Default 2.
    pub max_concurrent: u32,
    /// Link tests one edge certificate may start per minute; more are refused as busy
    /// until the minute has passed. Default 6.
    pub tests_per_minute: u32,
}

impl Default for LinkTestConfig {
    fn default() -> Self {
        LinkTestConfig {
            enabled: true,
            max_seconds: 10,
            max_concurrent: 2,
            tests_per_minute: 6,
        }
    }
}

/// What the endpoint reads back from staging before a commit (see [`Config::verify_staged`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyStaged {
    All,
    Resumed,
}

impl VerifyStaged {
    pub fn scope(self) -> gateway::protocol::VerifyScope {
        match self {
            VerifyStaged::All => gateway::protocol::VerifyScope::All,
            VerifyStaged::Resumed => gateway::protocol::VerifyScope::Resumed,
        }
    }
}

/// The settings that have a default (the certificate paths have none).
#[derive(Serialize)]
struct Defaults {
    listen: SocketAddr,
    #[serde(with = "api_listen_setting")]
    api_listen: Option<SocketAddr>,
    datastore_dir: PathBuf,
    database: PathBuf,
    migration_lease_secs: u32,
    max_concurrent_migrations: u32,
    resume_window_hours: u64,
    verify_staged: VerifyStaged,
    shutdown_grace_secs: u32,
    domain: DomainConfig,
    link_test: LinkTestConfig,
    transport: TransportSettings,
    logins: LoginSettings,
    api: ApiSettings,
    metrics: MetricsSettings,
    qemu_user: String,
    allow_default_passwords: bool,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            api_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8443))),
            datastore_dir: PathBuf::from("./datastore"),
            database: PathBuf::from("./inventory.sqlite3"),
            migration_lease_secs: 10,
            max_concurrent_migrations: 32,
            resume_window_hours: 24,
            verify_staged: VerifyStaged::All,
            shutdown_grace_secs: 8,
            domain: DomainConfig::default(),
            link_test: LinkTestConfig::default(),
            transport: TransportSettings::default(),
            logins: LoginSettings::default(),
            api: ApiSettings::default(),
            metrics: MetricsSettings::default(),
            qemu_user: DEFAULT_QEMU_USER.to_owned(),
            allow_default_passwords: false,
        }
    }
}

/// Why a configuration could not be loaded. Each message names where the bad value came
/// from (file or variable) and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}; check the path of the config file", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Syntax errors, wrong types, unknown keys (from figment, which names the key and source).
    #[error("invalid configuration: {0}")]
    Invalid(Box<figment::Error>),

    #[error("no `{key}` is set: set `{key} = \"PATH\"` in the config file or the variable {env}; {hint}")]
    MissingPath {
        key: &'static str,
        env: String,
        hint: &'static str,
    },

    #[error("`{key}` is empty ({origin}); give a name")]
    EmptyName { key: String, origin: String },

    #[error(
        "`domain.networks` is empty ({origin}); list at least one cloud network, e.g. networks = [\"VM Network\"]"
    )]
    NoNetworks { origin: String },

    #[error("`domain.networks` lists {name:?} more than once ({origin}); network names must be unique")]
    DuplicateNetwork { name: String, origin: String },

    #[error(
        "`domain.users` lists user {name:?} more than once ({origin}); user names must be unique, whatever their case"
    )]
    DuplicateUser { name: String, origin: String },

    #[error("user {user:?} ({origin}) has {problem}; give exactly one of `password` or `password_hash`")]
    UserCredentials {
        user: String,
        problem: &'static str,
        origin: String,
    },

    #[error("user {user:?} ({origin}) has an unusable `password_hash`: {reason}; give an argon2 PHC string such as $argon2id$v=19$m=19456,t=2,p=1$SALT$HASH")]
    BadPasswordHash {
        user: String,
        reason: String,
        origin: String,
    },

    #[error("`max_concurrent_migrations` is 0 ({origin}); it must be at least 1")]
    ZeroConcurrency { origin: String },

    #[error("`migration_lease_secs` is {secs} ({origin}); it must be 2 to 300 (shorter leases cost a renewal every third of it, longer ones make a dead endpoint's migrations wait longer)")]
    LeasePeriod { secs: u32, origin: String },

    #[error("`shutdown_grace_secs` is 0 ({origin}); it must be at least 1 (running migrations need a moment to journal what arrived)")]
    ZeroShutdownGrace { origin: String },

    #[error("`{key}` is 0 ({origin}); it must be at least 1 (set `link_test.enabled = false` to refuse link tests)")]
    ZeroLinkTestLimit { key: &'static str, origin: String },

    #[error("`{key}` lists {name:?} more than once ({origin}); {what} must be unique")]
    DuplicateName {
        key: &'static str,
        name: String,
        what: &'static str,
        origin: String,
    },

    #[error("`{key}` is 0 ({origin}); it must be at least 1 (see `cloud-endpoint example-config` for what it limits)")]
    ZeroLoginLimit { key: &'static str, origin: String },

    #[error("`transport.idle_timeout_secs` is 0 ({origin}); it must be at least 1 (QUIC reads 0 as never giving up on a dead link)")]
    ZeroIdleTimeout { origin: String },

    #[error("`{key}` is 0 ({origin}); it must be at least 1 (0 would refuse every edge)")]
    ZeroTransportLimit { key: &'static str, origin: String },

    #[error("`domain.host.api_url` is {url:?} ({origin}): {reason}; give the https URL the other endpoints reach this one's API at, e.g. \"https://esx-a.cloud.internal:8443\"")]
    BadApiUrl {
        url: String,
        reason: &'static str,
        origin: String,
    },

    #[error("`domain.extra_hosts` gives host {name:?} an `api_url` ({origin}); only an endpoint's own host records its address: set `domain.host.api_url` in the config of {name:?}'s endpoint")]
    ExtraHostApiUrl { name: String, origin: String },
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        ConfigError::Invalid(Box::new(e))
    }
}

impl Config {
    /// How long a migration's lease lasts ([`Config::migration_lease_secs`]).
    pub fn migration_lease(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.migration_lease_secs))
    }

    /// How long a stop waits for running migrations ([`Config::shutdown_grace_secs`]).
    pub fn shutdown_grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.shutdown_grace_secs))
    }

    /// Loads the configuration: built-in defaults, then the TOML `file` (if given), then the
    /// process environment (`CLOUD_ENDPOINT_*`), then validates the result.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        // Variables that are not UTF-8 cannot be ours; skip them rather than fail.
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        Config::load_with_env(file, &env)
    }

    /// Like [`Config::load`], with the environment given as pairs (tests, embedding).
    pub fn load_with_env(file: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Defaults::default()));
        if let Some(path) = file {
            // figment would treat a missing file as empty; an explicit file must exist.
            std::fs::File::open(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            figment = figment.merge(TomlFile(path.to_owned()));
        }
        let figment = figment.merge(EnvPairs::new(env));

        for (key, hint) in [
            (
                "cert",
                "create an endpoint certificate with `certs endpoint` or `certs quickstart`",
            ),
            (
                "key",
                "it is written next to the certificate by `certs endpoint` or `certs quickstart`",
            ),
            (
                "edge_ca",
                "use the CA certificate that signed the edge agents' certificates (`certs quickstart` writes one)",
            ),
        ] {
            let empty = match figment.find_value(key) {
                Ok(v) => v.as_str().is_some_and(str::is_empty),
                Err(e) if e.missing() => true,
                // A provider failed (e.g. a TOML syntax error): report that instead.
                Err(e) => return Err(e.into()),
            };
            if empty {
                return Err(ConfigError::MissingPath {
                    key,
                    env: env_name(&[key]),
                    hint,
                });
            }
        }

        // Lossy: environment values arrive as strings, so "32" must become a number.
        let mut config: Config = figment.extract_lossy()?;
        resolve_relative(&figment, "cert", &mut config.cert);
        resolve_relative(&figment, "key", &mut config.key);
        resolve_relative(&figment, "edge_ca", &mut config.edge_ca);
        if let Some(path) = &mut config.revoked_edge_serials {
            resolve_relative(&figment, "revoked_edge_serials", path);
        }
        resolve_relative(&figment, "datastore_dir", &mut config.datastore_dir);
        resolve_relative(&figment, "database", &mut config.database);
        for ds in &mut config.domain.extra_datastores {
            resolve_relative(&figment, "domain.extra_datastores", &mut ds.dir);
        }
        config.validate(&figment)?;
        Ok(config)
    }

    fn validate(&self, figment: &Figment) -> Result<(), ConfigError> {
        let lt = &self.link_test;
        for (key, value) in [
            ("link_test.max_seconds", lt.max_seconds),
            ("link_test.max_concurrent", lt.max_concurrent),
            ("link_test.tests_per_minute", lt.tests_per_minute),
        ] {
            if value == 0 {
                return Err(ConfigError::ZeroLinkTestLimit {
                    key,
                    origin: origin(figment, key),
                });
            }
        }
        if self.transport.idle_timeout_secs == 0 {
            return Err(ConfigError::ZeroIdleTimeout {
                origin: origin(figment, "transport.idle_timeout_secs"),
            });
        }
        if let Some(key) = self.api.zero_setting() {
            return Err(ConfigError::ZeroLoginLimit {
                key,
                origin: origin(figment, key),
            });
        }
        let t = &self.transport;
        for (key, value) in [
            ("transport.max_connections", t.max_connections),
            ("transport.max_connections_per_edge", t.max_connections_per_edge),
            ("transport.hello_timeout_secs", t.hello_timeout_secs),
        ] {
            if value == 0 {
                return Err(ConfigError::ZeroTransportLimit {
                    key,
                    origin: origin(figment, key),
                });
            }
        }
        if let Some(key) = self.logins.zero_setting() {
            return Err(ConfigError::ZeroLoginLimit {
                key,
                origin: origin(figment, key),
            });
        }
        if self.max_concurrent_migrations == 0 {
            return Err(ConfigError::ZeroConcurrency {
                origin: origin(figment, "max_concurrent_migrations"),
            });
        }
        if !(2..=300).contains(&self.migration_lease_secs) {
            return Err(ConfigError::LeasePeriod {
                secs: self.migration_lease_secs,
                origin: origin(figment, "migration_lease_secs"),
            });
        }
        if self.shutdown_grace_secs == 0 {
            return Err(ConfigError::ZeroShutdownGrace {
                origin: origin(figment, "shutdown_grace_secs"),
            });
        }
        let d = &self.domain;
        for (key, value) in [
            ("domain.datacenter", &d.datacenter),
            ("domain.folder", &d.folder),
            ("domain.cluster", &d.cluster),
            ("domain.host.name", &d.host.name),
            ("domain.datastore.name", &d.datastore.name),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError::EmptyName {
                    key: key.to_owned(),
                    origin: origin(figment, key),
                });
            }
        }
        self.validate_placement_objects(figment)?;
        self.validate_api_url(figment)?;
        let origin_networks = || origin(figment, "domain.networks");
        if d.networks.is_empty() {
            return Err(ConfigError::NoNetworks {
                origin: origin_networks(),
            });
        }
        let mut seen = HashSet::new();
        for name in &d.networks {
            if name.trim().is_empty() {
                return Err(ConfigError::EmptyName {
                    key: "domain.networks[]".to_owned(),
                    origin: origin_networks(),
                });
            }
            if !seen.insert(name) {
                return Err(ConfigError::DuplicateNetwork {
                    name: name.clone(),
                    origin: origin_networks(),
                });
            }
        }
        let origin_users = || origin(figment, "domain.users");
        let mut seen = HashSet::new();
        for user in &d.users {
            if user.name.trim().is_empty() {
                return Err(ConfigError::EmptyName {
                    key: "domain.users[].name".to_owned(),
                    origin: origin_users(),
                });
            }
            // Logins match names without regard to case (see `inventory::user_key`): two
            // names that differ only in case would be one user.
            if !seen.insert(crate::inventory::user_key(&user.name)) {
                return Err(ConfigError::DuplicateUser {
                    name: user.name.clone(),
                    origin: origin_users(),
                });
            }
            let problem = match (&user.password, &user.password_hash) {
                (Some(_), Some(_)) => Some("both `password` and `password_hash`"),
                (None, None) => Some("neither `password` nor `password_hash`"),
                (Some(p), None) if p.is_empty() => Some("an empty `password`"),
                _ => None,
            };
            if let Some(problem) = problem {
                return Err(ConfigError::UserCredentials {
                    user: user.name.clone(),
                    problem,
                    origin: origin_users(),
                });
            }
            if let Some(hash) = &user.password_hash {
                check_password_hash(hash).map_err(|reason| ConfigError::BadPasswordHash {
                    user: user.name.clone(),
                    reason,
                    origin: origin_users(),
                })?;
            }
        }
        Ok(())
    }

    /// `domain.host.api_url` is an https URL with a host and nothing after the port, and
    /// no extra host has one.
    fn validate_api_url(&self, figment: &Figment) -> Result<(), ConfigError> {
        if let Some(host) = self.domain.extra_hosts.iter().find(|h| h.api_url.is_some()) {
            return Err(ConfigError::ExtraHostApiUrl {
                name: host.name.clone(),
                origin: origin(figment, "domain.extra_hosts"),
            });
        }
        let Some(url) = &self.domain.host.api_url else {
            return Ok(());
        };
        let reason = match url.parse::<axum::http::Uri>() {
            Err(_) => Some("not a URL"),
            Ok(uri) if uri.scheme_str() != Some("https") => Some("not https (the API speaks HTTPS only)"),
            Ok(uri) if uri.host().is_none_or(str::is_empty) => Some("it names no host"),
            Ok(uri) if !matches!(uri.path(), "" | "/") || uri.query().is_some() => {
                Some("it has a path or query; the endpoint adds its own")
            }
            Ok(_) => None,
        };
        match reason {
            None => Ok(()),
            Some(reason) => Err(ConfigError::BadApiUrl {
                url: url.clone(),
                reason,
                origin: origin(figment, "domain.host.api_url"),
            }),
        }
    }

    /// Where the other endpoints reach this one's API (`domain.host.api_url`), given the
    /// address its API is bound to: the configured URL, else `https://` and that address
    /// when it names one (not 0.0.0.0 or [::], which no peer can dial).
    pub fn own_api_url(&self, api_bound: Option<SocketAddr>) -> Option<String> {
        if let Some(url) = &self.domain.host.api_url {
            return Some(url.trim_end_matches('/').to_owned());
        }
        api_bound
            .filter(|addr| !addr.ip().is_unspecified() && addr.port() != 0)
            .map(|addr| format!("https://{addr}"))
    }

    /// Names of hosts, datastores, folders and pools: not empty, unique in their kind
    /// (placements name them), and datastore folders distinct.
    fn validate_placement_objects(&self, figment: &Figment) -> Result<(), ConfigError> {
        let d = &self.domain;
        let kinds: [(&'static str, &'static str, Vec<&String>); 4] = [
            (
                "domain.extra_hosts",
                "host names",
                std::iter::once(&d.host.name)
                    .chain(d.extra_hosts.iter().map(|h| &h.name))
                    .collect(),
            ),
            (
                "domain.extra_datastores",
                "datastore names",
                std::iter::once(&d.datastore.name)
                    .chain(d.extra_datastores.iter().map(|s| &s.name))
                    .collect(),
            ),
            (
                "domain.folders",
                "VM folder names",
                std::iter::once(&d.folder).chain(d.folders.iter()).collect(),
            ),
            (
                "domain.resource_pools",
                "resource pool names (\"Resources\" is the root pool's)",
                d.resource_pools.iter().map(|p| &p.name).collect(),
            ),
        ];
        for (key, what, names) in kinds {
            let mut seen = HashSet::new();
            for name in names {
                if name.trim().is_empty() {
                    return Err(ConfigError::EmptyName {
                        key: format!("{key}[]"),
                        origin: origin(figment, key),
                    });
                }
                if !seen.insert(name.as_str()) || (key == "domain.resource_pools" && name == "Resources") {
                    return Err(ConfigError::DuplicateName {
                        key,
                        name: name.clone(),
                        what,
                        origin: origin(figment, key),
                    });
                }
            }
        }
        let mut dirs = HashSet::from([self.datastore_dir.clone()]);
        for ds in &d.extra_datastores {
            if !dirs.insert(ds.dir.clone()) {
                return Err(ConfigError::DuplicateName {
                    key: "domain.extra_datastores",
                    name: ds.dir.display().to_string(),
                    what: "datastore folders (`datastore_dir` and each `dir`)",
                    origin: origin(figment, "domain.extra_datastores"),
                });
            }
        }
        Ok(())
    }

    /// An annotated example configuration with every setting at its default.
    pub fn example_toml() -> String {
        EXAMPLE_TOML.replace("{DEMO_PASSWORD}", DEMO_PASSWORD)
            + logins::EXAMPLE_TOML
            + api::EXAMPLE_TOML
            + metrics::EXAMPLE_TOML
    }
}

/// Checks that `hash` is an argon2 PHC string the inventory can verify against.
pub(crate) fn check_password_hash(hash: &str) -> Result<(), String> {
    let parsed = argon2::PasswordHash::new(hash).map_err(|e| e.to_string())?;
    match parsed.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" => {}
        other => return Err(format!("algorithm {other:?} is not argon2")),
    }
    if parsed.hash.is_none() {
        return Err("the hash part is missing".to_owned());
    }
    argon2::Params::try_from(&parsed).map_err(|e| e.to_string())?;
    Ok(())
}

const EXAMPLE_TOML: &str = r#"# cloud-endpoint configuration.
# Every setting can also come from an environment variable named CLOUD_ENDPOINT_ plus the
# key in capitals, nested keys joined by a double underscore; variables beat this file:
#   CLOUD_ENDPOINT_LISTEN=0.0.0.0:4433
#   CLOUD_ENDPOINT_DOMAIN__DATASTORE__NAME=cloud-ds2
# Relative paths in this file are relative to the folder of this file.

# UDP address of the QUIC server.
listen = "127.0.0.1:4433"

# TCP address of the vSphere REST API at https://ADDRESS/api (the same certificate as the
# QUIC server; clients log in with a user of the domain). "off" serves no API.
api_listen = "127.0.0.1:8443"

# The endpoint's certificate chain and private key (PEM), and the CA that issued the
# edge agents' certificates. Required, no defaults: `certs quickstart --out pki` (run
# beside this file) writes these three files under these names.
cert = "pki/endpoint.pem"
key = "pki/endpoint.key"
edge_ca = "pki/ca.pem"
# Revoked edge certificates: a file of serial numbers in hex, one per line, as
# `openssl x509 -serial -noout -in edge.pem` prints them. Checked right after each
# handshake; the file is read again when it changes (no restart). None by default.
# revoked_edge_serials = "pki/revoked-edges.txt"

# Folder of the cloud datastore: one folder per VM, plus .staging for transfers.
datastore_dir = "./datastore"

# SQLite file of the inventory (the vCenter-like domain).
database = "./inventory.sqlite3"
# Or a PostgreSQL database that several endpoints share (a scale-out domain; see
# docs/scale-out.md). Set CLOUD_ENDPOINT_DATABASE_URL to keep the password out of here.
# database_url = "postgres://gateway:secret@db.cloud.example:5432/gateway"

# Seconds a migration's lease lasts (2 to 300). The endpoint serving a migration renews
# it every third of this; when several endpoints share `database_url` and one dies, its
# migrations move on (their edges resume at another endpoint) once their leases expired.
migration_lease_secs = 10

# Migrations accepted at once (at least 1); further ones wait.
max_concurrent_migrations = 32

# Hours an interrupted migration (dropped link, killed edge, endpoint restart) waits
# for its edge to resume it before its partial files are removed.
resume_window_hours = 24

# Before a VM is registered and its receipt signed, the endpoint reads its staged disks
# back and checks every chunk against what was sent; chunks that differ are sent again
# by the edge. "all" (every chunk) or "resumed" (only chunks an earlier connection wrote).
verify_staged = "all"

# At a stop (SIGTERM, Ctrl-C): seconds running migrations get to sync and journal what
# arrived, and their connections to close as busy (edges retry and resume), before the
# endpoint exits. Under the 10 s docker stop waits before it kills. At least 1.
shutdown_grace_secs = 8

# When the endpoint runs as root, each VM's QEMU runs as this unprivileged user (it must
# exist: useradd --system --no-create-home --shell /usr/sbin/nologin gateway-qemu), which
# owns the VM's folder while it runs and cannot read the database or the keys.
qemu_user = "gateway-qemu"

# Serve on an address other than loopback although a user still has the published demo
# password. Only for a lab: every start warns while it is set.
allow_default_passwords = false

# The domain migrated VMs land in. It is written into the inventory on first start;
# later starts add new networks and users but never delete anything.
[domain]
datacenter = "Cloud-DC"
# VM folder migrated VMs are registered in.
folder = "Migrated VMs"
cluster = "Cloud-Cluster"
# Cloud networks a source NIC can be mapped to (non-empty, unique).
networks = ["VM Network", "cloud-web", "cloud-db"]
# More placement choices (`edge-agent migrate --host/--folder/--resource-pool`); none by
# default. Objects listed here are added to an existing inventory at the next start
# (never removed or renamed). Hosts join the cluster.
# extra_hosts = [{ name = "esx-cloud-02.local", cpu_cores = 16, memory_mib = 131072 }]
# folders = ["Imported", "Staging VMs"]
# resource_pools = [{ name = "migrations", memory_limit_mib = 65536, cpu_limit_cores = 8 }]

[domain.host]
name = "esx-cloud-01.local"
cpu_cores = 32
memory_mib = 262144
# Where the other endpoints of a scale-out domain (`database_url`) reach this one's API,
# to have it power on, off or reset, and show the console of, the VMs on its host.
# Default: https:// and the `api_listen` address, unless that is 0.0.0.0 or [::].
# api_url = "https://esx-cloud-01.local:8443"

[domain.datastore]
name = "cloud-ds1"
# A quota for migrated disks, in bytes. Without it, the filesystem's size is the limit.
# capacity_bytes = 1099511627776
# Format of migrated disks unless a migration asks for another (edge-agent migrate
# --disk-format): "vmdk" (a monolithicFlat descriptor plus a sparse -flat.vmdk, for
# vSphere), "qcow2" (v3, for KVM-based clouds) or "raw" (a sparse .img).
disk_format = "vmdk"

# More datastores, each in its own folder (`edge-agent migrate --datastore` or
# `--disk-datastore scsi0:1=cloud-ds2`); none by default.
# [[domain.extra_datastores]]
# name = "cloud-ds2"
# dir = "./datastore2"
# capacity_bytes = 1099511627776
# disk_format = "vmdk"

# Users of the domain. Each has exactly one of `password` (hashed with argon2id when
# stored) or `password_hash` (an argon2 PHC string, stored as is), and a role:
# Administrator, MigrationOperator (may migrate) or ReadOnly.
# These demo users share a published password: CHANGE THEM before exposing the endpoint
# (`cloud-endpoint hash-password` prints a `password_hash` line to put here). The
# endpoint refuses to serve on an address other than loopback while a user still has it.
# A user removed from this list can no longer log in (kept in the inventory for history).
[[domain.users]]
name = "administrator@cloud.local"
password = "{DEMO_PASSWORD}"
role = "Administrator"

[[domain.users]]
name = "migrator@cloud.local"
password = "{DEMO_PASSWORD}"
role = "MigrationOperator"

[[domain.users]]
name = "auditor@cloud.local"
password = "{DEMO_PASSWORD}"
role = "ReadOnly"

# `edge-agent link-test` measures RTT, loss, path MTU and throughput over the migration
# port with test traffic. These settings bound what one edge may ask for.
[link_test]
# false refuses every link test.
enabled = true
# Longest measurement per direction, in seconds; longer requests are cut to this.
max_seconds = 10
# Link tests at once; further ones are refused as busy.
max_concurrent = 2
# Link tests one edge certificate may start per minute; further ones are refused as busy.
tests_per_minute = 6

# The WAN path edges come over, and bandwidth caps of the migration port.
[transport]
# The fastest link and the longest round-trip time edges connect over: they size the
# QUIC windows and UDP buffers (bandwidth x RTT). Larger costs memory only when used.
link_rate = "1gbit"
link_rtt_ms = 150
# Congestion controller for what the endpoint sends: "bdp" (the gateway's own) keeps
# its rate through random loss on long links; "cubic" yields to TCP on a congested
# shared link; "bbr" and "newreno" are quinn's others.
congestion = "bdp"
# Caps, e.g. "2gbit" or "250MB/s", so migrations leave room on a shared core link:
# all migrations together, and each one. "off" = no cap. An edge may set a lower cap of
# its own (edge-agent migrate --max-rate).
max_rate = "off"
max_rate_per_migration = "off"
# Seconds of silence after which a migration's connection counts as lost; the
# migration then waits for its edge to reconnect and resume it. Shorter notices a dead
# link sooner, too short gives up on one that only stalled. The edge's own value wins
# if it is smaller.
idle_timeout_secs = 30
# Connections open at once from all edges, and from one edge certificate; one more is
# refused (all) or closed as busy (one edge). Each costs memory before it is
# authenticated, so these bound what edges that only connect can hold.
max_connections = 256
max_connections_per_edge = 48
# Seconds from the handshake to the edge's Hello; a connection that has not said Hello
# by then is closed.
hello_timeout_secs = 10
"#;

/// The name of the environment variable for a key path, e.g. `CLOUD_ENDPOINT_DOMAIN__HOST__NAME`.
fn env_name<K: AsRef<str>>(keys: &[K]) -> String {
    let keys: Vec<String> = keys.iter().map(|k| k.as_ref().to_ascii_uppercase()).collect();
    format!("{ENV_PREFIX}{}", keys.join("__"))
}

/// A human description of where the winning value of `key` came from.
fn origin(figment: &Figment, key: &str) -> String {
    match figment.find_metadata(key) {
        Some(md) => match md.source.as_ref().and_then(|s| s.file_path()) {
            Some(path) => format!("set in {}", path.display()),
            None if md.name == ENV_METADATA_NAME => {
                let keys: Vec<&str> = key.split('.').collect();
                format!("set by {}", md.interpolate(&Profile::Default, &keys))
            }
            None => "built-in default".to_owned(),
        },
        None => "built-in default".to_owned(),
    }
}

/// A relative path from the TOML file is taken relative to the file's folder.
fn resolve_relative(figment: &Figment, key: &str, path: &mut PathBuf) {
    if path.is_absolute() {
        return;
    }
    let file = figment
        .find_metadata(key)
        .and_then(|md| md.source.as_ref())
        .and_then(|s| s.file_path());
    if let Some(dir) = file.and_then(Path::parent) {
        *path = dir.join(&*path);
    }
}

/// The TOML file, with keys in errors shown as written in it (`domain.host.name`, not
/// figment's `default.domain.host.name`).
#[derive(Debug)]
struct TomlFile(PathBuf);

impl Provider for TomlFile {
    fn metadata(&self) -> Metadata {
        Metadata::from("TOML file", self.0.as_path()).interpolater(|_: &Profile, keys: &[&str]| keys.join("."))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Toml::file_exact(&self.0).data()
    }
}

const ENV_METADATA_NAME: &str = "the environment";

/// A figment provider over given `(name, value)` pairs, so that tests need not touch the
/// process environment. Only `CLOUD_ENDPOINT_*` names count; `__` nests keys.
#[derive(Debug)]
struct EnvPairs {
    dict: Dict,
}

impl EnvPairs {
    fn new(pairs: &[(String, String)]) -> EnvPairs {
        let mut dict = Dict::new();
        for (name, value) in pairs {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if rest.is_empty() || value.is_empty() || RESERVED_ENV_VARS.contains(&name.as_str()) {
                continue;
            }
            let key = rest.to_ascii_lowercase().replace("__", ".");
            // Scalars stay strings (extract_lossy turns "32" into a number where one is
            // wanted, and a name like "10" stays a name); lists and tables are parsed.
            let trimmed = value.trim_start();
            let value = if trimmed.starts_with('[') || trimmed.starts_with('{') {
                value.parse::<Value>().unwrap_or_else(|never| match never {})
            } else {
                Value::from(value.clone())
            };
            if let Some(nested) = figment::util::nest(&key, value).into_dict() {
                dict = merge_dicts(dict, nested);
            }
        }
        EnvPairs { dict }
    }
}

fn merge_dicts(mut into: Dict, from: Dict) -> Dict {
    for (k, v) in from {
        let merged = match (into.remove(&k), v) {
            (Some(Value::Dict(_, a)), Value::Dict(tag, b)) => Value::Dict(tag, merge_dicts(a, b)),
            (_, v) => v,
        };
        into.insert(k, merged);
    }
    into
}

impl Provider for EnvPairs {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV_METADATA_NAME).interpolater(|_: &Profile, keys: &[&str]| env_name(keys))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn cert_env() -> Vec<(String, String)> {
        pairs(&[
            ("CLOUD_ENDPOINT_CERT", "/pki/endpoint.pem"),
            ("CLOUD_ENDPOINT_KEY", "/pki/endpoint.key"),
            ("CLOUD_ENDPOINT_EDGE_CA", "/pki/ca.pem"),
        ])
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    const PATHS: &str = "cert = \"/pki/e.pem\"\nkey = \"/pki/k.pem\"\nedge_ca = \"/pki/ca.pem\"\n";

    fn load_toml(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "cloud.toml", text);
        Config::load_with_env(Some(&file), &pairs(env))
    }

    #[test]
    fn defaults_apply_when_only_the_paths_are_given() {
        let c = Config::load_with_env(None, &cert_env()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:4433".parse().unwrap());
        assert_eq!(c.api_listen, Some("127.0.0.1:8443".parse().unwrap()));
        assert_eq!(c.cert, PathBuf::from("/pki/endpoint.pem"));
        assert_eq!(c.datastore_dir, PathBuf::from("./datastore"));
        assert_eq!(c.database, PathBuf::from("./inventory.sqlite3"));
        assert_eq!(c.max_concurrent_migrations, 32);
        assert_eq!(c.domain, DomainConfig::default());
        assert_eq!(c.domain.datastore.capacity_bytes, None);
        assert_eq!(c.domain.datastore.disk_format, DiskFormat::VmdkFlat);
        let users: Vec<_> = c.domain.users.iter().map(|u| (u.name.as_str(), u.role)).collect();
        assert_eq!(
            users,
            [
                ("administrator@cloud.local", Role::Administrator),
                ("migrator@cloud.local", Role::MigrationOperator),
                ("auditor@cloud.local", Role::ReadOnly),
            ]
        );
        assert!(c
            .domain
            .users
            .iter()
            .all(|u| u.password.as_deref() == Some(DEMO_PASSWORD)));
    }

    #[test]
    fn each_required_path_is_reported_with_its_fix() {
        for missing in ["CLOUD_ENDPOINT_CERT", "CLOUD_ENDPOINT_KEY", "CLOUD_ENDPOINT_EDGE_CA"] {
            let env: Vec<_> = cert_env().into_iter().filter(|(k, _)| k != missing).collect();
            let err = Config::load_with_env(None, &env).unwrap_err();
            assert!(matches!(err, ConfigError::MissingPath { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains(missing), "{msg}");
            assert!(msg.contains("certs quickstart"), "{msg}");
        }
        // An empty value counts as unset.
        let mut env = cert_env();
        env[0].1 = String::new();
        let err = Config::load_with_env(None, &env).unwrap_err();
        assert!(err.to_string().contains("no `cert` is set"), "{err}");
        assert!(err.to_string().contains("certs endpoint"), "{err}");
        let err = load_toml("cert = \"\"\nkey = \"k\"\nedge_ca = \"c\"\n", &[]).unwrap_err();
        assert!(matches!(err, ConfigError::MissingPath { key: "cert", .. }), "{err:?}");
    }

    #[test]
    fn toml_file_overrides_defaults_and_keeps_the_rest() {
        let c = load_toml(
            &format!(
                "{PATHS}listen = \"0.0.0.0:5000\"\nmax_concurrent_migrations = 4\n\
                 [domain]\nnetworks = [\"prod\"]\n\
                 [domain.datastore]\nname = \"ds9\"\ncapacity_bytes = 1000000\n\
                 [[domain.users]]\nname = \"ops\"\npassword = \"pw\"\nrole = \"MigrationOperator\"\n"
            ),
            &[],
        )
        .unwrap();
        assert_eq!(c.listen, "0.0.0.0:5000".parse().unwrap());
        assert_eq!(c.max_concurrent_migrations, 4);
        assert_eq!(c.domain.networks, ["prod"]);
        assert_eq!(
            c.domain.datastore,
            DatastoreConfig {
                name: "ds9".into(),
                capacity_bytes: Some(1_000_000),
                disk_format: DiskFormat::VmdkFlat,
            }
        );
        // A list in the file replaces the default list.
        assert_eq!(c.domain.users.len(), 1);
        assert_eq!(c.domain.users[0].role, Role::MigrationOperator);
        // Untouched settings keep their defaults.
        assert_eq!(c.domain.cluster, "Cloud-Cluster");
        assert_eq!(c.domain.host, HostConfig::default());
        assert_eq!(c.database, PathBuf::from("./inventory.sqlite3"));
    }

    #[test]
    fn environment_beats_the_file() {
        let c = load_toml(
            &format!("{PATHS}listen = \"0.0.0.0:5000\"\n[domain.datastore]\nname = \"from-file\"\n"),
            &[
                ("CLOUD_ENDPOINT_LISTEN", "10.0.0.1:6000"),
                ("CLOUD_ENDPOINT_DOMAIN__DATASTORE__NAME", "from-env"),
                ("CLOUD_ENDPOINT_DOMAIN__DATASTORE__CAPACITY_BYTES", "4096"),
                ("CLOUD_ENDPOINT_DOMAIN__DATASTORE__DISK_FORMAT", "qcow2"),
                ("CLOUD_ENDPOINT_MAX_CONCURRENT_MIGRATIONS", "7"),
                ("CLOUD_ENDPOINT_DOMAIN__HOST__NAME", "10"),
                ("CLOUD_ENDPOINT_DOMAIN__NETWORKS", r#"["VM Network", "cloud web"]"#),
                ("CLOUD_ENDPOINT_DATASTORE_DIR", "rel/ds"),
                // The binary's own variables and foreign ones are not settings.
                ("CLOUD_ENDPOINT_CONFIG", "/etc/whatever.toml"),
                ("OTHER_LISTEN", "garbage"),
            ],
        )
        .unwrap();
        assert_eq!(c.listen, "10.0.0.1:6000".parse().unwrap());
        assert_eq!(c.domain.datastore.name, "from-env");
        assert_eq!(c.domain.datastore.capacity_bytes, Some(4096));
        assert_eq!(c.domain.datastore.disk_format, DiskFormat::Qcow2);
        assert_eq!(c.max_concurrent_migrations, 7);
        assert_eq!(c.domain.host.name, "10");
        assert_eq!(c.domain.networks, ["VM Network", "cloud web"]);
        // From the environment: relative to the working directory, untouched.
        assert_eq!(c.datastore_dir, PathBuf::from("rel/ds"));
    }

    #[test]
    fn load_reads_the_process_environment() {
        // The environment is process-wide, so the check runs in a child process of this
        // test binary (figment::Jail would also change the working directory of every
        // test running at the same time).
        const CHILD_FILE: &str = "CONFIG_RS_TEST_CHILD_FILE";
        const NAME: &str = "config::tests::load_reads_the_process_environment";
        if let Some(file) = std::env::var_os(CHILD_FILE) {
            let c = Config::load(Some(Path::new(&file))).unwrap();
            assert_eq!(c.listen, "127.0.0.1:7777".parse().unwrap());
            assert_eq!(c.domain.folder, "Imported");
            assert_eq!(c.cert, PathBuf::from("/pki/e.pem"));
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "cloud.toml", PATHS);
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--test-threads=1"])
            .env(CHILD_FILE, &file)
            .env("CLOUD_ENDPOINT_LISTEN", "127.0.0.1:7777")
            .env("CLOUD_ENDPOINT_DOMAIN__FOLDER", "Imported")
            .env("CLOUD_ENDPOINT_CONFIG", "ignored: the binary's own option")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn relative_paths_in_the_file_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "etc/cloud.toml",
            "cert = \"pki/e.pem\"\nkey = \"/abs/k.pem\"\nedge_ca = \"../ca.pem\"\ndatastore_dir = \"ds\"\n",
        );
        let c = Config::load_with_env(Some(&file), &[]).unwrap();
        let etc = dir.path().join("etc");
        assert_eq!(c.cert, etc.join("pki/e.pem"));
        assert_eq!(c.key, PathBuf::from("/abs/k.pem"));
        assert_eq!(c.edge_ca, etc.join("../ca.pem"));
        assert_eq!(c.datastore_dir, etc.join("ds"));
        // Not set in the file: the default stays relative to the working directory.
        assert_eq!(c.database, PathBuf::from("./inventory.sqlite3"));
    }

    #[test]
    fn missing_config_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.toml");
        let err = Config::load_with_env(Some(&path), &cert_env()).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("nope.toml"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_source() {
        let err = load_toml(&format!("{PATHS}listn = \"0.0.0.0:1\"\n"), &[]).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Invalid(_)), "{err:?}");
        assert!(msg.contains("listn") && msg.contains("cloud.toml"), "{msg}");

        let err = load_toml(&format!("{PATHS}[domain.host]\ncores = 4\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("cores"), "{err}");

        let err = load_toml(PATHS, &[("CLOUD_ENDPOINT_LISTN", "0.0.0.0:1")]).unwrap_err();
        assert!(err.to_string().contains("CLOUD_ENDPOINT_LISTN"), "{err}");

        let err = load_toml(PATHS, &[("CLOUD_ENDPOINT_MAX_CONCURRENT_MIGRATIONS", "many")]).unwrap_err();
        assert!(
            err.to_string().contains("CLOUD_ENDPOINT_MAX_CONCURRENT_MIGRATIONS"),
            "{err}"
        );

        // A syntax error is reported as such, even though it hides the required paths.
        let err = load_toml("cert = \"/e\"\nbad toml [", &[]).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)), "{err:?}");
        assert!(err.to_string().contains("line 2"), "{err}");

        let err = load_toml(&format!("{PATHS}listen = \"nowhere\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");

        let err = load_toml(
            &format!("{PATHS}[[domain.users]]\nname = \"x\"\npassword = \"p\"\nrole = \"Root\"\n"),
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("Root"), "{err}");

        let err = load_toml(PATHS, &[("CLOUD_ENDPOINT_DOMAIN__DATASTORE__DISK_FORMAT", "vhdx")]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("vhdx")
                && msg.contains("qcow2")
                && msg.contains("CLOUD_ENDPOINT_DOMAIN__DATASTORE__DISK_FORMAT"),
            "{msg}"
        );
        let c = load_toml(&format!("{PATHS}[domain.datastore]\ndisk_format = \"raw\"\n"), &[]).unwrap();
        assert_eq!(c.domain.datastore.disk_format, DiskFormat::Raw);
    }

    #[test]
    fn validation_errors_name_the_setting_and_its_source() {
        let err = load_toml(&format!("{PATHS}max_concurrent_migrations = 0\n"), &[]).unwrap_err();
        assert!(matches!(err, ConfigError::ZeroConcurrency { .. }), "{err:?}");
        assert!(err.to_string().contains("cloud.toml"), "{err}");

        let err = load_toml(PATHS, &[("CLOUD_ENDPOINT_SHUTDOWN_GRACE_SECS", "0")]).unwrap_err();
        assert!(matches!(err, ConfigError::ZeroShutdownGrace { .. }), "{err:?}");
        assert!(err.to_string().contains("CLOUD_ENDPOINT_SHUTDOWN_GRACE_SECS"), "{err}");
        let c = load_toml(PATHS, &[("CLOUD_ENDPOINT_SHUTDOWN_GRACE_SECS", "3")]).unwrap();
        assert_eq!(c.shutdown_grace(), std::time::Duration::from_secs(3));

        let err = load_toml(PATHS, &[("CLOUD_ENDPOINT_MAX_CONCURRENT_MIGRATIONS", "0")]).unwrap_err();
        assert!(
            err.to_string().contains("CLOUD_ENDPOINT_MAX_CONCURRENT_MIGRATIONS"),
            "{err}"
        );

        let err = load_toml(&format!("{PATHS}[domain]\nnetworks = []\n"), &[]).unwrap_err();
        assert!(matches!(err, ConfigError::NoNetworks { .. }), "{err:?}");

        let err = load_toml(&format!("{PATHS}[domain]\nnetworks = [\"a\", \"b\", \"a\"]\n"), &[]).unwrap_err();
        assert!(
            matches!(&err, ConfigError::DuplicateNetwork { name, .. } if name == "a"),
            "{err:?}"
        );

        let err = load_toml(&format!("{PATHS}[domain]\ncluster = \" \"\n"), &[]).unwrap_err();
        assert!(
            matches!(&err, ConfigError::EmptyName { key, .. } if key == "domain.cluster"),
            "{err:?}"
        );

        let user =
            |name: &str, creds: &str| format!("[[domain.users]]\nname = \"{name}\"\n{creds}role = \"ReadOnly\"\n");
        let hash = crate::inventory::hash_password("pw").unwrap();

        let err = load_toml(
            &format!(
                "{PATHS}{}{}",
                user("a", "password = \"x\"\n"),
                user("a", "password = \"y\"\n")
            ),
            &[],
        )
        .unwrap_err();
        assert!(
            matches!(&err, ConfigError::DuplicateUser { name, .. } if name == "a"),
            "{err:?}"
        );
        // Logins do not tell case apart, so neither does the check.
        let err = load_toml(
            &format!(
                "{PATHS}{}{}",
                user("ops@cloud.local", "password = \"x\"\n"),
                user("Ops@CLOUD.local", "password = \"y\"\n")
            ),
            &[],
        )
        .unwrap_err();
        assert!(
            matches!(&err, ConfigError::DuplicateUser { name, .. } if name == "Ops@CLOUD.local"),
            "{err:?}"
        );

        let err = load_toml(&format!("{PATHS}{}", user("a", "")), &[]).unwrap_err();
        assert!(
            matches!(err, ConfigError::UserCredentials { problem, .. } if problem.starts_with("neither")),
            "{err:?}"
        );

        let both = format!("password = \"x\"\npassword_hash = '{hash}'\n");
        let err = load_toml(&format!("{PATHS}{}", user("a", &both)), &[]).unwrap_err();
        assert!(
            matches!(err, ConfigError::UserCredentials { problem, .. } if problem.starts_with("both")),
            "{err:?}"
        );

        let err = load_toml(&format!("{PATHS}{}", user("a", "password_hash = \"plaintext\"\n")), &[]).unwrap_err();
        assert!(matches!(err, ConfigError::BadPasswordHash { .. }), "{err:?}");

        let ok = load_toml(
            &format!("{PATHS}{}", user("a", &format!("password_hash = '{hash}'\n"))),
            &[],
        )
        .unwrap();
        assert_eq!(ok.domain.users[0].password_hash.as_deref(), Some(hash.as_str()));
    }

    #[test]
    fn example_is_valid_and_shows_the_defaults() {
        let example = Config::example_toml();
        let c = load_toml(&example, &[]).unwrap();
        assert_eq!(c.domain, DomainConfig::default());
        let defaults = Defaults::default();
        assert_eq!(c.listen, defaults.listen);
        assert_eq!(c.api_listen, defaults.api_listen);
        assert_eq!(c.max_concurrent_migrations, defaults.max_concurrent_migrations);
        assert!(c.datastore_dir.ends_with("datastore"));
        assert!(example.contains("# capacity_bytes"));
    }

    #[test]
    fn api_listen_takes_an_address_or_off() {
        let c = load_toml(&format!("{PATHS}api_listen = \"0.0.0.0:9443\"\n"), &[]).unwrap();
        assert_eq!(c.api_listen, Some("0.0.0.0:9443".parse().unwrap()));
        let c = load_toml(&format!("{PATHS}api_listen = \"off\"\n"), &[]).unwrap();
        assert_eq!(c.api_listen, None);
        let c = load_toml(PATHS, &[("CLOUD_ENDPOINT_API_LISTEN", "OFF")]).unwrap();
        assert_eq!(c.api_listen, None);
        let c = load_toml(PATHS, &[("CLOUD_ENDPOINT_API_LISTEN", "[::1]:8443")]).unwrap();
        assert_eq!(c.api_listen, Some("[::1]:8443".parse().unwrap()));
        let err = load_toml(PATHS, &[("CLOUD_ENDPOINT_API_LISTEN", "nowhere")]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("CLOUD_ENDPOINT_API_LISTEN") && msg.contains("off"),
            "{msg}"
        );
    }

    #[test]
    fn roles_parse_and_print_by_name() {
        for role in [Role::Administrator, Role::MigrationOperator, Role::ReadOnly] {
            assert_eq!(role.to_string().parse::<Role>().unwrap(), role);
        }
        assert!("admin".parse::<Role>().is_err());
        assert!(Role::Administrator.may_migrate());
        assert!(Role::MigrationOperator.may_migrate());
        assert!(!Role::ReadOnly.may_migrate());
    }

    #[test]
    fn link_test_limits_have_defaults_and_come_from_file_or_environment() {
        let c = Config::load_with_env(None, &cert_env()).unwrap();
        assert_eq!(c.link_test, LinkTestConfig::default());
        let example = load_toml(&Config::example_toml(), &[]).unwrap();
        assert_eq!(example.link_test, LinkTestConfig::default());

        let c = load_toml(
            &format!("{PATHS}[link_test]\nmax_seconds = 30\n"),
            &[
                ("CLOUD_ENDPOINT_LINK_TEST__ENABLED", "false"),
                ("CLOUD_ENDPOINT_LINK_TEST__MAX_CONCURRENT", "5"),
                ("CLOUD_ENDPOINT_LINK_TEST__TESTS_PER_MINUTE", "1"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.link_test,
            LinkTestConfig {
                enabled: false,
                max_seconds: 30,
                max_concurrent: 5,
                tests_per_minute: 1,
            }
        );

        let err = load_toml(PATHS, &[("CLOUD_ENDPOINT_LINK_TEST__MAX_SECONDS", "0")]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("link_test.max_seconds") && msg.contains("CLOUD_ENDPOINT_LINK_TEST__MAX_SECONDS"),
            "{msg}"
        );
        let err = load_toml(&format!("{PATHS}[link_test]\nmax_minutes = 3\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("max_minutes"), "{err}");
    }

    #[test]
    fn the_idle_timeout_has_a_default_and_comes_from_file_or_environment() {
        let c = Config::load_with_env(None, &cert_env()).unwrap();
        assert_eq!(c.transport.idle_timeout_secs, 30);
        assert_eq!(c.transport.tuning().idle_timeout, std::time::Duration::from_secs(30));
        let example = load_toml(&Config::example_toml(), &[]).unwrap();
        assert_eq!(example.transport, TransportSettings::default());
        let c = load_toml(&format!("{PATHS}[transport]\nidle_timeout_secs = 5\n"), &[]).unwrap();
        assert_eq!(c.transport.tuning().idle_timeout, std::time::Duration::from_secs(5));
        let c = load_toml(PATHS, &[("CLOUD_ENDPOINT_TRANSPORT__IDLE_TIMEOUT_SECS", "3")]).unwrap();
        assert_eq!(c.transport.idle_timeout_secs, 3);
        let err = load_toml(PATHS, &[("CLOUD_ENDPOINT_TRANSPORT__IDLE_TIMEOUT_SECS", "0")]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("transport.idle_timeout_secs") && msg.contains("CLOUD_ENDPOINT_TRANSPORT__IDLE_TIMEOUT_SECS"),
            "{msg}"
        );
    }

    #[test]
    fn connection_limits_have_defaults_and_refuse_zero() {
        let c = Config::load_with_env(None, &cert_env()).unwrap();
        assert_eq!(
            (
                c.transport.max_connections,
                c.transport.max_connections_per_edge,
                c.transport.hello_timeout_secs
            ),
            (256, 48, 10)
        );
        let c = load_toml(
            &format!("{PATHS}[transport]\nmax_connections = 8\nhello_timeout_secs = 2\n"),
            &[("CLOUD_ENDPOINT_TRANSPORT__MAX_CONNECTIONS_PER_EDGE", "3")],
        )
        .unwrap();
        assert_eq!(
            (
                c.transport.max_connections,
                c.transport.max_connections_per_edge,
                c.transport.hello_timeout_secs
            ),
            (8, 3, 2)
        );
        let err = load_toml(PATHS, &[("CLOUD_ENDPOINT_TRANSPORT__MAX_CONNECTIONS", "0")]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("transport.max_connections") && msg.contains("CLOUD_ENDPOINT_TRANSPORT__MAX_CONNECTIONS"),
            "{msg}"
        );
    }

    #[test]
    fn debug_output_hides_passwords() {
        let shown = format!("{:?}", DomainConfig::default());
        assert!(!shown.contains(DEMO_PASSWORD), "{shown}");
    }

    #[test]
    fn the_hosts_api_url_is_an_https_address_or_comes_from_the_api_listener() {
        let at = |addr: &str| Some(addr.parse::<SocketAddr>().unwrap());
        let c = load_toml(PATHS, &[]).unwrap();
        assert_eq!(
            c.own_api_url(at("10.0.0.5:8443")).as_deref(),
            Some("https://10.0.0.5:8443")
        );
        assert_eq!(
            c.own_api_url(at("[fd00::5]:8443")).as_deref(),
            Some("https://[fd00::5]:8443")
        );
        // Nobody can dial these: none is recorded.
        assert_eq!(c.own_api_url(at("0.0.0.0:8443")), None);
        assert_eq!(c.own_api_url(None), None);
        let c = load_toml(
            PATHS,
            &[("CLOUD_ENDPOINT_DOMAIN__HOST__API_URL", "https://esx-a:8443/")],
        )
        .unwrap();
        assert_eq!(c.own_api_url(at("0.0.0.0:8443")).as_deref(), Some("https://esx-a:8443"));
        for bad in [
            "http://esx-a:8443",
            "esx-a:8443",
            "https://esx-a:8443/api",
            "https://",
            "not a url",
        ] {
            let err = load_toml(PATHS, &[("CLOUD_ENDPOINT_DOMAIN__HOST__API_URL", bad)]).unwrap_err();
            assert!(err.to_string().contains("domain.host.api_url"), "{bad}: {err}");
        }
        let err = load_toml(
            &format!("{PATHS}[domain]\nextra_hosts = [{{ name = \"esx-b\", cpu_cores = 2, memory_mib = 1024, api_url = \"https://esx-b:8443\" }}]\n"),
            &[],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("esx-b") && err.to_string().contains("domain.host.api_url"),
            "{err}"
        );
    }
}
