//! The database schema as a list of steps. `PRAGMA user_version` records how many steps a
//! file has; opening applies the missing ones in order, each in its own transaction with
//! its version bump, so a crash leaves the file at a whole step. Steps are never edited
//! once released: a change is a new step.

use rusqlite::{Connection, TransactionBehavior};

use super::store::Store;
use super::InventoryError;
use crate::store_params;

/// Step `i` brings a database from version `i` to `i + 1`.
const STEPS: &[&str] = &[V1, V2, V3, V4, V5, V6, V7, V8, V9, V10, V11, V12, V13, V14, V15];

/// The schema version this build writes.
pub(super) const VERSION: i64 = STEPS.len() as i64;

const V1: &str = r#"
-- Numbering: one counter for vCenter-style objects ('moref'), one for migrations.
CREATE TABLE counter (
    name TEXT PRIMARY KEY,
    last INTEGER NOT NULL
) STRICT;
INSERT INTO counter (name, last) VALUES ('moref', 0), ('migration', 0);

-- Folders: the root folder (group-d1) and each datacenter's vm/host/datastore/network
-- folders and their subfolders. `parent` is a folder or a datacenter id.
CREATE TABLE folder (
    id TEXT PRIMARY KEY,
    num INTEGER NOT NULL UNIQUE,
    name TEXT NOT NULL,
    type TEXT NOT NULL CHECK (type IN ('DATACENTER', 'HOST', 'DATASTORE', 'NETWORK', 'VIRTUAL_MACHINE')),
    parent TEXT
) STRICT;

CREATE TABLE datacenter (
    id TEXT PRIMARY KEY,
    num INTEGER NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    parent TEXT NOT NULL REFERENCES folder (id),
    vm_folder TEXT NOT NULL REFERENCES folder (id),
    host_folder TEXT NOT NULL REFERENCES folder (id),
    datastore_folder TEXT NOT NULL REFERENCES folder (id),
    network_folder TEXT NOT NULL REFERENCES folder (id)
) STRICT;

CREATE TABLE cluster (
    id TEXT PRIMARY KEY,
    num INTEGER NOT NULL UNIQUE,
    name TEXT NOT NULL,
    folder TEXT NOT NULL REFERENCES folder (id)
) STRICT;

CREATE TABLE host (
    id TEXT PRIMARY KEY,
    num INTEGER NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    cluster TEXT NOT NULL REFERENCES cluster (id),
    cpu_cores INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL
) STRICT;

CREATE TABLE datastore (
    id TEXT PRIMARY KEY,
    num INTEGER NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    folder TEXT NOT NULL REFERENCES folder (id),
    capacity_bytes INTEGER CHECK (capacity_bytes >= 0)
) STRICT;

CREATE TABLE network (
    id TEXT PRIMARY KEY,
    num INTEGER NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    folder TEXT NOT NULL REFERENCES folder (id)
) STRICT;

-- Where migrated VMs land: one row.
CREATE TABLE placement (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 0),
    datacenter TEXT NOT NULL REFERENCES datacenter (id),
    folder TEXT NOT NULL REFERENCES folder (id),
    cluster TEXT NOT NULL REFERENCES cluster (id),
    host TEXT NOT NULL REFERENCES host (id),
    datastore TEXT NOT NULL REFERENCES datastore (id)
) STRICT;

-- Users are deactivated, never deleted: migrations keep naming them.
CREATE TABLE app_user (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('Administrator', 'MigrationOperator', 'ReadOnly')),
    active INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1))
) STRICT;

CREATE TABLE vm (
    id TEXT PRIMARY KEY,
    num INTEGER NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    guest_os TEXT NOT NULL,
    num_cpus INTEGER NOT NULL CHECK (num_cpus >= 0),
    cores_per_socket INTEGER,
    memory_mib INTEGER NOT NULL CHECK (memory_mib >= 0),
    firmware TEXT,
    bios_uuid TEXT,
    power_state TEXT NOT NULL CHECK (power_state IN ('POWERED_ON', 'POWERED_OFF', 'SUSPENDED')),
    host TEXT NOT NULL REFERENCES host (id),
    datastore TEXT NOT NULL REFERENCES datastore (id),
    folder TEXT NOT NULL REFERENCES folder (id),
    vmx_path TEXT NOT NULL,
    created TEXT NOT NULL
) STRICT;

