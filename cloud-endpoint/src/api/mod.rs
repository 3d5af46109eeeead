//! The cloud domain's vSphere API over HTTPS, so that vSphere clients (curl, Ansible
//! `vmware_rest`, PowerCLI, later the Python SDK) see the migrated VMs as they would in a
//! vCenter.
//!
//! ```text
//! https      TCP accept loop, TLS (the endpoint's certificate, no client certificates),
//!            HTTP/1.1 and HTTP/2, limits, graceful shutdown
//! session    login sessions in memory: tokens, idle expiry, a cap (clock passed in)
//! error      vAPI's standard error kinds, rendered per protocol
//! vcenter    the com.vmware.vcenter services over the inventory, protocol-neutral
//! gateway    the gateway's own resources (migration records)
//! rest       the REST protocol at /api: routes, session checks, query filters
//! ```
//!
//! Protocols to come sit beside `rest` and reuse `session`, `error` and the services:
//! vAPI JSON-RPC at `POST /api`, relocation tasks (`com.vmware.cis.tasks`).

pub mod error;
pub mod gateway;
mod https;
pub mod rest;
pub mod session;
pub mod vcenter;

use std::future::Future;
use std::sync::Arc;

use tokio::sync::Semaphore;

pub use https::{server_tls, ApiServeError};

use crate::Domain;
use error::ApiError;
use session::SessionStore;

/// Logins (argon2 hashes) verified at once; more wait their turn.
const CONCURRENT_LOGINS: usize = 4;

/// What every request handler shares.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub domain: Arc<Domain>,
    pub sessions: Arc<SessionStore>,
    login_slots: Arc<Semaphore>,
}

impl ApiState {
    pub fn new(domain: Arc<Domain>) -> ApiState {
        ApiState {
            domain,
            sessions: Arc::new(SessionStore::default()),
            login_slots: Arc::new(Semaphore::new(CONCURRENT_LOGINS)),
        }
    }
}

/// Serves the API on `listener` with `tls` (see [`server_tls`]) until `shutdown`
/// completes; then stops accepting, lets requests in flight finish (a few seconds at
/// most) and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: rustls::ServerConfig,
    domain: Arc<Domain>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ApiServeError> {
    let app = rest::router(ApiState::new(domain));
    https::serve(listener, Arc::new(tls), app, shutdown).await
}

/// Runs `op` on tokio's blocking pool: the inventory and the datastore block.
async fn blocking<T: Send + 'static>(
    domain: &Arc<Domain>,
    op: impl FnOnce(&Domain) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let domain = domain.clone();
    tokio::task::spawn_blocking(move || op(&domain))
        .await
        .map_err(|e| ApiError::internal("the request failed inside the endpoint", &e))?
}
