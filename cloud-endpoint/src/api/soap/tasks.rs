//! vim25 Tasks: the power operations' and the migrations'.
//!
//! A `*_Task` call returns a Task at once, the operation runs on, and the task's `info`
//! (state, progress, result, error) is read through the property collector, as pyvmomi's
//! `WaitForTask` does. The power tasks live in a table in memory that keeps the most
//! recent ones only (vCenter too forgets old tasks).
//!
//! A migration into the cloud domain is a Task too, read from its migration record at
//! each call: its moref is the migration id (`Task:migration-3`), the id REST's
//! `/api/cis/tasks/migration-3` answers and the edge agent prints, so one id names it in
//! every API and nothing has to be kept in step.

use std::collections::VecDeque;
use std::sync::Mutex;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::fault::Fault;
use super::value::{MoRef, Value};
use crate::api::session::rfc3339_millis;
use crate::inventory::MigrationRecord;

/// How many power tasks the table keeps, finished and running.
pub const MAX_TASKS: usize = 1000;
/// How many tasks `TaskManager.recentTask` lists, newest last: vCenter's limit, which
/// govmomi's simulator keeps too.
pub const RECENT_TASKS: usize = 200;

/// What a migration's task is known by in `TaskManager.description` and `info.descriptionId`:
/// the relocation of a VM, as REST's `/api/cis/tasks` calls it (`com.vmware.vcenter.VM`
/// `relocate`).
pub const MIGRATION_DESCRIPTION_ID: &str = "VirtualMachine.relocate";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Running,
    Success,
    Error,
}

