//! `com.vmware.cis.tasks` over the migration records: a migration into the cloud domain is
//! the relocation task vSphere would show for it, so clients that follow tasks (PowerCLI's
//! `Get-Task`, the SDK's `Tasks.get`) can follow migrations too.
//!
//! The task id is the migration id (`migration-N`): the id the edge agent prints is the id
//! to ask for, and no second numbering has to be kept in step with the first.

use serde::Serialize;

use super::error::{ApiError, ErrorBody};
use crate::inventory::MigrationRecord;
use crate::Domain;

/// The service and operation a migration stands for: a relocation of a VM into this
/// domain, as `POST /api/vcenter/vm/{vm}?action=relocate&vmw-task=true` would start it.
pub const SERVICE: &str = "com.vmware.vcenter.VM";
pub const OPERATION: &str = "relocate";

/// `GET /api/cis/tasks/{task}` (vSphere's `com.vmware.cis.task.info`).
#[derive(Debug, Clone, Serialize)]
pub struct TaskInfo {
    pub description: Message,
    pub service: &'static str,
    pub operation: &'static str,
    /// PENDING, RUNNING, BLOCKED, SUCCEEDED or FAILED; a migration is never PENDING or
    /// BLOCKED: its record is written when its first byte is about to move.
    pub status: String,
    pub cancelable: bool,
    pub start_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    pub user: String,
    /// The VM, once registered (SUCCEEDED); before that it has no id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    pub progress: Progress,
    /// What went wrong, in the API's error shape, when FAILED.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    /// A replication: its state (syncing, in sync, switching over, switched over
    /// (awaiting confirm), done, rolled back), last sync, lag, last delta, scheduled and
    /// forecast switchover, as `GET /api/gateway/migrations/{id}` shows it (vSphere's task
    /// has no such field; clients that do not know it ignore it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication: Option<crate::inventory::ReplicaRecord>,
}

/// vAPI's `localizable_message`.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub id: &'static str,
    pub default_message: String,
    pub args: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: String,
}

/// In bytes of the VM's disks (logical, holes included).
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub total: u64,
    pub completed: u64,
    pub message: Message,
}

/// A failed task's error: the REST error body (`{"error_type":"ERROR","messages":[...]}`).
#[derive(Debug, Clone, Serialize)]
pub struct TaskError {
    pub error_type: &'static str,
    pub messages: Vec<ErrorMessage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorMessage {
    pub id: &'static str,
    pub default_message: String,
    pub args: Vec<String>,
}

impl From<ErrorBody<'_>> for TaskError {
    fn from(body: ErrorBody<'_>) -> TaskError {
        TaskError {
            error_type: body.error_type,
            messages: body
                .messages
                .iter()
                .map(|m| ErrorMessage {
                    id: m.id,
                    default_message: m.default_message.to_owned(),
                    args: Vec::new(),
                })
                .collect(),
        }
    }
}

/// The task of migration `id`; NOT_FOUND if there is none.
pub fn get(domain: &Domain, id: &str) -> Result<TaskInfo, ApiError> {
    let mut record = domain.inventory.migration(id)?.ok_or_else(|| {
        ApiError::not_found(format!(
            "task {id} is not in the inventory; tasks are migrations, named by their migration id (migration-N)"
        ))
    })?;
    super::gateway::replica_state(domain, &mut record);
    let mut task = TaskInfo::from_record(&record);
    if let (Some(r), "RUNNING") = (&record.replica, record.state.as_str()) {
        task.progress.message.default_message = replication_message(&record.vm_name, r);
    } else if record.state == "RUNNING" {
        if let Some(bytes) = domain.live.progress(id) {
            task.progress.completed = bytes.min(task.progress.total);
            let waiting = if domain.live.is_live(id) {
                ""
            } else {
                "; waiting for its edge to resume it"
            };
            task.progress.message.default_message = format!(
                "moving {} into the cloud domain: {} of {} bytes held durably ({}%){waiting}",
                record.vm_name,
                task.progress.completed,
                task.progress.total,
                task.progress.completed * 100 / task.progress.total.max(1)
            );
        }
    }
    Ok(task)
}

