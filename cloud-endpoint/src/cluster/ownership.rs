//! This endpoint's side of the migration leases ([`super::lease`]): a connection takes
//! its migration's lease when it starts serving it (a new migration's comes with its
//! record), the endpoint's keeper renews every lease it holds in one transaction per
//! tick, and the connection lets its lease go once the staged files are journaled,
//! committed or discarded. Between connections a migration has no live lease, so its
//! edge may resume it at any endpoint of the domain; a dead endpoint's leases expire
//! and the endpoint the edge reaches next takes the migration over with a new epoch.
//!
//! A lease this endpoint can no longer renew in time (the database is unreachable, or
//! another endpoint took it) stops its connection before the lease's deadline on this
//! endpoint's own clock: the owner never writes into a staging folder another endpoint
//! may have taken.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::lease::{Claim, Hold, Lease, Lost};
use crate::inventory::{Inventory, InventoryError, LeaseClock};

/// What a connection does when its lease is lost: stop at once, keeping its hands off
/// the staging folder.
pub type OnLost = Box<dyn Fn(&Lost) + Send + Sync>;

struct Entry {
    hold: Hold,
    token: u64,
    on_lost: Arc<OnLost>,
}

/// Who this endpoint is in the domain (its host name), how long its leases last, and
/// the leases it holds now.
pub struct Ownership {
    me: String,
    period: Duration,
    held: Mutex<HashMap<String, Entry>>,
    tokens: AtomicU64,
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership")
            .field("me", &self.me)
            .field("period", &self.period)
            .field("held", &self.held().len())
            .finish()
    }
}

/// The answer to a claim.
#[derive(Debug)]
pub enum Claimed {
    /// This endpoint owns the migration; the lease is kept until released or dropped.
    Mine(HeldLease),
    /// Another endpoint serves it: the edge must wait for that lease to expire.
    HeldBy(Lease),
}

/// A lease this endpoint holds and renews. Dropping it stops the renewals (the lease
/// then expires); [`HeldLease::release`] also frees it in the database at once.
pub struct HeldLease {
    ownership: Arc<Ownership>,
    migration: String,
    epoch: i64,
    token: u64,
}

impl std::fmt::Debug for HeldLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldLease")
            .field("migration", &self.migration)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl HeldLease {
    pub fn migration(&self) -> &str {
        &self.migration
    }

    /// Whether this endpoint may still write for the migration: the lease was renewed in
    /// time and no one took it.
    pub fn valid(&self) -> bool {
        self.ownership
            .held()
            .get(&self.migration)
            .is_some_and(|e| e.token == self.token && e.hold.valid_at(Instant::now()))
    }

    /// What to do if the lease is lost (the connection serving the migration stops).
    pub fn when_lost(&self, on_lost: OnLost) {
        if let Some(e) = self
            .ownership
            .held()
            .get_mut(&self.migration)
            .filter(|e| e.token == self.token)
        {
            e.on_lost = Arc::new(on_lost);
        }
    }

    /// Renews now (before a commit): the owner that lost its lease must not register
    /// the VM. Blocking.
    pub fn confirm(&self, inventory: &Inventory) -> Result<(), String> {
        let asked = Instant::now();
        let o = &self.ownership;
        match inventory.renew_lease(&self.migration, &o.me, self.epoch, o.period, LeaseClock::Database) {
            Ok(Ok(lease)) => {
                if let Some(e) = o.held().get_mut(&self.migration).filter(|e| e.token == self.token) {
                    e.hold = Hold::new(lease.epoch, asked, o.period);
                }
                Ok(())
            }
            Ok(Err(lost)) => Err(format!(
                "this endpoint ({}) no longer owns the migration: {lost}; the edge resumes it where it is owned now",
                o.me
            )),
            Err(e) => Err(format!(
                "this endpoint ({}) cannot confirm that it still owns {}: {e}",
                o.me, self.migration
            )),
        }
    }

    /// The migration ended here, or its files are journaled for a resume: any endpoint
    /// may serve it now. A failure only delays that until the lease expires, so it is
    /// logged, not returned. Blocking.
    pub fn release(self, inventory: &Inventory) {
        let o = &self.ownership;
        match inventory.release_lease(&self.migration, &o.me, self.epoch) {
            Ok(true) => tracing::debug!(migration = %self.migration, epoch = self.epoch, "lease released"),
            Ok(false) => {
                tracing::info!(migration = %self.migration, "lease not released: another endpoint holds it now")
            }
            Err(e) => tracing::warn!(
                migration = %self.migration,
                error = %e,
                "cannot release the lease; other endpoints may take the migration once it expires"
            ),
        }
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        let mut held = self.ownership.held();
        if held.get(&self.migration).is_some_and(|e| e.token == self.token) {
            held.remove(&self.migration);
        }
    }
}