CREATE TABLE vm_disk (
    vm TEXT NOT NULL REFERENCES vm (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    key TEXT NOT NULL,
    path TEXT NOT NULL,
    capacity_bytes INTEGER NOT NULL CHECK (capacity_bytes >= 0),
    PRIMARY KEY (vm, position),
    UNIQUE (vm, key)
) STRICT;

CREATE TABLE vm_nic (
    vm TEXT NOT NULL REFERENCES vm (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    key TEXT NOT NULL,
    network TEXT NOT NULL REFERENCES network (id),
    mac TEXT,
    virtual_dev TEXT,
    source_network TEXT NOT NULL,
    PRIMARY KEY (vm, position),
    UNIQUE (vm, key)
) STRICT;
CREATE INDEX vm_nic_network ON vm_nic (network);

CREATE TABLE migration (
    num INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    vm_name TEXT NOT NULL,
    user_name TEXT NOT NULL,
    edge TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('RUNNING', 'SUCCEEDED', 'FAILED')),
    error TEXT,
    vm TEXT UNIQUE REFERENCES vm (id),
    started TEXT NOT NULL,
    finished TEXT,
    logical_bytes INTEGER NOT NULL CHECK (logical_bytes >= 0)
) STRICT;
-- A running migration holds its VM name: a second one for the same name cannot start.
CREATE UNIQUE INDEX migration_running_name ON migration (vm_name) WHERE state = 'RUNNING';
"#;

/// VMs get vCenter's instance UUID (`vc.uuid`), which the REST API shows as
/// `identity.instance_uuid`; VMs registered before this step get a random one (version 4),
/// as vCenter gives one to every VM it registers.
const V2: &str = r#"
ALTER TABLE vm ADD COLUMN instance_uuid TEXT;
UPDATE vm SET instance_uuid =
    lower(hex(randomblob(4))) || '-' || lower(hex(randomblob(2))) || '-4' || substr(lower(hex(randomblob(2))), 2)
    || '-' || substr('89ab', 1 + abs(random() % 4), 1) || substr(lower(hex(randomblob(2))), 2)
    || '-' || lower(hex(randomblob(6)));
"#;

/// The signed receipt of each migration that registered a VM, written in the transaction
/// that registers the VM. `signed` is the document exactly as it was handed to the edge,
/// so the API returns it byte for byte. `vm` has no foreign key on purpose: a receipt is
/// evidence of what arrived, and must outlive the VM if it is ever removed.
const V3: &str = r#"
CREATE TABLE receipt (
    migration TEXT PRIMARY KEY REFERENCES migration (id),
    vm TEXT NOT NULL UNIQUE,
    signed TEXT NOT NULL,
    created TEXT NOT NULL
) STRICT;
"#;

/// What a RUNNING migration needs to be resumed after its connection ends: the edge
/// certificate that may continue it (SHA-256 thumbprint), its plan (postcard, compared
/// byte for byte with the one a resuming edge sends), the disk format chosen, and since
/// when it has had no connection (NULL while one serves it). Migrations that started
/// before this step have no plan and cannot be resumed.
const V4: &str = r#"
ALTER TABLE migration ADD COLUMN edge_cert TEXT;
ALTER TABLE migration ADD COLUMN plan BLOB;
ALTER TABLE migration ADD COLUMN disk_format TEXT;
ALTER TABLE migration ADD COLUMN interrupted TEXT;
"#;

/// Distributed-firewall rules carried with a migrated VM, and the report of each
/// migration that registered a VM. A rule keeps its indexed fields in columns and the whole
/// rule (sources, destinations, services, applied-to, VM references rewritten to ids) as
/// JSON; groups and IP sets are the VM's own, as the rules that name them. The report is
/// written in the transaction that registers the VM, like the receipt, and like it has no
/// foreign key to the VM: it records what happened, and outlives the VM.
const V5: &str = r#"
CREATE TABLE firewall_rule (
    vm TEXT NOT NULL REFERENCES vm (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    rule_id TEXT NOT NULL,
    name TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('ALLOW', 'DROP', 'REJECT')),
    direction TEXT NOT NULL CHECK (direction IN ('IN', 'OUT', 'IN_OUT')),
    disabled INTEGER NOT NULL CHECK (disabled IN (0, 1)),
    rule TEXT NOT NULL,
    PRIMARY KEY (vm, position),
    UNIQUE (vm, rule_id)
) STRICT;

CREATE TABLE firewall_group (
    vm TEXT NOT NULL REFERENCES vm (id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('GROUP', 'IP_SET')),
    name TEXT NOT NULL,
    members TEXT NOT NULL,
    PRIMARY KEY (vm, kind, name)
) STRICT;

CREATE TABLE migration_report (
    migration TEXT PRIMARY KEY REFERENCES migration (id),
    report TEXT NOT NULL,
    created TEXT NOT NULL
) STRICT;
"#;

/// Placement choices: child resource pools of a cluster (its root pool, "Resources", has
/// no row: its id `resgroup-N` follows the cluster's number), each VM's pool (NULL: the
/// root pool of its host's cluster), each disk's datastore (another than the VM's when a
/// migration placed it so; earlier disks are on their VM's), and the space a running
/// migration holds on each datastore (earlier migrations hold theirs on the default one).
/// Hosts, datastores and VM folders beyond the first reuse the V1 tables. The two new
/// columns carry no foreign key: SQLite cannot drop a column that has one, and the
/// upgrade tests rebuild older files by dropping them; registration writes only ids it
/// has just resolved in the same inventory.
const V6: &str = r#"
CREATE TABLE resource_pool (
    id TEXT PRIMARY KEY,
    num INTEGER NOT NULL UNIQUE,
    name TEXT NOT NULL,
    cluster TEXT NOT NULL REFERENCES cluster (id),
    memory_limit_mib INTEGER CHECK (memory_limit_mib >= 0),
    cpu_limit_cores INTEGER CHECK (cpu_limit_cores >= 0),
    UNIQUE (cluster, name)
) STRICT;
ALTER TABLE vm ADD COLUMN resource_pool TEXT;
ALTER TABLE vm_disk ADD COLUMN datastore TEXT;
UPDATE vm_disk SET datastore = (SELECT datastore FROM vm WHERE vm.id = vm_disk.vm);
CREATE TABLE migration_space (
    migration TEXT NOT NULL REFERENCES migration (id),
    datastore TEXT NOT NULL REFERENCES datastore (id),
    bytes INTEGER NOT NULL CHECK (bytes >= 0),
    PRIMARY KEY (migration, datastore)
) STRICT;
"#;

/// A commit in progress: the staging folders a migration is moving into place, recorded
/// before the first move and cleared once the VM is registered and its journal removed,
/// so a restart finishes or undoes a commit a crash cut (see `server/placement/commit.rs`).
const V7: &str = r#"
ALTER TABLE migration ADD COLUMN commit_moves TEXT;
"#;

/// Replications: a RUNNING migration whose staging is kept, between passes, as the
/// replica of a source that keeps running (see `server/placement/replica.rs`). A
/// replica never expires with `resume_window_hours`.
const V8: &str = r#"
ALTER TABLE migration ADD COLUMN replica_syncs INTEGER NOT NULL DEFAULT 0;
ALTER TABLE migration ADD COLUMN replica_synced TEXT;
ALTER TABLE migration ADD COLUMN replica_delta_bytes INTEGER;
"#;

/// The copy's hardware: each VM's disk controllers with their types (`pvscsi`,
/// `lsilogic`, `lsisas1068`, `buslogic`, `ahci`, `nvme`, `ide`) and each NIC's address type
/// (`static`, `generated`, `vpx`). VMs registered before this step have no controller rows:
/// their .vmx was written with every SCSI controller `lsilogic`, which is also what a
/// controller without a row reads as; their NICs get the address type their .vmx was
/// written with (`static` with a MAC, else `generated`).
const V9: &str = r#"
CREATE TABLE vm_controller (
    vm TEXT NOT NULL REFERENCES vm (id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    type TEXT NOT NULL,
    PRIMARY KEY (vm, key)
) STRICT;
ALTER TABLE vm_nic ADD COLUMN address_type TEXT;
UPDATE vm_nic SET address_type = CASE WHEN mac IS NULL THEN 'generated' ELSE 'static' END;
"#;

/// The switchover lifecycle of replications: the scheduled switchover (`switchover_at`,
/// RFC 3339 UTC, set by the edge or through the API), where a switchover stands
/// (`switchover_state`: `awaiting confirm`, `done`, `rolling back`, `rolled back`), the
/// downtime it cost (`downtime_ms`, and `downtime_from`: what the downtime counts from),
/// each pass's duration and read-back (`replica_pass_ms`, `replica_read_back_ms`, for the
/// forecast), and the receipts of switchovers rolled back since (`superseded_receipt`):
/// a receipt is moved there, never changed, so that a migration has one current receipt.
const V10: &str = r#"
ALTER TABLE migration ADD COLUMN switchover_at TEXT;
ALTER TABLE migration ADD COLUMN switchover_state TEXT;
ALTER TABLE migration ADD COLUMN downtime_ms INTEGER;
ALTER TABLE migration ADD COLUMN downtime_from TEXT;
ALTER TABLE migration ADD COLUMN replica_pass_ms INTEGER;
ALTER TABLE migration ADD COLUMN replica_read_back_ms INTEGER;
CREATE TABLE superseded_receipt (
    migration TEXT NOT NULL REFERENCES migration (id),
    vm TEXT NOT NULL,
    signed TEXT NOT NULL,
    created TEXT NOT NULL,
    superseded TEXT NOT NULL
) STRICT;
"#;

/// Deduplication (protocol version 8): the chunk hashes of the disks the cloud holds
/// (registered VMs and replicas), keyed by hash. A `chunk_source` is one disk: where its
/// data file is, in which format, who lifted it (`user_name`, `edge_cert`: dedup never
/// crosses to another user or edge) and with which hash (`hash`, so that an index of
/// another algorithm is never trusted). Removing the VM removes its sources and their
/// chunks. `dedup_bytes`: bytes a migration copied inside the cloud instead of receiving.
const V11: &str = r#"
ALTER TABLE migration ADD COLUMN dedup_bytes INTEGER;
CREATE TABLE chunk_source (
    id INTEGER PRIMARY KEY,
    migration TEXT NOT NULL REFERENCES migration (id),
    vm TEXT REFERENCES vm (id) ON DELETE CASCADE,
    disk INTEGER NOT NULL,
    data_path TEXT NOT NULL,
    format TEXT NOT NULL,
    capacity INTEGER NOT NULL CHECK (capacity >= 0),
    user_name TEXT NOT NULL,
    edge_cert TEXT,
    hash TEXT NOT NULL,
    UNIQUE (migration, disk)
) STRICT;
CREATE TABLE chunk_index (
    hash BLOB NOT NULL,
    source INTEGER NOT NULL REFERENCES chunk_source (id) ON DELETE CASCADE,
    offset INTEGER NOT NULL CHECK (offset >= 0),
    len INTEGER NOT NULL CHECK (len > 0)
) STRICT;
CREATE INDEX chunk_index_hash ON chunk_index (hash);
CREATE INDEX chunk_index_source ON chunk_index (source);
"#;

/// The daily window a replication's scheduled switchover must start in
/// (`HH:MM-HH:MM`, UTC; protocol version 9), set by the edge or the API beside
/// `switchover_at`.
const V12: &str = r#"
ALTER TABLE migration ADD COLUMN switchover_window TEXT;
"#;

/// Which endpoint of a scale-out domain owns each migration (see `cluster::lease`): its
/// name, the epoch (owners so far) and when, on the database's clock in milliseconds,
/// another endpoint may take it over. A migration that ends keeps its row, expired, so
/// that its epoch never goes back.
const V13: &str = r#"
CREATE TABLE migration_lease (
    migration TEXT PRIMARY KEY REFERENCES migration (id),
    owner TEXT NOT NULL,
    epoch INTEGER NOT NULL CHECK (epoch > 0),
    expires_ms INTEGER NOT NULL
) STRICT;
"#;

/// Where each host's endpoint answers the others (see `hosts::peers`): its API's URL,
/// the SHA-256 thumbprint of its certificate (pinned by the endpoint that calls it) and
/// the token it accepts from its peers, renewed at each start. Empty until an endpoint
/// of that host has started with this build.
const V14: &str = r#"
ALTER TABLE host ADD COLUMN api_url TEXT;
ALTER TABLE host ADD COLUMN api_thumbprint TEXT;
ALTER TABLE host ADD COLUMN api_token TEXT;
"#;

/// Who ended a replication's switchover, and how (`switchover_ended_by`: "migrator@x
/// through the API", "migrator@x with edge-agent"): the edge that ran the switchover
/// learns from it that a rollback or confirmation happened through the API.
const V15: &str = r#"
ALTER TABLE migration ADD COLUMN switchover_ended_by TEXT;
"#;

/// Applies the missing steps of either engine. Refuses a database written by a newer build.
pub(super) fn upgrade(store: &Store) -> Result<(), InventoryError> {
    match store {
        Store::Sqlite(sqlite) => upgrade_sqlite(&mut sqlite.lock()),
        Store::Postgres(_) => upgrade_postgres(store),
    }
}

fn upgrade_sqlite(conn: &mut Connection) -> Result<(), InventoryError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if found > VERSION {
        return Err(InventoryError::SchemaTooNew {
            path: Default::default(),
            found,
            supported: VERSION,
        });
    }
    for (index, step) in STEPS.iter().enumerate().skip(usize::try_from(found).unwrap_or(0)) {
        // Immediate: two processes opening a new file at once do not both apply a step.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if current > index as i64 {
            continue;
        }
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
        tx.commit()?;
        tracing::info!(version = index + 1, "inventory schema upgraded");
    }
    Ok(())
}

