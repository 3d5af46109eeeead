//! The cloud domain's inventory: a vCenter-like model (datacenter, folders, cluster, host,
//! datastore, networks, VMs, users) and the record of migrations, kept in SQLite.
//!
//! Object ids carry vCenter's prefixes and come from one counter, as vCenter's managed
//! object references do (`datacenter-2`, `group-v3`, `domain-c8`, `host-9`, `vm-14`, ...;
//! number 1 is the root folder `group-d1`). Migrations are numbered on their own
//! (`migration-N`), as vCenter numbers tasks apart from objects.
//!
//! One [`Inventory`] is shared by every task of the endpoint; it holds one connection
//! behind a mutex, and its methods block (call them from `spawn_blocking`). A method that
//! changes several rows does so in one transaction.

mod chunks;
mod firewall;
mod hosts;
pub use hosts::{HostApi, VmHost};
mod leases;
pub use leases::LeaseClock;
mod migrations;
pub use chunks::{seed_disk_number, ChunkScope, ChunkSource, IndexedDisk, VmOwner};
mod password;
mod receipts;
mod schema;
mod seed;
pub mod store;
pub mod switchover;
mod vms;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::store_params;
use store::{Store, StoreError, Tx, TxError};

use crate::config::{DomainConfig, Role};

pub use firewall::VmFirewall;
pub use migrations::{CommitMove, PassTimes, PendingCommit, ResumeInfo};
pub use password::hash_password;
pub use password::MAX_CONCURRENT_CHECKS as MAX_CONCURRENT_PASSWORD_CHECKS;
pub use vms::DatastoreUse;

/// Everything that can go wrong in the inventory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InventoryError {
    /// Unknown user, inactive user or wrong password: deliberately not told apart.
    #[error("user or password not accepted by the cloud domain")]
    BadCredentials,

    #[error("user {user:?} has role {role}, which may not migrate VMs into the cloud domain; ask for the MigrationOperator or Administrator role")]
    NotPermitted { user: String, role: Role },

    #[error("the cloud domain already has a VM named {name:?}, or one is being migrated in; choose another name")]
    NameTaken { name: String },

    #[error("{what} is not in the inventory")]
    NotFound { what: String },

    /// Checked again inside the transaction that reserves the space: another migration
    /// may have taken it since the plan was checked.
    #[error("datastore {datastore} has {free} bytes free for new disks now, and the disks placed on it need {needed} bytes (migrations that started since the plan was checked took space); free space, wait for them to end, or choose another datastore")]
    NoSpace { datastore: String, needed: u64, free: u64 },

    #[error("cannot read the free space of datastore {datastore}: {reason}; check its folder")]
    FreeSpace { datastore: String, reason: String },

    #[error("migration {id} is being served by endpoint {owner} of this domain; ask that endpoint (its API), or wait until its lease expires if it is gone")]
    ServedElsewhere { id: String, owner: String },

    #[error("migration {id} is {state}, not RUNNING")]
    MigrationNotRunning { id: String, state: String },

    /// A request that contradicts itself or the inventory (e.g. two disks with one key).
    #[error("invalid inventory request: {0}")]
    Invalid(String),

    #[error("inventory database {}: {source}; {}", path.display(), db_advice(source))]
    Db {
        /// The database file (empty only inside this module, before it is filled in).
        path: PathBuf,
        #[source]
        source: StoreError,
    },

    #[error("cannot create the folder of the inventory database {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot make the inventory database file {} private (mode 0600): {source}; give the file to the user the endpoint runs as", path.display())]
    Private {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("inventory database {} has schema version {found}, newer than this cloud-endpoint knows ({supported}); run a newer cloud-endpoint or use another database file", path.display())]
    SchemaTooNew { path: PathBuf, found: i64, supported: i64 },

    #[error("cannot hash the password of user {user:?}: {reason}")]
    PasswordHash { user: String, reason: String },

    #[error("cannot issue the receipt of migration {id}: {reason}; the VM was not registered")]
    Receipt { id: String, reason: String },
}

