//! The cloud endpoint: terminates migrations from edge agents, verifies every
//! chunk, writes the disks into its datastore and registers each VM in its own
//! vCenter-like inventory. The binary is a thin shell over [`Endpoint`].
//!
//! ```text
//! config      TOML + environment, with a built-in demo domain
//! inventory   the domain in SQLite: datacenter, cluster, host, datastore,
//!             networks, folders, users (argon2), VMs, migrations
//! datastore   the files: staging, disks as flat VMDKs, qcow2 or raw images,
//!             descriptors, .vmx
//! server      QUIC accept loop; per connection a ReceiverSession driver
//! ```
#![forbid(unsafe_code)]

pub mod config;
pub mod datastore;
pub mod inventory;
pub mod server;

use std::future::Future;
use std::net::UdpSocket;
use std::sync::Arc;

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
}

/// The cloud domain a migration lands in: inventory plus datastore files.
#[derive(Debug)]
pub struct Domain {
    pub inventory: Inventory,
    pub datastore: Datastore,
    /// How the endpoint names itself to edges.
    pub endpoint_name: String,
}

/// A configured endpoint, ready to serve.
#[derive(Debug)]
pub struct Endpoint {
    pub config: Config,
    pub domain: Arc<Domain>,
    tls: rustls::ServerConfig,
}

impl Endpoint {
    /// Opens (creating on first start) the inventory and datastore, loads the
    /// certificates, and cleans what a previous run left: staging folders and
    /// migrations that were running when it stopped.
    pub fn open(config: Config) -> Result<Endpoint, EndpointError> {
        let chain = certs::load_certs(&config.cert)?;
        let key = certs::load_key(&config.key)?;
        let edge_cas = certs::load_certs(&config.edge_ca)?;
        let tls = gateway::transport::server_crypto(chain.clone(), key, &edge_cas)?;
        let inventory = Inventory::open(&config.database, &config.domain)?;
        // The stored name wins: VM paths already carry it.
        let datastore = Datastore::open(
            &config.datastore_dir,
            &inventory.datastore()?.name,
            config.domain.datastore.capacity_bytes,
        )?
        .with_disk_format(config.domain.datastore.disk_format);
        for id in inventory.fail_running_migrations("the cloud endpoint stopped while the migration ran")? {
            tracing::warn!(migration = %id, "marked FAILED: interrupted by a restart");
        }
        for path in datastore.clean_staging()? {
            tracing::warn!(path = %path.display(), "removed leftover staging folder");
        }
        let endpoint_name = format!("{} ({})", config.domain.host.name, certs::Thumbprint::of_der(&chain[0]));
        Ok(Endpoint {
            domain: Arc::new(Domain {
                inventory,
                datastore,
                endpoint_name,
            }),
            config,
            tls,
        })
    }

    /// Serves on an already bound UDP socket until `shutdown` completes.
    pub async fn run(&self, socket: UdpSocket, shutdown: impl Future<Output = ()>) -> Result<(), EndpointError> {
        server::run(
            socket,
            self.domain.clone(),
            self.tls.clone(),
            self.config.max_concurrent_migrations,
            shutdown,
        )
        .await
    }

    /// Binds the configured listen address.
    pub fn bind(&self) -> Result<UdpSocket, EndpointError> {
        Ok(gateway::transport::bind_udp(
            self.config.listen,
            &gateway::transport::TransportTuning::default(),
        )?)
    }
}
