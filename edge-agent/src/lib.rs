//! The on-prem edge agent: reads a VM from its files and streams it to a cloud
//! endpoint over QUIC. The binary is a thin shell over [`migrate::run`].
//!
//! ```text
//! source    the VM on disk: .vmx, raw and flat VMDK disks (read-only)
//! target    the cloud endpoint(s): URLs, credential, trust (CA or thumbprint)
//! failover  which endpoint of several a migration resumes on, and how long it waits
//! migrate   the driver: SenderSession + QUIC streams + reader/sealer workers
//! prehash   a delta pass hashes the source while the connection is set up
//! plan      `edge-agent plan`: the endpoint checks a plan, nothing is staged
//! report    progress and the final summary (human or JSON)
//! receipt   keeping the cloud's signed receipt; verifying one against the source
//! ```
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod compression;
pub mod failover;
pub mod holes;
pub mod linktest;
pub mod live;
pub mod metrics;
pub mod migrate;
pub mod plan;
pub mod prehash;
pub mod receipt;
pub mod report;
pub mod source;
pub mod target;
pub mod tracking;

use gateway::protocol::ProtocolError;
use gateway::transport::TransportError;
use gateway::wire::RefusalCode;

/// Why a migration did not complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error("{0}")]
    Target(String),
    #[error(transparent)]
    Certificate(#[from] certs::Error),
    #[error("{}", describe_refusal(*code, problems))]
    Refused { code: RefusalCode, problems: Vec<String> },
    /// The endpoint refused the login because too many logins wait for a password
    /// check (a flood, or many agents starting at once behind one address): nothing was
    /// staged, and `migrate` tries again for `--retry-for` before it gives up.
    #[error("the cloud endpoint has too many logins waiting ({}); nothing was staged; run the migration again in a few seconds", problems.join("; "))]
    LoginsBusy { problems: Vec<String> },
    #[error("migration failed: {0}")]
    Protocol(ProtocolError),
    #[error("{0}")]
    Transport(#[from] TransportError),
    #[error("reading {what} failed: {source}; the source was not modified")]
    Read { what: String, source: std::io::Error },
    /// The source turned out damaged while it was read (content its format cannot hold, a
    /// file shorter than its own tables or than when it was opened): a resume would read the
    /// same damage, so the migration was aborted on both sides.
    #[error("{what} is damaged: {source}. {}", damaged_outcome(migration_id, vm_name, *discarded))]
    SourceDamaged {
        /// The disk and offset, e.g. "disk scsi0:0 at offset 4194304".
        what: String,
        source: std::io::Error,
        migration_id: String,
        /// The VM's name in the cloud.
        vm_name: String,
        /// Whether the cloud confirmed it discarded the migration.
        discarded: bool,
    },
    /// A source read failed for a reason that may pass (EIO from a flaky mount, a
    /// permission): the migration is paused and kept on both sides.
    #[error(
        "reading {what} failed: {source}; the source was not modified. Migration {migration_id} is paused and \
         kept on both sides: its partial copy stays staged in the cloud and the name \"{vm_name}\" stays \
         reserved. Fix the read error and run the same command again to resume, or run `edge-agent abort` \
         with the same arguments to discard it"
    )]
    SourceReadPaused {
        what: String,
        source: std::io::Error,
        migration_id: String,
        vm_name: String,
    },
    /// The VM was registered, but its receipt is missing, wrong or not kept.
    #[error("{0}")]
    Receipt(String),
    /// The link stayed down longer than the agent keeps retrying.
    #[error(
        "the cloud endpoint has been unreachable for {secs} s (last error: {last}); migration {migration_id} is kept \
         on both sides: run the same command again to resume it"
    )]
    LinkDown {
        migration_id: String,
        secs: u64,
        last: String,
    },
    /// The source changed since the migration started: resuming would mix old and new data.
    #[error(
        "the source changed since migration {migration_id} started: {what}; resuming would mix old and new \
         blocks. Run `edge-agent abort` with the same arguments to discard it (checkpoint {}), then migrate again",
        checkpoint.display()
    )]
    SourceChanged {
        migration_id: String,
        what: String,
        checkpoint: std::path::PathBuf,
    },
}

impl From<ProtocolError> for MigrateError {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Refused { code, problems } => MigrateError::Refused { code, problems },
            other => MigrateError::Protocol(other),
        }
    }
}

fn damaged_outcome(migration_id: &str, vm_name: &str, discarded: bool) -> String {
    if discarded {
        format!(
            "Migration {migration_id} was aborted: the cloud discarded its partial copy (nothing was registered, \
             its staging is removed) and the name \"{vm_name}\" is free again. A resume would read the same \
             damage: restore or repair the source (`qemu-img check` shows what is wrong), then migrate again"
        )
    } else {
        format!(
            "The cloud was told to abort migration {migration_id} but did not confirm: run `edge-agent abort` \
             with the same arguments to make sure its partial copy is discarded and the name \"{vm_name}\" is \
             freed; then restore or repair the source (`qemu-img check` shows what is wrong) and migrate again"
        )
    }
}

fn describe_refusal(code: RefusalCode, problems: &[String]) -> String {
    let mut out = format!("{}; nothing was registered in the cloud", refusal_head(code));
    for p in problems {
        out.push_str("\n  - ");
        out.push_str(p);
    }
    out
}

/// What a refusal code means, for people.
pub(crate) fn refusal_head(code: RefusalCode) -> &'static str {
    match code {
        RefusalCode::BadCredentials => "the cloud endpoint did not accept the credential (--user/--password)",
        RefusalCode::NotPermitted => {
            "the cloud endpoint does not permit this (the user's role, or this edge's certificate)"
        }
        RefusalCode::PlanRejected => "the cloud endpoint refused the migration plan",
        RefusalCode::ProtocolViolation => "the cloud endpoint reported a protocol violation",
        RefusalCode::IntegrityFailure => "the cloud endpoint could not verify the data",
        RefusalCode::EndpointFailure => "the cloud endpoint failed while writing the VM",
        RefusalCode::Busy => "the cloud endpoint is at its limit of concurrent migrations; retry later",
        RefusalCode::Aborted => "the migration was aborted",
        RefusalCode::Paused => "the cloud endpoint paused the migration and kept what arrived",
        RefusalCode::UnknownMigration => "the cloud endpoint cannot resume this migration",
    }
}