/// PostgreSQL's steps, by the version each brings the database to, numbered as SQLite's:
/// a database of either engine at version N has the same tables and columns. PostgreSQL
/// started at version 11, so its first step is the whole schema of SQLite's steps 1 to
/// 11; every later step is written for both engines.
pub(super) const PG_STEPS: &[(i64, &str)] = &[(11, PG_V11), (12, PG_V12), (13, PG_V13), (14, PG_V14), (15, PG_V15)];

/// SQLite's steps 1 to 11 in PostgreSQL's words: `BIGINT` for every integer (the store
/// reads integers as 64-bit), `BYTEA` for blobs, an identity column where SQLite had a
/// rowid alias that the code lets the database number, `"offset"` quoted (a keyword
/// there), and user names in the C collation so that `lower()` folds ASCII only, as the
/// login code and SQLite do.
const PG_V11: &str = r#"
CREATE TABLE counter (
    name TEXT PRIMARY KEY,
    last BIGINT NOT NULL
);
INSERT INTO counter (name, last) VALUES ('moref', 0), ('migration', 0);

CREATE TABLE folder (
    id TEXT PRIMARY KEY,
    num BIGINT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    type TEXT NOT NULL CHECK (type IN ('DATACENTER', 'HOST', 'DATASTORE', 'NETWORK', 'VIRTUAL_MACHINE')),
    parent TEXT
);

