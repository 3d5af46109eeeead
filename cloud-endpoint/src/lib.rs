//! The cloud endpoint: terminates migrations from edge agents, verifies every
//! chunk, writes the disks into its datastore and registers each VM in its own
//! vCenter-like inventory. The binary is a thin shell over [`Endpoint`].
//!
//! ```text
//! config      TOML + environment, with a built-in demo domain
//! inventory   the domain in SQLite: datacenter, cluster, host, datastore,
//!             networks, folders, users (argon2), VMs, migrations
//! logins      every password login goes through its queue bound and throttle
//!             (per user and per client address) before a hash runs
//! health      what the probes report: QUIC listening or draining
//! logging     log lines peers cannot forge (control characters escaped), JSON lines
//! metrics     the Prometheus metrics (counters moved where things happen, the rest
//!             read from the domain at each scrape)
//! datastore   the files: staging, disks as flat VMDKs, qcow2 or raw images,
//!             descriptors, .vmx
//! server      QUIC accept loop; per connection a ReceiverSession driver
//! hosts       the host runs powered-on VMs as QEMU processes (QMP)
//! api         the vSphere API over HTTPS (REST at /api): sessions, inventory,
//!             power, consoles
//! ```
#![forbid(unsafe_code)]

pub mod api;
pub mod cluster;
pub mod config;
pub mod datastore;
pub mod health;
pub mod hosts;
pub mod inventory;
pub mod logging;
pub mod logins;
pub mod metrics;
pub mod server;

use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use config::Config;
use datastore::Datastore;
use inventory::Inventory;

