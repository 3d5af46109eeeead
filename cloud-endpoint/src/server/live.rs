//! Which migrations a connection serves right now. A resumed migration may arrive on a
//! new connection while the old one still looks alive here (the edge's link dropped, and
//! the old connection waits for its idle timeout): the new one takes over, closing the
//! old one and waiting until its cleanup has kept the files for the resume. An abort
//! (through the API, or `edge-agent abort`) reaches the connection that serves the
//! migration the same way. Both come only after the asker's right to act on the
//! migration was checked (placement::authorize).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway::wire::RefusalCode;
use tokio::sync::Notify;

#[derive(Debug)]
struct Entry {
    conn: quinn::Connection,
    aborted: Arc<AtomicBool>,
}

/// The registry, one per endpoint.
#[derive(Debug, Default)]
pub struct LiveMigrations {
    entries: Mutex<HashMap<String, Entry>>,
    detached: Notify,
    /// The receive window all migrations share (bytes; 0 = leave quinn's per-connection
    /// window alone). See [`LiveMigrations::share_window`].
    window_budget: std::sync::atomic::AtomicU64,
    /// The bandwidth cap each migration is held to, if any: its window is what the edge
    /// may send beyond the cap (see [`gateway::transport::Rate::burst_window`]).
    window_cap: Mutex<Option<gateway::transport::Rate>>,
    /// Logical bytes each RUNNING migration holds durably, as its connection last saw
    /// them: a task's progress. Kept while the migration waits for a resume (the figure
    /// is still true: the journal holds those chunks) and dropped when it ends.
    progress: Mutex<HashMap<String, u64>>,
    /// Migrations whose connection runs a switchover (read-back, registration, power-on).
    switching: Mutex<std::collections::HashSet<String>>,
    /// Replicas being copied for a test boot: no pass may write them meanwhile. Changed
    /// only with `entries` locked, so that a copy and a connection never both begin.
    copying: Mutex<std::collections::HashSet<String>>,
}

/// A replica held for copying ([`LiveMigrations::begin_copy`]); released when dropped.
#[derive(Debug)]
pub struct CopyHold<'a> {
    live: &'a LiveMigrations,
    id: String,
}

impl Drop for CopyHold<'_> {
    fn drop(&mut self) {
        let _entries = self.live.lock();
        self.live.copying().remove(&self.id);
    }
}

/// The smallest receive window a migration gets however many run: a few chunks per
/// stream keep a loopback or LAN link busy.
const MIN_SHARED_WINDOW: u64 = 4 << 20;

/// How long a take-over waits for the old connection's cleanup.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(10);

impl LiveMigrations {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Shares `bytes` of receive window among the live migrations. Each connection is
    /// configured with the window one migration needs to fill the link (bandwidth x RTT);
    /// 32 of them at once could make the endpoint buffer 32 times that while its disks
    /// are slower than the link (an fsync, a busy datastore). Splitting the budget keeps
    /// the endpoint's memory at about one link's worth, and the edges wait instead.
    ///
    /// Under a bandwidth cap (`cap`) each migration's share is at most the cap's burst
    /// window on its connection's path, however large the budget: the window is what the
    /// edge may send beyond the cap, so a migration alone does not get the whole budget.
    pub fn share_window(&self, bytes: u64, cap: Option<gateway::transport::Rate>) {
        self.window_budget.store(bytes, Ordering::Relaxed);
        *self.window_cap.lock().unwrap_or_else(|p| p.into_inner()) = cap;
    }

    fn rebalance(&self, entries: &HashMap<String, Entry>) {
        let budget = self.window_budget.load(Ordering::Relaxed);
        if budget == 0 || entries.is_empty() {
            return;
        }
        let each = (budget / entries.len() as u64).clamp(MIN_SHARED_WINDOW.min(budget), budget);
        let cap = *self.window_cap.lock().unwrap_or_else(|p| p.into_inner());
        for e in entries.values() {
            let window = cap.map_or(each, |cap| each.min(cap.burst_window(e.conn.rtt())));
            e.conn
                .set_receive_window(quinn::VarInt::from_u64(window).unwrap_or(quinn::VarInt::MAX));
        }
    }