CREATE TABLE datacenter (
    id TEXT PRIMARY KEY,
    num BIGINT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    parent TEXT NOT NULL REFERENCES folder (id),
    vm_folder TEXT NOT NULL REFERENCES folder (id),
    host_folder TEXT NOT NULL REFERENCES folder (id),
    datastore_folder TEXT NOT NULL REFERENCES folder (id),
    network_folder TEXT NOT NULL REFERENCES folder (id)
);

CREATE TABLE cluster (
    id TEXT PRIMARY KEY,
    num BIGINT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    folder TEXT NOT NULL REFERENCES folder (id)
);

CREATE TABLE host (
    id TEXT PRIMARY KEY,
    num BIGINT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    cluster TEXT NOT NULL REFERENCES cluster (id),
    cpu_cores BIGINT NOT NULL,
    memory_mib BIGINT NOT NULL
);

CREATE TABLE datastore (
    id TEXT PRIMARY KEY,
    num BIGINT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    folder TEXT NOT NULL REFERENCES folder (id),
    capacity_bytes BIGINT CHECK (capacity_bytes >= 0)
);

CREATE TABLE network (
    id TEXT PRIMARY KEY,
    num BIGINT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    folder TEXT NOT NULL REFERENCES folder (id)
);

CREATE TABLE placement (
    singleton BIGINT PRIMARY KEY CHECK (singleton = 0),
    datacenter TEXT NOT NULL REFERENCES datacenter (id),
    folder TEXT NOT NULL REFERENCES folder (id),
    cluster TEXT NOT NULL REFERENCES cluster (id),
    host TEXT NOT NULL REFERENCES host (id),
    datastore TEXT NOT NULL REFERENCES datastore (id)
);