/// Why the endpoint cannot start or serve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Inventory(#[from] inventory::InventoryError),
    #[error(transparent)]
    Datastore(#[from] datastore::DatastoreError),
    #[error(transparent)]
    Certificate(#[from] certs::Error),
    #[error(transparent)]
    Transport(#[from] gateway::transport::TransportError),
    #[error("the endpoint certificate or key cannot serve the HTTPS API: {0}")]
    ApiTls(#[source] rustls::Error),
    #[error("cannot listen for the API on TCP {addr}: {source}; choose another `api_listen` (CLOUD_ENDPOINT_API_LISTEN) or \"off\"")]
    ApiBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Api(#[from] api::ApiServeError),
    #[error("cannot listen for metrics on TCP {addr}: {source}; choose another `metrics.listen` (CLOUD_ENDPOINT_METRICS__LISTEN) or \"off\"")]
    MetricsBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}; check the configured `cert` and `key` (CLOUD_ENDPOINT_CERT, CLOUD_ENDPOINT_KEY)")]
    Receipts(#[from] gateway::receipt::ReceiptError),
    #[error(transparent)]
    Revoked(#[from] server::revoked::RevokedError),
    #[error("cannot find the VMs that ran before the restart again: {0}")]
    Hosts(#[from] hosts::HostError),
    #[error("cannot record where the other endpoints of the domain reach this one: {0}")]
    Announce(#[source] hosts::HostError),
    #[error(
        "refusing to serve on {addresses}, which is not loopback, while {users} still have the published demo \
         password; give each user its own password in the config file's [[domain.users]] (`cloud-endpoint \
         hash-password` prints a `password_hash` line), or set `allow_default_passwords = true` \
         (CLOUD_ENDPOINT_ALLOW_DEFAULT_PASSWORDS=true) for a lab"
    )]
    DefaultPasswords { addresses: String, users: String },
}

/// The cloud domain a migration lands in: inventory plus datastore files.
#[derive(Debug)]
pub struct Domain {
    pub inventory: Inventory,
    /// The default datastore (`datastore_dir`).
    pub datastore: Datastore,
    /// The other datastores (`domain.extra_datastores`), each in its own folder.
    pub extra_datastores: Vec<Datastore>,
    /// How the endpoint names itself to edges.
    pub endpoint_name: String,
    /// Signs the receipt of every committed migration with the endpoint's TLS key.
    pub receipts: gateway::receipt::ReceiptSigner,
    /// The migrations a connection serves now.
    pub live: server::live::LiveMigrations,
    /// The powered-on VMs' QEMU processes.
    pub hosts: hosts::Hosts,
    /// The login throttle every password login goes through.
    pub logins: logins::Logins,
    /// Edge certificates refused right after their handshake.
    pub revoked_edges: server::revoked::RevokedEdges,
    /// Listening or draining, for `/readyz`.
    pub health: health::Health,
    /// The Prometheus metrics.
    pub metrics: metrics::EndpointMetrics,
    /// The recent link and progress samples of each served migration (the dashboard's charts).
    pub links: server::links::LinkHistory,
    /// Which migrations this endpoint owns (their leases), when several share the domain.
    pub ownership: Arc<cluster::ownership::Ownership>,
    /// Held (written) while a pass's or a commit's chunks are indexed for deduplication,
    /// which happens after the edge has its answer; a plan reads it before it is offered
    /// deduplication, so the next migration finds the chunks of the one before it.
    pub indexing: Arc<tokio::sync::RwLock<()>>,
}

impl Domain {
    /// Every datastore with a folder on this endpoint, the default first.
    pub fn datastores(&self) -> impl Iterator<Item = &Datastore> {
        std::iter::once(&self.datastore).chain(&self.extra_datastores)
    }

    /// The datastore of that name, if this endpoint has its folder.
    pub fn datastore_named(&self, name: &str) -> Option<&Datastore> {
        self.datastores().find(|ds| ds.name() == name)
    }
}

/// Refuses an endpoint that would serve beyond loopback while a user still has the
/// published demo password (anyone who read the README could log in as administrator),
/// unless `allow_default_passwords` says so; then it warns, at every start.
fn refuse_default_passwords(config: &Config, inventory: &Inventory) -> Result<(), EndpointError> {
    let exposed: Vec<String> = std::iter::once(config.listen)
        .chain(config.api_listen)
        .filter(|addr| !addr.ip().is_loopback())
        .map(|addr| addr.to_string())
        .collect();
    if exposed.is_empty() {
        return Ok(());
    }
    let users = inventory.users_with_password(config::DEMO_PASSWORD)?;
    if users.is_empty() {
        return Ok(());
    }
    let (addresses, users) = (exposed.join(" and "), users.join(", "));
    if config.allow_default_passwords {
        tracing::warn!(
            %addresses,
            %users,
            "SERVING WITH THE PUBLISHED DEMO PASSWORD beyond loopback (allow_default_passwords = true): \
             anyone who can reach the endpoint can log in as these users"
        );
        return Ok(());
    }
    Err(EndpointError::DefaultPasswords { addresses, users })
}

/// A configured endpoint, ready to serve.
#[derive(Debug)]
pub struct Endpoint {
    pub config: Config,
    pub domain: Arc<Domain>,
    tls: rustls::ServerConfig,
    api_tls: rustls::ServerConfig,
}

impl Endpoint {
    /// Opens (creating on first start) the inventory and datastore, loads the
    /// certificates, and cleans what a previous run left: staging folders and
    /// migrations that were running when it stopped.
    pub fn open(config: Config) -> Result<Endpoint, EndpointError> {
        let chain = certs::load_certs(&config.cert)?;
        let key = certs::load_key(&config.key)?;
        let edge_cas = certs::load_certs(&config.edge_ca)?;
        let revoked_edges = server::revoked::RevokedEdges::open(config.revoked_edge_serials.as_deref())?;
        let receipts = gateway::receipt::ReceiptSigner::new(&chain, &key)?;
        let tls = gateway::transport::server_crypto(chain.clone(), key.clone_key(), &edge_cas)?;
        let api_tls = api::server_tls(chain.clone(), key).map_err(EndpointError::ApiTls)?;
        let inventory = Inventory::open_configured(&config)?;
        refuse_default_passwords(&config, &inventory)?;
        // The stored name wins: VM paths already carry it.
        let datastore = Datastore::open(
            &config.datastore_dir,
            &inventory.datastore()?.name,
            config.domain.datastore.capacity_bytes,
        )?
        .with_disk_format(config.domain.datastore.disk_format);
        let extra_datastores = config
            .domain
            .extra_datastores
            .iter()
            .map(|ds| Datastore::open(&ds.dir, &ds.name, ds.capacity_bytes).map(|d| d.with_disk_format(ds.disk_format)))
            .collect::<Result<Vec<_>, _>>()?;
        let me = config.domain.host.name.clone();
        let ownership = cluster::ownership::Ownership::new(&me, config.migration_lease());
        // An edge notices this endpoint's death only after the QUIC idle timeout: past the
        // lease, that timeout and not the lease is when its migrations move on.
        if config.database_url.is_some() && config.transport.idle_timeout_secs > config.migration_lease_secs {
            tracing::warn!(
                idle_timeout_secs = config.transport.idle_timeout_secs,
                migration_lease_secs = config.migration_lease_secs,
                "if this endpoint dies, its edges notice after transport.idle_timeout_secs, longer than a lease:                  set transport.idle_timeout_secs to migration_lease_secs or lower for failover within two lease periods"
            );
        }
        // A commit a crash cut is finished (VM registered) or undone (folders back in
        // staging) before anything looks at staging. On a shared database, commits
        // another endpoint is making now are its own business.
        for id in server::placement::recover_commits(&inventory, &me)? {
            tracing::info!(migration = %id, "recovered a commit cut by the last stop");
        }
        // Migrations cut by the restart (and those of endpoints that died) wait for their
        // edge to resume them, here or at another endpoint of the domain.
        let (failed, waiting) =
            inventory.interrupt_running_migrations("the cloud endpoint stopped while the migration ran", &me)?;
        for id in failed {
            tracing::warn!(migration = %id, "marked FAILED: interrupted by a restart, with no resume record");
        }
        for id in &waiting {
            tracing::info!(migration = %id, "interrupted by a restart; waiting for its edge to resume it");
        }
        // Everything under .staging that no RUNNING migration of the domain owns is an
        // orphan. Listed first, then compared with the migrations: a folder another
        // endpoint creates meanwhile belongs to a migration recorded before it.
        for ds in std::iter::once(&datastore).chain(&extra_datastores) {
            let listed = ds.staging_folders()?;
            let running = inventory.running_migrations()?;
            for path in ds.remove_staging_folders(listed, |name| running.iter().any(|r| r == name))? {
                tracing::warn!(path = %path.display(), "removed leftover staging folder");
            }
        }
        let endpoint_name = format!("{} ({})", config.domain.host.name, certs::Thumbprint::of_der(&chain[0]));
        let this_host = hosts::peers::this_host(
            &inventory,
            &config.domain.host.name,
            certs::Thumbprint::of_der(&chain[0]),
        )?;
        Ok(Endpoint {
            domain: Arc::new(Domain {
                inventory,
                datastore,
                extra_datastores,
                endpoint_name,
                receipts,
                live: Default::default(),
                hosts: hosts::Hosts::new(config.domain.host.memory_mib, config.domain.host.cpu_cores)
                    .with_qemu_user(&config.qemu_user)
                    .on_host(this_host),
                logins: logins::Logins::new(&config.logins),
                revoked_edges,
                health: Default::default(),
                metrics: metrics::EndpointMetrics::new(),
                links: Default::default(),
                ownership,
                indexing: Default::default(),
            }),
            config,
            tls,
            api_tls,
        })
    }

    /// Serves migrations on an already bound UDP socket until `shutdown` completes.
    pub async fn run(&self, socket: UdpSocket, shutdown: impl Future<Output = ()>) -> Result<(), EndpointError> {
        self.run_all(socket, None, None, shutdown).await
    }

    /// Serves migrations on `socket` and, given listeners, the API and the plain-HTTP
    /// metrics on them, until `shutdown` completes. If either server fails, the other is
    /// stopped too and the error returned.
    pub async fn run_all(
        &self,
        socket: UdpSocket,
        api_listener: Option<tokio::net::TcpListener>,
        metrics_listener: Option<tokio::net::TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), EndpointError> {
        // Before serving: peers call this run's address and token from here on.
        let api_bound = api_listener.as_ref().map(|l| l.local_addr().ok());
        let api_url = api_bound.and_then(|bound| self.config.own_api_url(bound));
        hosts::peers::announce(&self.domain, api_url)
            .await
            .map_err(EndpointError::Announce)?;
        // VMs left running by the previous run are this run's again (or POWERED_OFF).
        hosts::Hosts::recover(&self.domain).await?;
        hosts::test_boot::remove_leftovers(&self.domain).await;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            // The sender outlives both servers, so this only ends on `true`.
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let stop = &stop;
        let quic = async {
            let result = server::run(
                socket,
                self.domain.clone(),
                self.tls.clone(),
                (
                    self.config.max_concurrent_migrations,
                    gateway::protocol::ReceiverConfig {
                        verify: self.config.verify_staged.scope(),
                        hello_timeout: std::time::Duration::from_secs(u64::from(
                            self.config.transport.hello_timeout_secs,
                        )),
                        ..Default::default()
                    },
                ),
                &self.config.transport,
                &self.config.link_test,
                (wait(stopped.clone()), self.config.shutdown_grace()),
            )
            .await;
            stop.send_replace(true);
            result
        };
        let state = api::ApiState::new(self.domain.clone(), &self.config.api)
            .with_metrics_token(self.config.metrics.bearer_token.clone());
        let metrics = async {
            if let Some(listener) = metrics_listener {
                api::metrics::serve_plain(listener, state.clone(), wait(stopped.clone())).await;
            }
        };
        let api = async {
            let Some(listener) = api_listener else {
                return Ok(());
            };
            let result = api::serve(
                listener,
                self.api_tls.clone(),
                state.clone(),
                &self.config.api,
                wait(stopped.clone()),
            )
            .await;
            stop.send_replace(true);
            result.map_err(EndpointError::from)
        };
        let trigger = async {
            tokio::select! {
                _ = shutdown => {}
                _ = wait(stopped.clone()) => {}
            }
            stop.send_replace(true);
        };
        // Interrupted migrations nobody resumed in time give their space back.
        let janitor = async {
            let window = Duration::from_secs(self.config.resume_window_hours.saturating_mul(3600));
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            let expire = async {
                loop {
                    tick.tick().await;
                    let domain = self.domain.clone();
                    let _ = tokio::task::spawn_blocking(move || server::placement::expire(&domain, window)).await;
                }
            };
            tokio::select! {
                _ = expire => {}
                _ = cluster::ownership::keep_leases(self.domain.ownership.clone(), self.domain.clone()) => {}
                _ = server::placement::adopt_orphans(self.domain.clone()) => {}
                _ = wait(stopped.clone()) => {}
            }
        };
        let (quic, api, (), (), ()) = tokio::join!(quic, api, trigger, janitor, metrics);
        // Powered-on VMs run on, as on an ESXi host whose vCenter restarts.
        self.domain.hosts.detach().await;
        quic.and(api)
    }

    /// Binds the configured API address (`api_listen`); `None` when the API is off.
    pub async fn bind_api(&self) -> Result<Option<tokio::net::TcpListener>, EndpointError> {
        let Some(addr) = self.config.api_listen else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| EndpointError::ApiBind { addr, source })?;
        Ok(Some(listener))
    }

    /// Binds the configured plain-HTTP metrics address (`metrics.listen`); `None` when off.
    pub async fn bind_metrics(&self) -> Result<Option<tokio::net::TcpListener>, EndpointError> {
        let Some(addr) = self.config.metrics.listen else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| EndpointError::MetricsBind { addr, source })?;
        Ok(Some(listener))
    }

    /// Binds the configured listen address.
    pub fn bind(&self) -> Result<UdpSocket, EndpointError> {
        Ok(gateway::transport::bind_udp(
            self.config.listen,
            &self.config.transport.tuning(),
        )?)
    }
}