/// What to do about a database error: a transaction that kept losing races to other
/// endpoints' is contention, not a database this endpoint may not write.
fn db_advice(source: &StoreError) -> &'static str {
    if source.is_retryable() {
        "other endpoints' transactions kept conflicting with this one, which was run again each time until it gave up: retry in a moment, and if it persists, look at the database's load"
    } else {
        "check that it is a cloud-endpoint inventory that this endpoint may write (a file on a writable disk, or a PostgreSQL database its user owns)"
    }
}

impl From<StoreError> for InventoryError {
    /// The path is filled in by [`Inventory`] before the error leaves it.
    fn from(source: StoreError) -> Self {
        InventoryError::Db {
            path: PathBuf::new(),
            source,
        }
    }
}

impl From<rusqlite::Error> for InventoryError {
    fn from(source: rusqlite::Error) -> Self {
        StoreError::from(source).into()
    }
}

impl TxError for InventoryError {
    fn store_error(&self) -> Option<&StoreError> {
        match self {
            InventoryError::Db { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl InventoryError {
    fn with_path(self, file: &Path) -> Self {
        match self {
            InventoryError::Db { path, source } if path.as_os_str().is_empty() => InventoryError::Db {
                path: file.to_owned(),
                source,
            },
            InventoryError::SchemaTooNew { path, found, supported } if path.as_os_str().is_empty() => {
                InventoryError::SchemaTooNew {
                    path: file.to_owned(),
                    found,
                    supported,
                }
            }
            other => other,
        }
    }
}

/// An authenticated user of the cloud domain.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user: String,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DatastoreInfo {
    pub id: String,
    pub name: String,
    /// The configured quota; `None` = the filesystem's size.
    pub capacity_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkInfo {
    pub id: String,
    pub name: String,
}

/// The fixed part of the domain, for the datacenter, folder, cluster and host listings.
#[derive(Debug, Clone, Serialize)]
pub struct DomainInfo {
    pub datacenter: DatacenterInfo,
    /// Every folder, root folder `group-d1` first.
    pub folders: Vec<FolderInfo>,
    pub cluster: ClusterInfo,
    pub host: HostInfo,
    pub datastore: DatastoreInfo,
    /// The VM folder migrated VMs are registered in.
    pub vm_folder: String,
    /// Every cluster, host, datastore and resource pool (root pools first), in creation
    /// order; `cluster`, `host` and `datastore` above are the default placement.
    pub clusters: Vec<ClusterInfo>,
    pub hosts: Vec<HostInfo>,
    pub datastores: Vec<DatastoreInfo>,
    pub resource_pools: Vec<PoolInfo>,
}

/// A resource pool: a cluster's root pool ("Resources", `parent` None) or a child of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolInfo {
    pub id: String,
    pub name: String,
    pub cluster: String,
    pub parent: Option<String>,
    /// Most memory / vCPUs one VM in the pool may have.
    pub memory_limit_mib: Option<u64>,
    pub cpu_limit_cores: Option<u32>,
}

/// What vSphere calls every cluster's root resource pool.
pub const ROOT_POOL_NAME: &str = "Resources";

/// The root resource pool of a cluster. It has no row, but in vSphere every cluster has
/// one (its "Resources"), holding the cluster's VMs, and vAPI's cluster info requires its
/// id. It takes the cluster's number (`domain-c8` gives `resgroup-8`), which no other
/// object has: all numbers come from one counter.
/// The key a login name is matched by: the name in ASCII lower case, so that
/// `administrator@CLOUD.LOCAL` and `Administrator@cloud.local` are
/// `administrator@cloud.local`.
///
/// vCenter Single Sign-On matches the domain part without regard to case (a domain is a
/// DNS name), and the user part too: its own domain (`vsphere.local`) lives in an LDAP
/// directory (vmdir) that matches account names case-insensitively, as Active Directory
/// does, so `Administrator@VSPHERE.LOCAL` logs in as `administrator@vsphere.local`.
/// ASCII only, as SQLite's NOCASE: domain names are ASCII, and folding other scripts'
/// cases would need a Unicode table the throttle and the database agree on. The throttle
/// counts failures per key, so a name's case is no way around a lockout.
pub fn user_key(name: &str) -> String {
    name.to_ascii_lowercase()
}

pub fn root_resource_pool(cluster: &str) -> String {
    match cluster.strip_prefix("domain-c") {
        Some(n) => format!("resgroup-{n}"),
        None => format!("resgroup-{cluster}"),
    }
}

/// Where a migrated VM is registered. `None` fields take the domain's default placement.
#[derive(Debug, Clone, Default)]
pub struct VmPlacement {
    pub host: Option<String>,
    pub datastore: Option<String>,
    pub folder: Option<String>,
    /// A child pool's id; `None` is the root pool of the host's cluster.
    pub resource_pool: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatacenterInfo {
    pub id: String,
    pub name: String,
    pub vm_folder: String,
    pub host_folder: String,
    pub datastore_folder: String,
    pub network_folder: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FolderInfo {
    pub id: String,
    pub name: String,
    /// vSphere's folder type: DATACENTER, HOST, DATASTORE, NETWORK or VIRTUAL_MACHINE.
    pub kind: String,
    /// A folder or datacenter id; `None` for the root folder.
    pub parent: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterInfo {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostInfo {
    pub id: String,
    pub name: String,
    pub cluster: String,
    pub cpu_cores: u32,
    pub memory_mib: u64,
}

/// A VM to register at the end of a migration.
#[derive(Debug, Clone)]
pub struct NewVm {
    pub name: String,
    pub guest_os: String,
    pub num_cpus: u32,
    pub cores_per_socket: Option<u32>,
    pub memory_mib: u64,
    pub firmware: Option<String>,
    pub bios_uuid: Option<String>,
    /// Datastore path of the .vmx, e.g. `[cloud-ds1] web01/web01.vmx`.
    pub vmx_path: String,
    pub disks: Vec<NewDisk>,
    /// The disks' controllers with their types, as the .vmx declares them.
    pub controllers: Vec<gateway::plan::ControllerSpec>,
    pub nics: Vec<NewNic>,
    /// The VM's firewall rules; references to the VM itself (by `firewall.source_vm` or
    /// `name`) and to VMs of the domain are stored rewritten to their ids.
    pub firewall: gateway::plan::FirewallSpec,
    pub placement: VmPlacement,
}

#[derive(Debug, Clone)]
pub struct NewDisk {
    /// Controller slot, e.g. `scsi0:0`.
    pub key: String,
    /// Datastore path of the file the .vmx names: a VMDK descriptor
    /// (`[cloud-ds1] web01/web01.vmdk`), a qcow2 or a raw image (`web01.qcow2`, `web01.img`).
    pub path: String,
    pub capacity_bytes: u64,
    /// The datastore id the disk is on; `None` = the VM's.
    pub datastore: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewNic {
    /// e.g. `ethernet0`.
    pub key: String,
    /// The cloud network (`network-N`) the NIC is mapped to.
    pub network_id: String,
    pub mac: Option<String>,
    pub virtual_dev: Option<String>,
    /// `static`, `generated` or `vpx`, as the .vmx says.
    pub address_type: Option<String>,
    /// The network name the NIC had at the source.
    pub source_network: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmRecord {
    pub id: String,
    pub name: String,
    pub guest_os: String,
    pub num_cpus: u32,
    pub cores_per_socket: Option<u32>,
    pub memory_mib: u64,
    pub firmware: Option<String>,
    pub bios_uuid: Option<String>,
    /// POWERED_OFF for a migrated VM.
    pub power_state: String,
    /// Host id.
    pub host: String,
    /// Datastore id.
    pub datastore: String,
    /// Folder id.
    pub folder: String,
    /// Resource pool id: its cluster's root pool unless placed in a child pool.
    pub resource_pool: String,
    pub vmx_path: String,
    pub disks: Vec<DiskRecord>,
    /// The disks' controllers with their types; a controller without one here (a VM
    /// registered before schema step 9) has its bus's default type, as its .vmx says.
    pub controllers: Vec<gateway::plan::ControllerSpec>,
    pub nics: Vec<NicRecord>,
    /// The migration that brought the VM in.
    pub migration: Option<String>,
    /// RFC 3339, UTC.
    pub created: String,
    /// vCenter's instance UUID (`vc.uuid`), given at registration.
    pub instance_uuid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskRecord {
    pub key: String,
    pub path: String,
    pub capacity_bytes: u64,
    /// Datastore id of the disk.
    pub datastore: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NicRecord {
    pub key: String,
    /// Network id.
    pub network: String,
    pub network_name: String,
    pub mac: Option<String>,
    pub virtual_dev: Option<String>,
    /// `static`, `generated` or `vpx`.
    pub address_type: Option<String>,
    pub source_network: String,
}

impl VmRecord {
    /// The type of the controller `key` (`scsi0`), as its .vmx says.
    pub fn controller_type(&self, key: &str) -> Option<gateway::plan::ControllerType> {
        gateway::plan::controller_type_in(&self.controllers, key)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct MigrationRecord {
    pub id: String,
    pub vm_name: String,
    pub user: String,
    /// Which edge agent sent it (e.g. its certificate's name).
    pub edge: String,
    /// RUNNING, SUCCEEDED or FAILED.
    pub state: String,
    pub error: Option<String>,
    /// The registered VM, once SUCCEEDED.
    pub vm: Option<String>,
    /// RFC 3339, UTC.
    pub started: String,
    pub finished: Option<String>,
    pub logical_bytes: u64,
    /// Whether the endpoint issued a signed receipt (every SUCCEEDED migration has
    /// one): `GET /api/gateway/migrations/{id}/receipt`.
    pub has_receipt: bool,
    /// Plaintext bytes the cloud copied from disks it already held (this user's or this
    /// edge's) instead of receiving them: deduplicated, they did not cross the WAN.
    pub dedup_bytes: u64,
    /// A replication: its passes so far (absent for a cold lift, and for a
    /// replication whose first pass has not ended).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<ReplicaRecord>,
}

#[cfg(test)]
impl MigrationRecord {
    /// A 1 GiB cold lift of web01 in `state`, for the API's task tests (REST and SOAP).
    pub(crate) fn sample(state: &str) -> MigrationRecord {
        MigrationRecord {
            id: "migration-3".into(),
            vm_name: "web01".into(),
            user: "migrator@cloud.local".into(),
            edge: "edge-01".into(),
            state: state.into(),
            error: None,
            vm: None,
            started: "2024-05-01T10:00:00.06Z".into(),
            finished: None,
            logical_bytes: 1 << 30,
            has_receipt: false,
            dedup_bytes: 0,
            replica: None,
        }
    }
}

/// The passes of a replication, as the cloud recorded them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaRecord {
    /// Passes that ended with the replica read back and kept.
    pub syncs: u64,
    /// When the last one ended, RFC 3339 UTC: the replica holds the source as it was
    /// read then.
    pub last_sync: String,
    /// Plaintext bytes the last pass wrote into the replica.
    pub last_delta_bytes: u64,
    /// `syncing` (a pass runs now), `in sync` (waiting for the next pass or the
    /// switchover), `done` (switched over, or ended); filled by the API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<&'static str>,
    /// Seconds since the last pass ended: how far the replica may be behind the source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<i64>,
    /// The scheduled switchover, RFC 3339 UTC: set by `edge-agent replicate
    /// --switchover-at` or `PATCH /api/gateway/migrations/{id}`; the edge learns it at
    /// its next pass.
    pub switchover_at: Option<String>,
    /// The daily window (`HH:MM-HH:MM`, UTC) the scheduled switchover must start in:
    /// set by `edge-agent replicate --switchover-window` or the API's PATCH; filled by
    /// the API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switchover_window: Option<String>,
    /// How long the last pass took, from the edge's login to `SyncDone` (reading and
    /// hashing the source, sending what changed), and its read-back, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_pass_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_read_back_ms: Option<u64>,
    /// How long a switchover started now would take (its downtime before a power-on),
    /// forecast from the last pass (see docs/replication.md); filled by the API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forecast_switchover_seconds: Option<u64>,
    /// When a switchover would be done: at the scheduled time (or now, if none is
    /// scheduled or it is past) plus the forecast; filled by the API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forecast_done_at: Option<String>,
    /// Where the switchover stands as recorded (`awaiting confirm`, `done`,
    /// `rolling back`, `rolled back`); `state` says it for the operator.
    #[serde(skip)]
    pub switchover_state: Option<String>,
    /// The last switchover's downtime: from `downtime_from` to the VM running in the
    /// cloud, in milliseconds (absent when the VM was not powered on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// What the downtime counts from: `source stopped by the edge`, `source files last
    /// written` (the operator had stopped a VMware source before: its files' last
    /// modification, an estimate), or `switchover started` (the operator had stopped it,
    /// and its files do not say when).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_from: Option<String>,
    /// Who rolled back or confirmed the last switchover, and how (`"alice@x through the
    /// API"`, `"alice@x with edge-agent"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switchover_ended_by: Option<String>,
    /// Receipts of switchovers rolled back since: kept, no longer current
    /// (`GET /api/gateway/migrations/{id}/receipt` gives the current one only).
    pub superseded_receipts: u64,
}

/// What a receipt states that only the registering transaction knows.
#[derive(Debug, Clone, Copy)]
pub struct ReceiptContext<'a> {
    pub migration_id: &'a str,
    /// The id the VM is being registered with.
    pub vm_id: &'a str,
    /// When the migration began (its plan was accepted), RFC 3339 UTC.
    pub planned_at: &'a str,
    /// When it is committed: the migration's `finished` time, RFC 3339 UTC.
    pub committed_at: &'a str,
}

/// A VM registered with its receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredVm {
    pub vm_id: String,
    /// The signed receipt, as stored.
    pub receipt: String,
}

/// The inventory database. See the module documentation.
#[derive(Debug)]
pub struct Inventory {
    /// The SQLite file, or the PostgreSQL URL without its password: what errors name.
    path: PathBuf,
    store: Store,
}

/// Makes `file` readable and writable by its owner only (0600), if it exists.
fn private_file(file: &Path) -> Result<(), InventoryError> {
    use std::os::unix::fs::PermissionsExt as _;
    match std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        result => result.map_err(|source| InventoryError::Private {
            path: file.to_owned(),
            source,
        }),
    }
}

impl Inventory {
    /// Opens (or creates) the database at `path`, brings its schema up to date and makes
    /// the domain match `domain`: on first start everything is created; later, new
    /// networks and users are added, changed passwords and roles are applied, users no
    /// longer configured are deactivated (kept for the history, unable to log in), the
    /// datastore's capacity follows the config, and nothing is deleted.
    pub fn open(path: &Path, domain: &DomainConfig) -> Result<Inventory, InventoryError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| InventoryError::Io {
                path: parent.to_owned(),
                source,
            })?;
        }
        let store = store::SqliteStore::open(path).map_err(|e| InventoryError::from(e).with_path(path))?;
        let inventory = Inventory::on(Store::Sqlite(store), path.to_owned(), domain)?;
        // Password hashes, users, every VM: the endpoint's only, whatever the umask made
        // of the files (or an older version left). SQLite gives its -wal and -shm files
        // the database file's mode when it creates them.
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.as_os_str().to_owned();
            file.push(suffix);
            private_file(Path::new(&file))?;
        }
        Ok(inventory)
    }

    /// The inventory `config` names: its PostgreSQL database if it has one, else its
    /// SQLite file.
    pub fn open_configured(config: &crate::config::Config) -> Result<Inventory, InventoryError> {
        match &config.database_url {
            Some(url) => Inventory::open_postgres(url, &config.domain),
            None => Inventory::open(&config.database, &config.domain),
        }
    }

    /// [`Inventory::open`] on a PostgreSQL database that several endpoints share
    /// (`postgres://user:password@host/db`): the schema is brought up to date by the
    /// first endpoint that starts, and the domain made to match `domain` as for a file.
    pub fn open_postgres(url: &str, domain: &DomainConfig) -> Result<Inventory, InventoryError> {
        let store = store::PgStore::connect(url)?;
        let shown = PathBuf::from(format!("{store}"));
        Inventory::on(Store::Postgres(Box::new(store)), shown, domain)
    }

    fn on(store: Store, path: PathBuf, domain: &DomainConfig) -> Result<Inventory, InventoryError> {
        let inventory = Inventory { path, store };
        schema::upgrade(&inventory.store).map_err(|e| e.with_path(&inventory.path))?;
        let shared = inventory.dialect() == store::Dialect::Postgres;
        inventory.write(|tx| seed::reconcile(tx, domain, shared))?;
        Ok(inventory)
    }

    /// The database file (or URL, without its password).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Which engine holds the inventory.
    pub fn dialect(&self) -> store::Dialect {
        self.store.dialect()
    }

    /// Runs `f` in a read-only transaction and names the database in its errors.
    fn read<T>(&self, f: impl FnMut(&mut dyn Tx) -> Result<T, InventoryError>) -> Result<T, InventoryError> {
        self.store.read(f).map_err(|e| e.with_path(&self.path))
    }

    /// Runs `f` in a transaction that writes (see [`Store::write`]: on PostgreSQL it may
    /// run again after losing a race, so it has no effect outside the database).
    fn write<T>(&self, f: impl FnMut(&mut dyn Tx) -> Result<T, InventoryError>) -> Result<T, InventoryError> {
        self.store.write(f).map_err(|e| e.with_path(&self.path))
    }

    /// Checks a user's password. Unknown and deactivated users cost one hash too, and all
    /// failures look the same, so neither the answer nor its timing tells which was wrong.
    /// Unthrottled: the endpoint's logins go through [`crate::logins::Logins`].
    #[cfg(test)]
    pub(crate) fn authenticate(&self, user: &str, password: &str) -> Result<Principal, InventoryError> {
        let admitted = self.authenticate_admitted(user, password, || Ok::<(), std::convert::Infallible>(()));
        admitted.unwrap_or_else(|never| match never {})
    }

    /// [`Inventory::authenticate`], once `admit` agrees. At most a few password checks
    /// run at once; `admit` runs when this one's turn has come, right before its hash, so
    /// that a throttle sees the failures of the checks this one waited for. Its error is
    /// returned as is, and no hash runs.
    pub fn authenticate_admitted<E>(
        &self,
        user: &str,
        password: &str,
        admit: impl FnOnce() -> Result<(), E>,
    ) -> Result<Result<Principal, InventoryError>, E> {
        password::bounded(|| {
            admit()?;
            Ok(self.check_password(user, password))
        })
    }

    /// Active users whose password is `password` (the endpoint asks this of the published
    /// demo password before it serves beyond loopback). One hash per active user.
    pub fn users_with_password(&self, password: &str) -> Result<Vec<String>, InventoryError> {
        let users: Vec<(String, String)> = self.read(|tx| {
            Ok(tx.query_map(
                "SELECT name, password_hash FROM app_user WHERE active = 1 ORDER BY name",
                &[],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?)
        })?;
        Ok(users
            .into_iter()
            .filter(|(_, hash)| password::bounded(|| password::verify(hash, password)))
            .map(|(name, _)| name)
            .collect())
    }

    fn check_password(&self, user: &str, password: &str) -> Result<Principal, InventoryError> {
        // The name as typed, in any case (see [`user_key`]); the session gets it as
        // configured. An active user comes before a deactivated one whose name differs
        // only in case, and the exact spelling first.
        // `lower` folds ASCII only on both engines (SQLite's; PostgreSQL's under the C
        // collation the schema gives `name`), as [`user_key`] does.
        let row: Option<(String, String, String, bool)> = self.read(|tx| {
            Ok(tx.query_row_opt(
                "SELECT name, password_hash, role, active FROM app_user WHERE lower(name) = lower(?1) \
                 ORDER BY active DESC, CASE WHEN name = ?1 THEN 0 ELSE 1 END LIMIT 1",
                store_params![user],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
            )?)
        })?;
        // The hash runs outside the lock: it takes tens of milliseconds.
        match row {
            Some((name, hash, role, true)) => {
                if !password::verify(&hash, password) {
                    return Err(InventoryError::BadCredentials);
                }
                let role = role
                    .parse::<Role>()
                    .map_err(|e| InventoryError::Invalid(e.to_string()))?;
                Ok(Principal { user: name, role })
            }
            _ => {
                password::verify(password::dummy_hash(), password);
                Err(InventoryError::BadCredentials)
            }
        }
    }

    /// The datastore migrated VMs are written to (one, for now).
    pub fn datastore(&self) -> Result<DatastoreInfo, InventoryError> {
        self.read(|tx| {
            Ok(tx.query_row(
                "SELECT d.id, d.name, d.capacity_bytes FROM datastore d JOIN placement p ON p.datastore = d.id",
                &[],
                |row| {
                    Ok(DatastoreInfo {
                        id: row.get(0)?,
                        name: row.get(1)?,
                        capacity_bytes: row.get(2)?,
                    })
                },
            )?)
        })
    }

    /// The cloud networks, ordered by id number.
    pub fn networks(&self) -> Result<Vec<NetworkInfo>, InventoryError> {
        self.read(|tx| {
            Ok(tx.query_map("SELECT id, name FROM network ORDER BY num", &[], |row| {
                Ok(NetworkInfo {
                    id: row.get(0)?,
                    name: row.get(1)?,
                })
            })?)
        })
    }

    pub fn network_by_name(&self, name: &str) -> Result<Option<NetworkInfo>, InventoryError> {
        self.read(|tx| {
            Ok(tx.query_row_opt(
                "SELECT id, name FROM network WHERE name = ?1",
                store_params![name],
                |row| {
                    Ok(NetworkInfo {
                        id: row.get(0)?,
                        name: row.get(1)?,
                    })
                },
            )?)
        })
    }

    /// Datacenter, folders, cluster, host and datastore of the domain.
    pub fn domain(&self) -> Result<DomainInfo, InventoryError> {
        self.read(|tx| seed::domain_info(tx))
    }
}

/// Now, as RFC 3339 in UTC.
fn now() -> String {
    timestamp(time::OffsetDateTime::now_utc())
}

/// A time as the inventory stores it: RFC 3339 in UTC.
pub fn timestamp(t: time::OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

/// The state and reserved VM name of a migration, or NotFound. Here, not in
/// `migrations`, because every part of the inventory that acts on a migration asks it.
fn state_of(tx: &mut dyn Tx, id: &str) -> Result<(String, String), InventoryError> {
    tx.query_row_opt(
        "SELECT state, vm_name FROM migration WHERE id = ?1",
        store_params![id],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?
    .ok_or_else(|| InventoryError::NotFound {
        what: format!("migration {id}"),
    })
}

/// Takes the next number of a counter (`moref` for objects, `migration`).
fn next_number(tx: &mut dyn Tx, counter: &str) -> Result<i64, StoreError> {
    tx.query_row(
        "UPDATE counter SET last = last + 1 WHERE name = ?1 RETURNING last",
        store_params![counter],
        |row| row.get(0),
    )
}