CREATE TABLE app_user (
    name TEXT COLLATE "C" PRIMARY KEY,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('Administrator', 'MigrationOperator', 'ReadOnly')),
    active BIGINT NOT NULL DEFAULT 1 CHECK (active IN (0, 1))
);

CREATE TABLE vm (
    id TEXT PRIMARY KEY,
    num BIGINT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    guest_os TEXT NOT NULL,
    num_cpus BIGINT NOT NULL CHECK (num_cpus >= 0),
    cores_per_socket BIGINT,
    memory_mib BIGINT NOT NULL CHECK (memory_mib >= 0),
    firmware TEXT,
    bios_uuid TEXT,
    power_state TEXT NOT NULL CHECK (power_state IN ('POWERED_ON', 'POWERED_OFF', 'SUSPENDED')),
    host TEXT NOT NULL REFERENCES host (id),
    datastore TEXT NOT NULL REFERENCES datastore (id),
    folder TEXT NOT NULL REFERENCES folder (id),
    vmx_path TEXT NOT NULL,
    created TEXT NOT NULL,
    instance_uuid TEXT,
    resource_pool TEXT
);

CREATE TABLE vm_disk (
    vm TEXT NOT NULL REFERENCES vm (id) ON DELETE CASCADE,
    position BIGINT NOT NULL,
    key TEXT NOT NULL,
    path TEXT NOT NULL,
    capacity_bytes BIGINT NOT NULL CHECK (capacity_bytes >= 0),
    datastore TEXT,
    PRIMARY KEY (vm, position),
    UNIQUE (vm, key)
);