    fn copying(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.copying.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `id`'s replica still while it is copied: refused (with what to do) while a
    /// connection serves `id`, and until the hold is dropped a resume is refused with
    /// [`LiveMigrations::claim`].
    pub fn begin_copy(&self, id: &str) -> Result<CopyHold<'_>, String> {
        let entries = self.lock();
        if entries.contains_key(id) {
            return Err(format!(
                "a pass of migration {id} runs now and writes its replica; try again once it has ended \
                 (GET /api/cis/tasks/{id} shows the replication in sync)"
            ));
        }
        if !self.copying().insert(id.to_owned()) {
            return Err(format!("the replica of migration {id} is being copied already"));
        }
        Ok(CopyHold {
            live: self,
            id: id.to_owned(),
        })
    }

    /// Marks `conn` as serving `id` before its staged files are reopened (as
    /// [`LiveMigrations::attach`] does after), unless its replica is being copied (false:
    /// the edge should retry in a few seconds).
    pub fn claim(&self, id: &str, conn: &quinn::Connection, aborted: Arc<AtomicBool>) -> bool {
        let mut entries = self.lock();
        if self.copying().contains(id) {
            return false;
        }
        entries.insert(
            id.to_owned(),
            Entry {
                conn: conn.clone(),
                aborted,
            },
        );
        true
    }

    /// `conn` now serves `id`; `aborted` is set if the migration is aborted through the API.
    pub fn attach(&self, id: &str, conn: &quinn::Connection, aborted: Arc<AtomicBool>) {
        let mut entries = self.lock();
        entries.insert(
            id.to_owned(),
            Entry {
                conn: conn.clone(),
                aborted,
            },
        );
        self.rebalance(&entries);
    }

    /// `conn`'s cleanup for `id` is done (a newer connection's entry stays).
    pub fn detach(&self, id: &str, conn: &quinn::Connection) {
        let mut entries = self.lock();
        if entries.get(id).is_some_and(|e| e.conn.stable_id() == conn.stable_id()) {
            entries.remove(id);
            self.switching.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        }
        self.rebalance(&entries);
        drop(entries);
        self.detached.notify_waiters();
    }

    /// Records that `id` holds `bytes` durably.
    pub fn set_progress(&self, id: &str, bytes: u64) {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned(), bytes);
    }

    /// What `id` held durably when its connection last reported; `None` if no
    /// connection served it since the endpoint started.
    pub fn progress(&self, id: &str) -> Option<u64> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner()).get(id).copied()
    }

    /// `id` ended (committed, failed or discarded): its progress is its record's.
    pub fn forget_progress(&self, id: &str) {
        self.progress.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    pub fn is_live(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// The connection serving `id` runs its switchover now.
    pub fn set_switching(&self, id: &str) {
        self.switching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned());
    }

    /// Whether a connection serves `id` and runs its switchover.
    pub fn is_switching(&self, id: &str) -> bool {
        self.is_live(id) && self.switching.lock().unwrap_or_else(|p| p.into_inner()).contains(id)
    }

    /// Closes the connection that still serves `id`, if any, and waits until its
    /// cleanup has run. False if it did not finish in time. The caller has checked that
    /// the new connection may resume `id`. The old one is closed as Paused, not Aborted:
    /// an agent still behind it (a second process of the same edge took over) stops and
    /// keeps its checkpoint, which the one that took over now uses.
    pub async fn take_over(&self, id: &str) -> bool {
        let deadline = tokio::time::Instant::now() + TAKE_OVER_WAIT;
        loop {
            let notified = self.detached.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.lock().get(id) {
                None => return true,
                Some(e) => e.conn.close(
                    RefusalCode::Paused.close_code().into(),
                    b"the migration was resumed on a new connection (another run of edge-agent on this edge took it over); this one stops and the migration goes on there",
                ),
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Aborts `id` if a connection serves it: its cleanup discards the files. False if
    /// no connection serves it.
    pub fn abort(&self, id: &str, reason: &str) -> bool {
        match self.lock().get(id) {
            Some(e) => {
                e.aborted.store(true, Ordering::SeqCst);
                e.conn
                    .close(RefusalCode::Aborted.close_code().into(), reason.as_bytes());
                true
            }
            None => false,
        }
    }
}

/// The flag [`LiveMigrations::abort`] sets, for a connection's cleanup.
pub fn abort_flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}
