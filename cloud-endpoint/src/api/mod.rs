//! The cloud domain's vSphere API over HTTPS, so that vSphere clients (curl, Ansible
//! `vmware_rest`, PowerCLI, the Python SDK) see the migrated VMs as they would in a
//! vCenter.
//!
//! ```text
//! health     /healthz and /readyz, without a session (probes)
//! dashboard  the web page at /ui/ (its files; its data comes from /api with a session)
//! https      TCP accept loop, TLS (the endpoint's certificate, no client certificates),
//!            HTTP/1.1 and HTTP/2, limits, graceful shutdown
//! session    login sessions in memory: tokens, idle expiry, a cap (clock passed in)
//! error      vAPI's standard error kinds, rendered per protocol
//! vcenter    the com.vmware.vcenter services over the inventory, protocol-neutral
//! gateway    the gateway's own resources (migration records)
//! tasks      com.vmware.cis.tasks: migrations shown as vSphere tasks
//! rest       the REST protocol at /api: routes, session checks, query filters
//! legacy_rest  the older REST API at /rest: calls translated to /api, answers rewrapped
//! appliance  com.vmware.appliance.system.version
//! vapi       the vAPI JSON-RPC protocol at POST /api (the vSphere Automation SDKs)
//! soap       the vim25 SOAP API at /sdk (pyvmomi, govmomi, PowerCLI): its own sessions,
//!            the same users, login throttle and services
//! access     the access log line and request metrics of every request
//! metrics    GET /metrics: on the API port (session or bearer token) and on a plain
//!            listener of its own
//! ```
//!
//! Both protocols share `session`, `error` and the services: a session from one works in
//! the other, and a list answers the same objects for the same filter.

mod access;
pub mod appliance;
pub mod dashboard;
pub mod error;
pub mod gateway;
pub mod health;
mod https;
mod legacy_rest;
pub mod metrics;
pub mod rest;
pub mod session;
pub mod soap;
pub mod tasks;
pub mod vapi;
pub mod vcenter;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

pub use https::{server_tls, ApiServeError};

use crate::config::ApiSettings;
use crate::Domain;
use error::ApiError;
use session::{Now, SessionStore};

/// What every request handler shares.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub domain: Arc<Domain>,
    pub sessions: Arc<SessionStore>,
    /// The bearer token that may read `GET /metrics` without a session (`metrics.bearer_token`).
    pub metrics_token: Option<Arc<str>>,
    /// The SOAP API's sessions, views, filters and tasks, apart from REST's sessions.
    pub soap: Arc<soap::SoapState>,
}

impl ApiState {
    pub fn new(domain: Arc<Domain>, settings: &ApiSettings) -> ApiState {
        ApiState {
            domain,
            sessions: Arc::new(SessionStore::new(settings)),
            metrics_token: None,
            soap: Arc::new(soap::SoapState::new(settings)),
        }
    }

    /// Lets `token` read `GET /metrics` without a session (an empty token lets nobody).
    pub fn with_metrics_token(mut self, token: Option<String>) -> ApiState {
        self.metrics_token = token.filter(|t| !t.is_empty()).map(Arc::from);
        self
    }

    /// Checks a user and password of the cloud domain, for a client at `source`, and
    /// starts a session; returns its token. Bad credentials, a locked-out user and a
    /// throttled address are UNAUTHENTICATED; a full login queue or session table is
    /// SERVICE_UNAVAILABLE with a time to try again. Both protocols log in here.
    pub async fn login(&self, user: String, password: String, source: IpAddr) -> Result<String, ApiError> {
        self.login_into(&self.sessions, user, password, source, "API").await
    }

    /// [`ApiState::login`] into session store `store`: the REST and vAPI sessions, or the
    /// SOAP ones (`via` names the protocol in the login log and throttle).
    pub async fn login_into(
        &self,
        store: &SessionStore,
        user: String,
        password: String,
        source: IpAddr,
        via: &'static str,
    ) -> Result<String, ApiError> {
        // argon2 takes tens of milliseconds of CPU: the login gate runs it off the async
        // workers, a few at a time, and refuses at once what its queue cannot hold.
        let domain = self.domain.clone();
        let principal = self
            .domain
            .logins
            .login(source, via, move || {
                domain
                    .logins
                    .authenticate(&domain.inventory, &user, &password, source, via)
            })
            .await?;
        let (user, role) = (principal.user.clone(), principal.role);
        let token = store.create(principal, Now::current())?;
        tracing::info!(user = ?user, %role, %source, via, "API session started");
        Ok(token)
    }
}

/// Serves the API on `listener` with `tls` (see [`server_tls`]) until `shutdown`
/// completes; then stops accepting, lets requests in flight finish (a few seconds at
/// most) and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: rustls::ServerConfig,
    state: ApiState,
    settings: &ApiSettings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ApiServeError> {
    // The probes answer without a session; the rest of the API needs one.
    let app = health::router(state.domain.clone()).merge(rest::router(state));
    https::serve(listener, Arc::new(tls), app, settings, shutdown).await
}

/// Entry points of the fuzz target of the API's request bodies (`fuzz/fuzz_targets/api_bodies.rs`),
/// replayed over its seeds by `cloud-endpoint/tests/fuzz_regressions.rs`.
pub mod fuzzing {
    /// A body of `POST /api` (vAPI JSON-RPC) or of `POST /api/gateway/plans` (a migration
    /// plan): parsed and checked as the endpoint does before it touches the inventory.
    /// Must never panic.
    pub fn bodies(data: &[u8]) {
        super::vapi::fuzz_body(data);
        let _ = super::gateway::plan_of_body(data);
    }

    /// A body of `POST /sdk` (a vim25 SOAP call): parsed within its bounds and its filter
    /// specs read, as the endpoint does before it touches the inventory. Must never panic.
    pub fn soap_request(data: &[u8]) {
        super::soap::fuzz_request(data);
    }
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
