//! The cloud domain's vSphere API over HTTPS, so that vSphere clients (curl, Ansible
//! `vmware_rest`, PowerCLI, the Python SDK) see the migrated VMs as they would in a
//! vCenter.
//!
//! ```text
//! https      TCP accept loop, TLS (the endpoint's certificate, no client certificates),
//!            HTTP/1.1 and HTTP/2, limits, graceful shutdown
//! session    login sessions in memory: tokens, idle expiry, a cap (clock passed in)
//! error      vAPI's standard error kinds, rendered per protocol
//! vcenter    the com.vmware.vcenter services over the inventory, protocol-neutral
//! gateway    the gateway's own resources (migration records)
//! tasks      com.vmware.cis.tasks: migrations shown as vSphere tasks
//! rest       the REST protocol at /api: routes, session checks, query filters
//! vapi       the vAPI JSON-RPC protocol at POST /api (the vSphere Automation SDKs)
//! ```
//!
//! Both protocols share `session`, `error` and the services: a session from one works in
//! the other, and a list answers the same objects for the same filter.

pub mod error;
pub mod gateway;
mod https;
pub mod rest;
pub mod session;
pub mod tasks;
pub mod vapi;
pub mod vcenter;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::Semaphore;

pub use https::{server_tls, ApiServeError};

use crate::Domain;
use error::ApiError;
use session::{Now, SessionStore};

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

    /// Checks a user and password of the cloud domain, for a client at `source`, and
    /// starts a session; returns its token. Bad credentials, a locked-out user and a
    /// throttled address are UNAUTHENTICATED. Both protocols log in here.
    pub async fn login(&self, user: String, password: String, source: IpAddr) -> Result<String, ApiError> {
        // argon2 takes tens of milliseconds of CPU: a few logins at a time, each off the
        // async workers, so a flood of logins cannot starve the other requests.
        let slot = self
            .login_slots
            .acquire()
            .await
            .map_err(|e| ApiError::internal("the login queue is closed", &e))?;
        let domain = self.domain.clone();
        let result = tokio::task::spawn_blocking(move || {
            domain
                .logins
                .authenticate(&domain.inventory, &user, &password, source, "API")
        })
        .await
        .map_err(|e| ApiError::internal("the login failed inside the endpoint", &e))?;
        // A failure's answer is held with the slot given back: held answers must not
        // keep the next logins waiting.
        drop(slot);
        crate::logins::hold_answer(&result).await;
        let principal = result?;
        tracing::info!(user = %principal.user, role = %principal.role, %source, "API session started");
        Ok(self.sessions.create(principal, Now::current()))
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