impl TaskState {
    /// The `TaskInfoState` value.
    pub fn vim_name(self) -> &'static str {
        match self {
            TaskState::Running => "running",
            TaskState::Success => "success",
            TaskState::Error => "error",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TaskRecord {
    /// The Task's moref value and `info.key`: `task-N` for a power task, the migration id
    /// for a migration.
    pub id: String,
    pub description_id: &'static str,
    /// `info.description`: a message key and its text, where the task has one to tell.
    pub description: Option<(&'static str, String)>,
    pub entity: Option<MoRef>,
    pub entity_name: Option<String>,
    pub state: TaskState,
    /// Percent done while running, where the operation can tell it.
    pub progress: Option<i64>,
    pub result: Option<Value>,
    pub error: Option<Fault>,
    /// Who started it (`info.reason`, a TaskReasonUser).
    pub user: String,
    pub queued: OffsetDateTime,
    pub completed: Option<OffsetDateTime>,
}

impl TaskRecord {
    /// `Task.info`, a TaskInfo, its fields in the WSDL's order. `name` is left unset:
    /// pyvmomi reads `info.name.info` (a method's description) when a name is set, and
    /// neither a power task nor a migration has one method to name there.
    pub fn info(&self) -> Value {
        let mut fields = vec![
            ("key", Value::str(&self.id)),
            ("task", Value::Ref(MoRef::new("Task", &self.id))),
        ];
        if let Some((key, message)) = &self.description {
            fields.push((
                "description",
                Value::Data(
                    "LocalizableMessage",
                    vec![("key", Value::str(key)), ("message", Value::str(message))],
                ),
            ));
        }
        fields.push(("descriptionId", Value::str(self.description_id)));
        if let Some(entity) = &self.entity {
            fields.push(("entity", Value::Ref(entity.clone())));
        }
        if let Some(name) = &self.entity_name {
            fields.push(("entityName", Value::str(name)));
        }
        fields.extend([
            ("state", Value::Enum("TaskInfoState", self.state.vim_name().into())),
            ("cancelled", Value::Bool(false)),
            ("cancelable", Value::Bool(false)),
        ]);
        if let Some(error) = &self.error {
            fields.push(("error", error.localized()));
        }
        if let Some(result) = &self.result {
            fields.push(("result", Value::Any(Box::new(result.clone()))));
        }
        if let (Some(progress), TaskState::Running) = (self.progress, self.state) {
            fields.push(("progress", Value::Int(progress)));
        }
        fields.push((
            "reason",
            Value::Data("TaskReasonUser", vec![("userName", Value::str(&self.user))]),
        ));
        fields.push(("queueTime", Value::Time(rfc3339_millis(self.queued))));
        // Neither kind waits in a queue: each starts when it is asked for.
        fields.push(("startTime", Value::Time(rfc3339_millis(self.queued))));
        if let Some(done) = self.completed {
            fields.push(("completeTime", Value::Time(rfc3339_millis(done))));
        }
        fields.push(("eventChainId", Value::Int(0)));
        Value::Data("TaskInfo", fields)
    }

    /// A migration as the task vCenter would show for a VM relocated into it. `moved` is
    /// the bytes held durably so far, for a running migration whose connection knows it;
    /// `datacenter` is the entity of a migration that registered no VM (yet): the domain
    /// it moves into, as a VM that does not exist cannot be one.
    pub fn from_migration(m: &MigrationRecord, moved: Option<u64>, datacenter: (&MoRef, &str)) -> TaskRecord {
        let state = match m.state.as_str() {
            "SUCCEEDED" => TaskState::Success,
            "FAILED" => TaskState::Error,
            _ => TaskState::Running,
        };
        let vm = m.vm.as_ref().filter(|_| state == TaskState::Success);
        let (entity, entity_name) = match vm {
            Some(vm) => (MoRef::new("VirtualMachine", vm), m.vm_name.clone()),
            None => (datacenter.0.clone(), datacenter.1.to_owned()),
        };
        let error = (state == TaskState::Error).then(|| {
            let reason = m.error.clone().unwrap_or_else(|| "the migration failed".to_owned());
            Fault::new(
                "SystemError",
                format!("{} was not moved into the cloud domain: {reason}", m.vm_name),
            )
            .with("reason", Value::Str(reason))
        });
        let progress = moved.map(|bytes| (bytes.min(m.logical_bytes) * 100 / m.logical_bytes.max(1)) as i64);
        TaskRecord {
            id: m.id.clone(),
            description_id: MIGRATION_DESCRIPTION_ID,
            description: Some((
                "com.vmware.gateway.migration",
                format!("Migrate VM {} into the cloud domain (from edge {})", m.vm_name, m.edge),
            )),
            entity: Some(entity),
            entity_name: Some(entity_name),
            state,
            progress: Some(progress.unwrap_or(0)),
            result: vm.map(|vm| Value::Ref(MoRef::new("VirtualMachine", vm))),
            error,
            user: m.user.clone(),
            queued: stored_time(&m.started).unwrap_or(OffsetDateTime::UNIX_EPOCH),
            completed: m.finished.as_deref().and_then(stored_time),
        }
    }
}

/// An inventory time (RFC 3339, UTC); `None` if it does not parse, which a record written
/// by this endpoint never is.
fn stored_time(t: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(t, &Rfc3339).ok()
}

/// `TaskManager.recentTask`: the newest [`RECENT_TASKS`] of `tasks`, oldest first.
pub fn recent(tasks: &[TaskRecord]) -> Vec<MoRef> {
    let mut order: Vec<&TaskRecord> = tasks.iter().collect();
    order.sort_by_key(|t| t.queued);
    let skip = order.len().saturating_sub(RECENT_TASKS);
    order
        .into_iter()
        .skip(skip)
        .map(|t| MoRef::new("Task", &t.id))
        .collect()
}

/// `TaskManager.description`: the labels of the task kinds, states and reasons this
/// endpoint's tasks have, for clients that show a task by its `descriptionId`.
pub fn description() -> Value {
    let element = |key: &str, label: &str, summary: &str| {
        Value::Data(
            "ElementDescription",
            vec![
                ("label", Value::str(label)),
                ("summary", Value::str(summary)),
                ("key", Value::str(key)),
            ],
        )
    };
    Value::Data(
        "TaskDescription",
        vec![
            (
                "methodInfo",
                Value::Array(
                    "ElementDescription",
                    vec![
                        element(
                            "VirtualMachine.powerOn",
                            "Power On virtual machine",
                            "Power On virtual machine",
                        ),
                        element(
                            "VirtualMachine.powerOff",
                            "Power Off virtual machine",
                            "Power Off virtual machine",
                        ),
                        element("VirtualMachine.reset", "Reset virtual machine", "Reset virtual machine"),
                        element(
                            MIGRATION_DESCRIPTION_ID,
                            "Relocate virtual machine",
                            "Migrate a VM into the cloud domain through the gateway",
                        ),
                    ],
                ),
            ),
            (
                "state",
                Value::Array(
                    "ElementDescription",
                    vec![
                        element("queued", "Queued", "Task is queued"),
                        element("running", "Running", "Task is in progress"),
                        element("success", "Completed", "Task completed successfully"),
                        element("error", "Failed", "Task completed with a failure"),
                    ],
                ),
            ),
            (
                "reason",
                Value::Array(
                    "TypeDescription",
                    vec![Value::Data(
                        "TypeDescription",
                        vec![
                            ("label", Value::str("User task")),
                            ("summary", Value::str("Task started by a user")),
                            ("key", Value::str("TaskReasonUser")),
                        ],
                    )],
                ),
            ),
        ],
    )
}

#[derive(Debug, Default)]
pub struct TaskTable {
    inner: Mutex<(u64, VecDeque<TaskRecord>)>,
}

impl TaskTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, VecDeque<TaskRecord>)> {
        // Every statement leaves the table whole: a panic elsewhere cannot tear it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a running task on `entity` for `user`; returns its id.
    pub fn start(&self, description_id: &'static str, entity: MoRef, entity_name: String, user: &str) -> String {
        let mut table = self.lock();
        table.0 += 1;
        let id = format!("task-{}", table.0);
        table.1.push_back(TaskRecord {
            id: id.clone(),
            description_id,
            description: None,
            entity: Some(entity),
            entity_name: Some(entity_name),
            state: TaskState::Running,
            // A power operation cannot tell how far it is: no progress rather than a guess.
            progress: None,
            result: None,
            error: None,
            user: user.to_owned(),
            queued: OffsetDateTime::now_utc(),
            completed: None,
        });
        while table.1.len() > MAX_TASKS {
            table.1.pop_front();
        }
        id
    }

    pub fn finish(&self, id: &str, result: Result<(), Fault>) {
        let mut table = self.lock();
        if let Some(task) = table.1.iter_mut().find(|t| t.id == id) {
            task.completed = Some(OffsetDateTime::now_utc());
            match result {
                Ok(()) => task.state = TaskState::Success,
                Err(fault) => {
                    task.state = TaskState::Error;
                    task.error = Some(fault);
                }
            }
        }
    }

    pub fn all(&self) -> Vec<TaskRecord> {
        self.lock().1.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(state: &str) -> MigrationRecord {
        MigrationRecord::sample(state)
    }

    fn xml(v: &Value) -> String {
        let mut out = String::new();
        v.write(&mut out, "val");
        out
    }

    fn dc() -> (MoRef, &'static str) {
        (MoRef::new("Datacenter", "datacenter-3"), "Cloud-DC")
    }

    #[test]
    fn a_succeeded_migration_is_a_successful_task_on_its_vm() {
        let mut m = migration("SUCCEEDED");
        m.vm = Some("vm-14".into());
        m.finished = Some("2024-05-01T10:01:02Z".into());
        let (dc, name) = dc();
        let task = TaskRecord::from_migration(&m, None, (&dc, name));
        assert_eq!(task.id, "migration-3");
        let info = task.info();
        assert_eq!(info.field("key"), Some(&Value::str("migration-3")));
        assert_eq!(info.field("task"), Some(&Value::Ref(MoRef::new("Task", "migration-3"))));
        assert_eq!(
            info.field("state"),
            Some(&Value::Enum("TaskInfoState", "success".into()))
        );
        assert_eq!(
            info.field("entity"),
            Some(&Value::Ref(MoRef::new("VirtualMachine", "vm-14")))
        );
        assert_eq!(info.field("entityName"), Some(&Value::str("web01")));
        assert_eq!(
            info.field("result"),
            Some(&Value::Any(Box::new(Value::Ref(MoRef::new("VirtualMachine", "vm-14")))))
        );
        assert_eq!(
            info.field("descriptionId"),
            Some(&Value::str("VirtualMachine.relocate"))
        );
        assert!(info.field("progress").is_none() && info.field("error").is_none());
        let text = xml(&info);
        assert!(
            text.contains("<queueTime>2024-05-01T10:00:00.060Z</queueTime>"),
            "{text}"
        );
        assert!(
            text.contains("<completeTime>2024-05-01T10:01:02.000Z</completeTime>"),
            "{text}"
        );
        assert!(
            text.contains(r#"<reason xsi:type="TaskReasonUser"><userName>migrator@cloud.local</userName></reason>"#),
            "{text}"
        );
        assert!(
            text.contains(r#"<description xsi:type="LocalizableMessage">"#),
            "{text}"
        );
        assert!(
            text.contains(r#"<result type="VirtualMachine" xsi:type="ManagedObjectReference">vm-14</result>"#),
            "{text}"
        );
    }

    #[test]
    fn running_and_failed_migrations() {
        let (dc, name) = dc();
        let running = TaskRecord::from_migration(&migration("RUNNING"), Some(3 << 28), (&dc, name)).info();
        assert_eq!(
            running.field("state"),
            Some(&Value::Enum("TaskInfoState", "running".into()))
        );
        assert_eq!(running.field("progress"), Some(&Value::Int(75)));
        // No VM yet: the task is on the datacenter it moves into.
        assert_eq!(running.field("entity"), Some(&Value::Ref(dc.clone())));
        assert_eq!(running.field("entityName"), Some(&Value::str("Cloud-DC")));
        assert!(running.field("completeTime").is_none() && running.field("result").is_none());
        let unknown = TaskRecord::from_migration(&migration("RUNNING"), None, (&dc, name)).info();
        assert_eq!(unknown.field("progress"), Some(&Value::Int(0)));

        let mut m = migration("FAILED");
        m.error = Some("the edge went away".into());
        m.finished = Some("2024-05-01T10:01:02Z".into());
        let failed = TaskRecord::from_migration(&m, None, (&dc, name)).info();
        assert_eq!(
            failed.field("state"),
            Some(&Value::Enum("TaskInfoState", "error".into()))
        );
        let error = failed.field("error").expect("a failed task has info.error");
        let text = xml(error);
        assert!(
            text.starts_with(r#"<val xsi:type="LocalizedMethodFault"><fault xsi:type="SystemError">"#),
            "{text}"
        );
        assert!(text.contains("the edge went away"), "{text}");
        assert!(failed.field("progress").is_none());
    }

    #[test]
    fn recent_tasks_are_the_newest_oldest_first() {
        let table = TaskTable::default();
        let vm = MoRef::new("VirtualMachine", "vm-1");
        for _ in 0..RECENT_TASKS + 5 {
            table.start("VirtualMachine.powerOn", vm.clone(), "web01".into(), "a@cloud.local");
        }
        let mut all = table.all();
        let (dc, name) = dc();
        // A migration older than every power task falls out; a newer one is last.
        let mut old = migration("SUCCEEDED");
        old.id = "migration-1".into();
        all.push(TaskRecord::from_migration(&old, None, (&dc, name)));
        let mut new = migration("RUNNING");
        new.started = "2999-01-01T00:00:00Z".into();
        all.push(TaskRecord::from_migration(&new, None, (&dc, name)));
        let recent = recent(&all);
        assert_eq!(recent.len(), RECENT_TASKS);
        assert_eq!(recent.last(), Some(&MoRef::new("Task", "migration-3")));
        assert!(!recent.contains(&MoRef::new("Task", "migration-1")));
        assert!(!recent.contains(&MoRef::new("Task", "task-1")));
        assert_eq!(recent[0], MoRef::new("Task", &format!("task-{}", 7)));
    }
}