CREATE TABLE vm_nic (
    vm TEXT NOT NULL REFERENCES vm (id) ON DELETE CASCADE,
    position BIGINT NOT NULL,
    key TEXT NOT NULL,
    network TEXT NOT NULL REFERENCES network (id),
    mac TEXT,
    virtual_dev TEXT,
    source_network TEXT NOT NULL,
    address_type TEXT,
    PRIMARY KEY (vm, position),
    UNIQUE (vm, key)
);
CREATE INDEX vm_nic_network ON vm_nic (network);

CREATE TABLE vm_controller (
    vm TEXT NOT NULL REFERENCES vm (id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    type TEXT NOT NULL,
    PRIMARY KEY (vm, key)
);

CREATE TABLE migration (
    num BIGINT PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    vm_name TEXT NOT NULL,
    user_name TEXT NOT NULL,
    edge TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('RUNNING', 'SUCCEEDED', 'FAILED')),
    error TEXT,
    vm TEXT UNIQUE REFERENCES vm (id),
    started TEXT NOT NULL,
    finished TEXT,
    logical_bytes BIGINT NOT NULL CHECK (logical_bytes >= 0),
    edge_cert TEXT,
    plan BYTEA,
    disk_format TEXT,
    interrupted TEXT,
    commit_moves TEXT,
    replica_syncs BIGINT NOT NULL DEFAULT 0,
    replica_synced TEXT,
    replica_delta_bytes BIGINT,
    switchover_at TEXT,
    switchover_state TEXT,
    downtime_ms BIGINT,
    downtime_from TEXT,
    replica_pass_ms BIGINT,
    replica_read_back_ms BIGINT,
    dedup_bytes BIGINT
);
-- A running migration holds its VM name, across every endpoint of the domain.
CREATE UNIQUE INDEX migration_running_name ON migration (vm_name) WHERE state = 'RUNNING';

CREATE TABLE receipt (
    migration TEXT PRIMARY KEY REFERENCES migration (id),
    vm TEXT NOT NULL UNIQUE,
    signed TEXT NOT NULL,
    created TEXT NOT NULL
);

CREATE TABLE firewall_rule (
    vm TEXT NOT NULL REFERENCES vm (id) ON DELETE CASCADE,
    position BIGINT NOT NULL,
    rule_id TEXT NOT NULL,
    name TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('ALLOW', 'DROP', 'REJECT')),
    direction TEXT NOT NULL CHECK (direction IN ('IN', 'OUT', 'IN_OUT')),
    disabled BIGINT NOT NULL CHECK (disabled IN (0, 1)),
    rule TEXT NOT NULL,
    PRIMARY KEY (vm, position),
    UNIQUE (vm, rule_id)
);

CREATE TABLE firewall_group (
    vm TEXT NOT NULL REFERENCES vm (id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('GROUP', 'IP_SET')),
    name TEXT NOT NULL,
    members TEXT NOT NULL,
    PRIMARY KEY (vm, kind, name)
);