impl TaskInfo {
    /// The task as its record tells it. A RUNNING record shows 0 bytes completed: the
    /// bytes moved so far are only known to the connection serving it (see [`get`]).
    pub fn from_record(m: &MigrationRecord) -> TaskInfo {
        let total = m.logical_bytes;
        let (completed, progress) = match m.state.as_str() {
            "SUCCEEDED" => (
                total,
                match &m.vm {
                    Some(vm) => format!("{} moved and registered as {vm}", m.vm_name),
                    None => format!("{} moved and registered", m.vm_name),
                },
            ),
            "FAILED" => (0, format!("{} was not moved; nothing was registered", m.vm_name)),
            _ => (0, format!("moving {} into the cloud domain", m.vm_name)),
        };
        let error = (m.state == "FAILED").then(|| {
            let message = m.error.clone().unwrap_or_else(|| "the migration failed".to_owned());
            TaskError::from(ApiError::new(super::error::ErrorKind::Error, message).body())
        });
        TaskInfo {
            description: Message {
                id: "com.vmware.gateway.migration",
                default_message: format!("Migrate VM {} into the cloud domain (from edge {})", m.vm_name, m.edge),
                args: Vec::new(),
            },
            service: SERVICE,
            operation: OPERATION,
            status: m.state.clone(),
            cancelable: false,
            start_time: millis(&m.started),
            end_time: m.finished.as_deref().map(millis),
            user: m.user.clone(),
            target: m.vm.clone().map(|id| Target {
                kind: "VirtualMachine",
                id,
            }),
            progress: Progress {
                total,
                completed,
                message: Message {
                    id: "com.vmware.gateway.migration.progress",
                    default_message: progress,
                    args: Vec::new(),
                },
            },
            error,
            replication: m.replica.clone(),
        }
    }
}

/// A RUNNING replication's progress as one line: its state, how old the replica is, and
/// its switchover.
fn replication_message(vm: &str, r: &crate::inventory::ReplicaRecord) -> String {
    let mut line = format!(
        "replicating {vm} into the cloud domain: {}; last sync {} ({} s ago, {} bytes changed)",
        r.state.unwrap_or("in sync"),
        r.last_sync,
        r.lag_seconds.unwrap_or(0),
        r.last_delta_bytes
    );
    match (&r.switchover_at, r.forecast_switchover_seconds) {
        (Some(at), Some(s)) => line += &format!("; switchover scheduled at {at}, forecast to take {s} s"),
        (Some(at), None) => line += &format!("; switchover scheduled at {at}"),
        (None, Some(s)) => line += &format!("; a switchover now is forecast to take {s} s"),
        (None, None) => {}
    }
    line
}

/// An inventory time (RFC 3339 in UTC, 0 to 9 fraction digits) with exactly three
/// fraction digits, as the API writes every time (`2024-05-01T10:00:00.060Z`). Anything
/// else is passed on as stored.
pub fn millis(stored: &str) -> String {
    let Some(body) = stored.strip_suffix('Z') else {
        return stored.to_owned();
    };
    let (seconds, fraction) = body.split_once('.').unwrap_or((body, ""));
    let well_formed = seconds.len() == "2024-05-01T10:00:00".len()
        && seconds.is_ascii()
        && fraction.bytes().all(|b| b.is_ascii_digit());
    if !well_formed {
        return stored.to_owned();
    }
    let digits: String = fraction.chars().chain("000".chars()).take(3).collect();
    format!("{seconds}.{digits}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(state: &str) -> MigrationRecord {
        MigrationRecord::sample(state)
    }

    #[test]
    fn a_running_migration_is_a_running_task_without_target() {
        let json = serde_json::to_value(TaskInfo::from_record(&record("RUNNING"))).unwrap();
        assert_eq!(json["status"], "RUNNING");
        assert_eq!(json["service"], "com.vmware.vcenter.VM");
        assert_eq!(json["operation"], "relocate");
        assert_eq!(json["start_time"], "2024-05-01T10:00:00.060Z");
        assert_eq!(json["progress"]["total"], 1u64 << 30);
        assert_eq!(json["progress"]["completed"], 0);
        assert!(json.get("target").is_none() && json.get("end_time").is_none());
        assert!(json.get("error").is_none());
    }

    #[test]
    fn succeeded_and_failed_migrations() {
        let mut m = record("SUCCEEDED");
        m.vm = Some("vm-14".into());
        m.finished = Some("2024-05-01T10:01:02Z".into());
        let json = serde_json::to_value(TaskInfo::from_record(&m)).unwrap();
        assert_eq!(
            json["target"],
            serde_json::json!({"type": "VirtualMachine", "id": "vm-14"})
        );
        assert_eq!(json["progress"]["completed"], 1u64 << 30);
        assert_eq!(json["end_time"], "2024-05-01T10:01:02.000Z");

        let mut m = record("FAILED");
        m.error = Some("the edge went away".into());
        let json = serde_json::to_value(TaskInfo::from_record(&m)).unwrap();
        assert_eq!(json["error"]["error_type"], "ERROR");
        assert_eq!(json["error"]["messages"][0]["id"], "com.vmware.vapi.std.errors.error");
        assert_eq!(json["error"]["messages"][0]["default_message"], "the edge went away");
        assert_eq!(json["progress"]["completed"], 0);
    }

    #[test]
    fn times_get_three_fraction_digits() {
        assert_eq!(millis("2024-05-01T10:00:00Z"), "2024-05-01T10:00:00.000Z");
        assert_eq!(millis("2024-05-01T10:00:00.123456789Z"), "2024-05-01T10:00:00.123Z");
        assert_eq!(millis("2024-05-01T10:00:00.5Z"), "2024-05-01T10:00:00.500Z");
        assert_eq!(millis("yesterday"), "yesterday");
    }
}
