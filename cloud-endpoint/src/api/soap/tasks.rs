//! vim25 Tasks for the power operations: a `*_Task` call returns a Task at once, the
//! operation runs on, and the task's `info` (state, progress, result, error) is read
//! through the property collector, as pyvmomi's `WaitForTask` does. The table keeps the
//! most recent tasks only (vCenter too forgets old tasks).

use std::collections::VecDeque;
use std::sync::Mutex;

use time::OffsetDateTime;

use super::fault::Fault;
use super::value::{MoRef, Value};
use crate::api::session::rfc3339_millis;

/// How many finished and running tasks are kept.
pub const MAX_TASKS: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Running,
    Success,
    Error,
}

#[derive(Debug, Clone)]
pub struct TaskRecord {
    pub id: String,
    pub description_id: &'static str,
    pub entity: MoRef,
    pub entity_name: String,
    pub state: TaskState,
    pub error: Option<Fault>,
    pub queued: OffsetDateTime,
    pub completed: Option<OffsetDateTime>,
}

impl TaskRecord {
    /// `Task.info`, a TaskInfo. `name` is left unset: pyvmomi's `WaitForTask` reads
    /// `info.name.info` of a running task only when a name is set.
    pub fn info(&self) -> Value {
        let state = match self.state {
            TaskState::Running => "running",
            TaskState::Success => "success",
            TaskState::Error => "error",
        };
        let mut fields = vec![
            ("key", Value::str(&self.id)),
            ("task", Value::Ref(MoRef::new("Task", &self.id))),
            ("descriptionId", Value::str(self.description_id)),
            ("entity", Value::Ref(self.entity.clone())),
            ("entityName", Value::str(&self.entity_name)),
            ("state", Value::Enum("TaskInfoState", state.into())),
            ("cancelled", Value::Bool(false)),
            ("cancelable", Value::Bool(false)),
        ];
        if let Some(error) = &self.error {
            fields.push(("error", error.localized()));
        }
        if self.state == TaskState::Running {
            fields.push(("progress", Value::Int(50)));
        }
        fields.push(("queueTime", Value::Time(rfc3339_millis(self.queued))));
        fields.push(("startTime", Value::Time(rfc3339_millis(self.queued))));
        if let Some(done) = self.completed {
            fields.push(("completeTime", Value::Time(rfc3339_millis(done))));
        }
        fields.push(("eventChainId", Value::Int(0)));
        Value::Data("TaskInfo", fields)
    }
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

    /// Starts a running task on `entity`; returns its id.
    pub fn start(&self, description_id: &'static str, entity: MoRef, entity_name: String) -> String {
        let mut table = self.lock();
        table.0 += 1;
        let id = format!("task-{}", table.0);
        table.1.push_back(TaskRecord {
            id: id.clone(),
            description_id,
            entity,
            entity_name,
            state: TaskState::Running,
            error: None,
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