CREATE TABLE migration_report (
    migration TEXT PRIMARY KEY REFERENCES migration (id),
    report TEXT NOT NULL,
    created TEXT NOT NULL
);

CREATE TABLE resource_pool (
    id TEXT PRIMARY KEY,
    num BIGINT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    cluster TEXT NOT NULL REFERENCES cluster (id),
    memory_limit_mib BIGINT CHECK (memory_limit_mib >= 0),
    cpu_limit_cores BIGINT CHECK (cpu_limit_cores >= 0),
    UNIQUE (cluster, name)
);

CREATE TABLE migration_space (
    migration TEXT NOT NULL REFERENCES migration (id),
    datastore TEXT NOT NULL REFERENCES datastore (id),
    bytes BIGINT NOT NULL CHECK (bytes >= 0),
    PRIMARY KEY (migration, datastore)
);

CREATE TABLE superseded_receipt (
    migration TEXT NOT NULL REFERENCES migration (id),
    vm TEXT NOT NULL,
    signed TEXT NOT NULL,
    created TEXT NOT NULL,
    superseded TEXT NOT NULL
);

CREATE TABLE chunk_source (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    migration TEXT NOT NULL REFERENCES migration (id),
    vm TEXT REFERENCES vm (id) ON DELETE CASCADE,
    disk BIGINT NOT NULL,
    data_path TEXT NOT NULL,
    format TEXT NOT NULL,
    capacity BIGINT NOT NULL CHECK (capacity >= 0),
    user_name TEXT NOT NULL,
    edge_cert TEXT,
    hash TEXT NOT NULL,
    UNIQUE (migration, disk)
);
CREATE TABLE chunk_index (
    hash BYTEA NOT NULL,
    source BIGINT NOT NULL REFERENCES chunk_source (id) ON DELETE CASCADE,
    "offset" BIGINT NOT NULL CHECK ("offset" >= 0),
    len BIGINT NOT NULL CHECK (len > 0)
);
CREATE INDEX chunk_index_hash ON chunk_index (hash);
CREATE INDEX chunk_index_source ON chunk_index (source);
"#;

const PG_V12: &str = r#"
ALTER TABLE migration ADD COLUMN switchover_window TEXT;
"#;

const PG_V13: &str = r#"
CREATE TABLE migration_lease (
    migration TEXT PRIMARY KEY REFERENCES migration (id),
    owner TEXT NOT NULL,
    epoch BIGINT NOT NULL CHECK (epoch > 0),
    expires_ms BIGINT NOT NULL
);
"#;

const PG_V14: &str = r#"
ALTER TABLE host ADD COLUMN api_url TEXT;
ALTER TABLE host ADD COLUMN api_thumbprint TEXT;
ALTER TABLE host ADD COLUMN api_token TEXT;
"#;

const PG_V15: &str = r#"
ALTER TABLE migration ADD COLUMN switchover_ended_by TEXT;
"#;

/// An arbitrary key for the advisory lock under which one endpoint upgrades the schema
/// while the others starting at the same time wait.
const PG_UPGRADE_LOCK: i64 = 0x6761_7465_7761_7931;

fn upgrade_postgres(store: &Store) -> Result<(), InventoryError> {
    // READ COMMITTED: an endpoint that waited for the lock sees the tables the endpoint
    // that held it created, instead of its own snapshot from before the wait.
    store.upgrade(|tx| {
        tx.query("SELECT pg_advisory_xact_lock(?1)", store_params![PG_UPGRADE_LOCK])?;
        tx.batch("CREATE TABLE IF NOT EXISTS schema_version (singleton BIGINT PRIMARY KEY CHECK (singleton = 0), version BIGINT NOT NULL)")?;
        let found: i64 = tx
            .query_row_opt("SELECT version FROM schema_version", &[], |row| row.get(0))?
            .unwrap_or(0);
        if found > VERSION {
            return Err(InventoryError::SchemaTooNew {
                path: Default::default(),
                found,
                supported: VERSION,
            });
        }
        for (version, step) in PG_STEPS.iter().filter(|(version, _)| *version > found) {
            tx.batch(step)?;
            tx.execute(
                "INSERT INTO schema_version (singleton, version) VALUES (0, ?1)
                 ON CONFLICT (singleton) DO UPDATE SET version = excluded.version",
                store_params![*version],
            )?;
            tracing::info!(version, "inventory schema upgraded");
        }
        Ok(())
    })
}
