//! `edge-agent plan`: asks the endpoint to check a migration plan without moving or
//! staging anything. The endpoint runs the same checks as for a migration (name,
//! capacity on datastore and host, network mapping, role, firewall rules) and answers
//! with what the migration would create, or with every problem at once.

use std::time::{Duration, Instant};

use gateway::plan::{MigrationPlan, MigrationReport};
use gateway::protocol::{SenderConfig, SenderEvent, SenderSession};
use gateway::transport::{ControlReader, ControlWriter, TransportError};
use gateway::wire::{CloudMessage, RefusalCode};
use serde::Serialize;

use crate::migrate::{build_plan, MigrateOptions};
use crate::source::SourceVm;
use crate::target::Target;
use crate::MigrateError;

/// How long the endpoint may take to answer: a check is a few queries.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// The endpoint's verdict on a plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlanCheck {
    pub vm: String,
    /// What a migration would create, if the plan is valid.
    pub valid: Option<MigrationReport>,
    /// Every problem the endpoint found; empty if the plan is valid.
    pub problems: Vec<String>,
}

impl PlanCheck {
    pub fn ok(&self) -> bool {
        self.valid.is_some()
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("plain struct");
        v["ok"] = self.ok().into();
        v
    }

    /// For people: "plan OK" and what would be created, or the problems.
    pub fn to_text(&self) -> String {
        match &self.valid {
            Some(r) => format!(
                "plan OK: {vm} would be created in folder {folder} ({folder_id}) on datastore {ds} ({ds_id}), \
                 host {host} ({host_id}), {cpus} vCPU, {mem} MiB, disks as {format}\n\
                 disks: {disks} ({bytes})\n{rest}",
                vm = r.vm_name,
                folder = r.folder_name,
                folder_id = r.folder_id,
                ds = r.datastore_name,
                ds_id = r.datastore_id,
                host = r.host_name,
                host_id = r.host_id,
                cpus = r.num_cpus,
                mem = r.memory_mib,
                format = r.disk_format,
                disks = r.disks.len(),
                bytes = crate::report::human(r.logical_bytes),
                rest = r.to_text(),
            ),
            None => {
                let mut out = format!(
                    "plan of {} refused by the endpoint: {} problem(s)\n",
                    self.vm,
                    self.problems.len()
                );
                for p in &self.problems {
                    out.push_str(&format!("  - {p}\n"));
                }
                out
            }
        }
    }
}

/// Connects, authenticates and has the endpoint check the plan `migrate` would send
/// with these options. A refused plan (or a role that may not migrate) is a verdict,
/// not an error; errors are what kept the check from happening (no connection, a bad
/// credential, a busy or failing endpoint).
pub async fn check(vm: &SourceVm, target: &Target, opts: &MigrateOptions) -> Result<PlanCheck, MigrateError> {
    let plan = build_plan(vm, opts);
    check_plan(plan, target, opts).await
}

/// [`check`] for a plan built already.
pub async fn check_plan(
    plan: MigrationPlan,
    target: &Target,
    opts: &MigrateOptions,
) -> Result<PlanCheck, MigrateError> {
    let name = plan.vm.name.clone();
    let (endpoint, conn) = target.connect(&opts.tuning).await?;
    let mut s = SenderSession::validating(
        SenderConfig::new(&opts.agent, &target.user, &target.password),
        plan,
        Instant::now(),
    )?;
    let (send, recv) = conn.open_bi().await.map_err(TransportError::from)?;
    let mut writer = ControlWriter::open(send, true).await?;
    let mut reader = ControlReader::open(recv, false).await?;
    let outcome: Result<MigrationReport, MigrateError> = async {
        loop {
            while let Some(msg) = s.poll_transmit(Instant::now()) {
                writer.send(&msg).await?;
            }
            while let Some(event) = s.poll_event() {
                if let SenderEvent::Validated(report) = event {
                    return Ok(*report);
                }
            }
            if let Some(e) = s.error() {
                return Err(MigrateError::from(e.clone()));
            }
            let msg = tokio::time::timeout(ANSWER_TIMEOUT, reader.recv::<CloudMessage>())
                .await
                .map_err(|_| {
                    MigrateError::Target(format!(
                        "the endpoint did not answer within {} s",
                        ANSWER_TIMEOUT.as_secs()
                    ))
                })??
                .ok_or(TransportError::StreamClosed)?;
            // A refusal is kept by the session and returned above.
            let _ = s.handle_control(msg, Instant::now());
        }
    }
    .await;
    writer.finish();
    gateway::transport::close_and_flush(&conn, 0u32.into(), b"plan checked", Duration::from_secs(2)).await;
    drop(endpoint);
    match outcome {
        Ok(report) => Ok(PlanCheck {
            vm: name,
            valid: Some(report),
            problems: Vec::new(),
        }),
        Err(MigrateError::Refused {
            code: RefusalCode::PlanRejected | RefusalCode::NotPermitted,
            problems,
        }) => Ok(PlanCheck {
            vm: name,
            valid: None,
            problems,
        }),
        Err(e) => Err(e),
    }
}