impl Ownership {
    pub fn new(me: impl Into<String>, period: Duration) -> Arc<Ownership> {
        Arc::new(Ownership {
            me: me.into(),
            period,
            held: Mutex::default(),
            tokens: AtomicU64::new(1),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This endpoint's name in the leases: its host in the domain's cluster.
    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    /// How often held leases are renewed: a third of the period, so that two renewals
    /// can fail (a slow database, a lost packet) before the owner must stop.
    pub fn renew_every(&self) -> Duration {
        self.period / 3
    }

    /// Starts keeping a lease the database granted (epoch `epoch`) to a request that
    /// left at `asked`; `on_lost` is called once if it cannot be kept.
    pub fn keep(self: &Arc<Self>, migration: &str, epoch: i64, asked: Instant, on_lost: OnLost) -> HeldLease {
        let token = self.tokens.fetch_add(1, Ordering::Relaxed);
        self.held().insert(
            migration.to_owned(),
            Entry {
                hold: Hold::new(epoch, asked, self.period),
                token,
                on_lost: Arc::new(on_lost),
            },
        );
        HeldLease {
            ownership: self.clone(),
            migration: migration.to_owned(),
            epoch,
            token,
        }
    }

    /// Asks for `migration` (a resume arrived, or the janitor wants to end it). Blocking.
    pub fn claim(
        self: &Arc<Self>,
        inventory: &Inventory,
        migration: &str,
        on_lost: OnLost,
    ) -> Result<Claimed, InventoryError> {
        let asked = Instant::now();
        Ok(
            match inventory.claim_migration(migration, &self.me, self.period, LeaseClock::Database)? {
                Claim::Granted(lease) => Claimed::Mine(self.keep(migration, lease.epoch, asked, on_lost)),
                Claim::HeldBy(lease) => Claimed::HeldBy(lease),
            },
        )
    }

    /// Runs `work` on `migration` only if no other endpoint serves it, holding the lease
    /// meanwhile (the janitor ending a migration whose edge never came back). `None` if
    /// another endpoint holds it. Blocking.
    pub fn while_held<T>(
        self: &Arc<Self>,
        inventory: &Inventory,
        migration: &str,
        work: impl FnOnce() -> T,
    ) -> Result<Option<T>, InventoryError> {
        match self.claim(inventory, migration, Box::new(|_| {}))? {
            Claimed::HeldBy(lease) => {
                tracing::debug!(migration, owner = %lease.owner, "left alone: another endpoint serves it");
                Ok(None)
            }
            Claimed::Mine(held) => {
                let done = work();
                held.release(inventory);
                Ok(Some(done))
            }
        }
    }

    /// The message for an edge whose resume arrived here while `lease`'s owner serves it.
    pub fn held_elsewhere(&self, lease: &Lease) -> String {
        format!(
            "migration {} is being served by endpoint {} of this domain; if that endpoint is gone, its lease expires within {} s and this endpoint takes the migration over: retry then",
            lease.migration,
            lease.owner,
            self.period.as_secs().max(1)
        )
    }

    /// One tick of the keeper: renews every held lease in one transaction, and stops
    /// (calls `on_lost` of) those that were taken or that could not be renewed before
    /// the next tick may come too late. Blocking.
    pub fn renew_all(&self, inventory: &Inventory) {
        let held: Vec<(String, i64, u64)> = self
            .held()
            .iter()
            .map(|(id, e)| (id.clone(), e.hold.epoch, e.token))
            .collect();
        if held.is_empty() {
            return;
        }
        let asked = Instant::now();
        let leases: Vec<(String, i64)> = held.iter().map(|(id, epoch, _)| (id.clone(), *epoch)).collect();
        let answers = inventory.renew_leases(&leases, &self.me, self.period, LeaseClock::Database);
        let mut lost = Vec::new();
        {
            let mut table = self.held();
            match answers {
                Ok(answers) => {
                    for ((id, _, token), answer) in held.iter().zip(answers) {
                        let Some(entry) = table.get_mut(id).filter(|e| e.token == *token) else {
                            continue;
                        };
                        match answer {
                            Ok(lease) => entry.hold = Hold::new(lease.epoch, asked, self.period),
                            Err(why) => lost.push((id.clone(), why, entry.on_lost.clone())),
                        }
                    }
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    leases = held.len(),
                    "cannot renew this endpoint's migration leases; they stop if the database does not answer before they expire"
                ),
            }
            for (id, _, _) in &lost {
                table.remove(id);
            }
        }
        stop(lost);
        self.stop_expiring();
    }

    /// Stops the leases that were not renewed in time: after the next tick it may be too
    /// late, so they stop now, before another endpoint may start. No I/O: the keeper
    /// runs it every tick even while the database does not answer.
    pub fn stop_expiring(&self) {
        let next = Instant::now() + self.renew_every();
        let mut lost = Vec::new();
        {
            let mut table = self.held();
            table.retain(|id, e| {
                if e.hold.valid_at(next) {
                    return true;
                }
                let why = Lost::NotRenewed { migration: id.clone() };
                lost.push((id.clone(), why, e.on_lost.clone()));
                false
            });
        }
        stop(lost);
    }
}

fn stop(lost: Vec<(String, Lost, Arc<OnLost>)>) {
    for (id, why, on_lost) in lost {
        tracing::warn!(migration = %id, reason = %why, "lease lost: this endpoint stops serving the migration");
        on_lost(&why);
    }
}

/// Renews this endpoint's leases until the task is dropped.
pub async fn keep_leases(ownership: Arc<Ownership>, domain: Arc<crate::Domain>) {
    let mut tick = tokio::time::interval(ownership.renew_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renewing: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tick.tick().await;
        // A database that does not answer must not hold the deadlines back.
        ownership.stop_expiring();
        if renewing.as_ref().is_some_and(|r| !r.is_finished()) {
            continue;
        }
        let (o, d) = (ownership.clone(), domain.clone());
        renewing = Some(tokio::task::spawn_blocking(move || o.renew_all(&d.inventory)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn flag() -> (Arc<AtomicBool>, OnLost) {
        let lost = Arc::new(AtomicBool::new(false));
        let set = lost.clone();
        (lost, Box::new(move |_| set.store(true, Ordering::SeqCst)))
    }

    #[test]
    fn a_lease_not_renewed_in_time_stops_its_connection_before_it_expires() {
        let owner = Ownership::new("esx-a", Duration::from_secs(3));
        let (lost, on_lost) = flag();
        // Granted 2.5 s ago: its deadline (2.7 s after asking) falls before the next tick.
        let asked = Instant::now() - Duration::from_millis(2_500);
        let held = owner.keep("migration-1", 1, asked, on_lost);
        assert!(held.valid());
        owner.stop_expiring();
        assert!(lost.load(Ordering::SeqCst), "stopped before another endpoint may start");
        assert!(!held.valid());
    }

    #[test]
    fn a_fresh_lease_is_kept_and_dropping_it_stops_its_renewals() {
        let owner = Ownership::new("esx-a", Duration::from_secs(10));
        let (lost, on_lost) = flag();
        let held = owner.keep("migration-1", 1, Instant::now(), on_lost);
        owner.stop_expiring();
        assert!(!lost.load(Ordering::SeqCst));
        assert!(held.valid());
        // A new connection of the same migration replaced it: the old one's drop leaves
        // the new entry alone.
        let (_, again) = flag();
        let newer = owner.keep("migration-1", 2, Instant::now(), again);
        drop(held);
        assert!(newer.valid());
        drop(newer);
        assert_eq!(owner.held().len(), 0);
    }
}
