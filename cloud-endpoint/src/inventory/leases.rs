//! The leases of a scale-out domain's migrations, kept in the inventory: each call reads a
//! lease, lets `cluster::lease` decide and writes the answer, in one transaction, so two
//! endpoints asking at once are answered one after the other.

use std::time::Duration;

use super::store::{Row, StoreError, Tx};
use super::{Inventory, InventoryError};
use crate::cluster::lease::{self, Claim, Lease, Lost};
use crate::store_params;

/// Which clock a lease is timed by: the database's (every endpoint's, in service), or a
/// time a test gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseClock {
    Database,
    At(i64),
}

pub(super) fn now_ms(tx: &mut dyn Tx, clock: LeaseClock) -> Result<i64, StoreError> {
    match clock {
        LeaseClock::At(ms) => Ok(ms),
        LeaseClock::Database => {
            let sql = format!("SELECT {}", tx.dialect().now_ms());
            tx.query_row(&sql, &[], |row| row.get(0))
        }
    }
}

fn lease_of(tx: &mut dyn Tx, migration: &str) -> Result<Option<Lease>, StoreError> {
    tx.query_row_opt(
        "SELECT migration, owner, epoch, expires_ms FROM migration_lease WHERE migration = ?1",
        store_params![migration],
        lease_from_row,
    )
}

fn lease_from_row(row: &Row) -> Result<Lease, StoreError> {
    Ok(Lease {
        migration: row.get(0)?,
        owner: row.get(1)?,
        epoch: row.get(2)?,
        expires_ms: row.get(3)?,
    })
}

/// The first lease of a migration `owner` just began, written with its record: from its
/// first moment no other endpoint can take it for an orphan.
pub(super) fn insert_first(tx: &mut dyn Tx, migration: &str, owner: &str, period: Duration) -> Result<(), StoreError> {
    let now = now_ms(tx, LeaseClock::Database)?;
    match lease::claim(None, migration, owner, now, period) {
        Claim::Granted(first) => {
            tx.execute(
                "INSERT INTO migration_lease (migration, owner, epoch, expires_ms) VALUES (?1, ?2, ?3, ?4)",
                store_params![first.migration, first.owner, first.epoch, first.expires_ms],
            )?;
            Ok(())
        }
        Claim::HeldBy(_) => unreachable!("a migration without a lease is always granted"),
    }
}

fn store(tx: &mut dyn Tx, lease: &Lease) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO migration_lease (migration, owner, epoch, expires_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (migration) DO UPDATE
         SET owner = excluded.owner, epoch = excluded.epoch, expires_ms = excluded.expires_ms",
        store_params![lease.migration, lease.owner, lease.epoch, lease.expires_ms],
    )?;
    Ok(())
}

impl Inventory {
    /// Endpoint `me` asks to own `migration` for `period`: granted (new, taken over from
    /// an owner whose lease expired, or already its own), or held by another endpoint.
    pub fn claim_migration(
        &self,
        migration: &str,
        me: &str,
        period: Duration,
        clock: LeaseClock,
    ) -> Result<Claim, InventoryError> {
        self.write(|tx| {
            super::state_of(tx, migration)?;
            let now = now_ms(tx, clock)?;
            let claim = lease::claim(lease_of(tx, migration)?.as_ref(), migration, me, now, period);
            if let Claim::Granted(lease) = &claim {
                store(tx, lease)?;
            }
            Ok(claim)
        })
    }

    /// The owner `me`, holding `epoch`, renews its lease of `migration`; `Err(Lost)` when
    /// it must stop at once.
    pub fn renew_lease(
        &self,
        migration: &str,
        me: &str,
        epoch: i64,
        period: Duration,
        clock: LeaseClock,
    ) -> Result<Result<Lease, Lost>, InventoryError> {
        self.write(|tx| {
            let now = now_ms(tx, clock)?;
            let renewed = lease::renew(lease_of(tx, migration)?.as_ref(), migration, me, epoch, now, period);
            if let Ok(lease) = &renewed {
                store(tx, lease)?;
            }
            Ok(renewed)
        })
    }

    /// The migration ended (or its owner gives it up): the lease expires now, keeping its
    /// epoch. False when `me` no longer held it.
    pub fn release_lease(&self, migration: &str, me: &str, epoch: i64) -> Result<bool, InventoryError> {
        self.write(|tx| {
            let current = lease_of(tx, migration)?;
            if !lease::may_release(current.as_ref(), me, epoch) {
                return Ok(false);
            }
            tx.execute(
                "UPDATE migration_lease SET expires_ms = 0 WHERE migration = ?1",
                store_params![migration],
            )?;
            Ok(true)
        })
    }

    /// RUNNING migrations whose lease has expired (their owner died, or they were never
    /// leased): what an endpoint may take over, oldest first.
    pub fn orphaned_migrations(&self, clock: LeaseClock) -> Result<Vec<String>, InventoryError> {
        self.read(|tx| {
            let now = now_ms(tx, clock)?;
            Ok(tx.query_map(
                "SELECT m.id FROM migration m LEFT JOIN migration_lease l ON l.migration = m.id
                 WHERE m.state = 'RUNNING' AND (l.migration IS NULL OR l.expires_ms <= ?1) ORDER BY m.num",
                store_params![now],
                |row| row.get(0),
            )?)
        })
    }

    /// The leases `owner` holds now: after a restart, an endpoint resumes only these (and
    /// the orphans it claims), never one another endpoint took meanwhile.
    pub fn leases_held_by(&self, owner: &str, clock: LeaseClock) -> Result<Vec<Lease>, InventoryError> {
        self.read(|tx| {
            let now = now_ms(tx, clock)?;
            Ok(tx.query_map(
                "SELECT migration, owner, epoch, expires_ms FROM migration_lease
                 WHERE owner = ?1 AND expires_ms > ?2 ORDER BY migration",
                store_params![owner, now],
                lease_from_row,
            )?)
        })
    }

    /// The owner `me` renews the leases it holds, `(migration, epoch)`, in one
    /// transaction: one answer per lease, in order (an endpoint serving hundreds of
    /// migrations renews them with one round of statements, not one transaction each).
    /// Each renewal is one compare-and-set of its row (still `me`'s, same epoch, not
    /// expired), so renewals of several endpoints never conflict with one another.
    pub fn renew_leases(
        &self,
        held: &[(String, i64)],
        me: &str,
        period: Duration,
        clock: LeaseClock,
    ) -> Result<Vec<Result<Lease, Lost>>, InventoryError> {
        let result = self.store.write_by_row(|tx| {
            let now = now_ms(tx, clock)?;
            let expires_ms = now.saturating_add(i64::try_from(period.as_millis()).unwrap_or(i64::MAX));
            let mut answers = Vec::with_capacity(held.len());
            for (migration, epoch) in held {
                let renewed = tx.execute(
                    "UPDATE migration_lease SET expires_ms = ?4
                     WHERE migration = ?1 AND owner = ?2 AND epoch = ?3 AND expires_ms > ?5",
                    store_params![migration, me, epoch, expires_ms, now],
                )?;
                answers.push(if renewed == 1 {
                    Ok(Lease {
                        migration: migration.clone(),
                        owner: me.to_owned(),
                        epoch: *epoch,
                        expires_ms,
                    })
                } else {
                    // Why not: the row as it is now says (taken, expired, released).
                    let current = lease_of(tx, migration)?;
                    match lease::renew(current.as_ref(), migration, me, *epoch, now, period) {
                        Err(lost) => Err(lost),
                        Ok(_) => Err(Lost::NotRenewed {
                            migration: migration.clone(),
                        }),
                    }
                });
            }
            Ok::<_, InventoryError>(answers)
        });
        result.map_err(|e| e.with_path(&self.path))
    }

    /// The live lease of `migration` if an endpoint other than `me` holds it: that
    /// endpoint serves the migration now.
    pub fn served_elsewhere(
        &self,
        migration: &str,
        me: &str,
        clock: LeaseClock,
    ) -> Result<Option<Lease>, InventoryError> {
        self.read(|tx| {
            let now = now_ms(tx, clock)?;
            Ok(lease_of(tx, migration)?.filter(|l| l.owner != me && l.expires_ms > now))
        })
    }

    /// RUNNING migrations that some endpoint was serving when it stopped renewing their
    /// lease (it died): those with a resume record now wait for their edge (which may
    /// resume them at any endpoint), like the migrations of a restarted endpoint. Returns
    /// (those without a resume record, which cannot resume and are for the caller to
    /// discard; those now waiting).
    pub fn interrupt_orphans(&self, clock: LeaseClock) -> Result<(Vec<String>, Vec<String>), InventoryError> {
        self.write(|tx| {
            let now = now_ms(tx, clock)?;
            let orphans: Vec<(String, bool)> = tx.query_map(
                "SELECT m.id, m.plan IS NOT NULL FROM migration m LEFT JOIN migration_lease l ON l.migration = m.id
                 WHERE m.state = 'RUNNING' AND m.interrupted IS NULL AND (l.migration IS NULL OR l.expires_ms <= ?1)
                 ORDER BY m.num",
                store_params![now],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?;
            let at = super::now();
            let (waiting, unresumable): (Vec<_>, Vec<_>) = orphans.into_iter().partition(|(_, plan)| *plan);
            for (id, _) in &waiting {
                tx.execute(
                    "UPDATE migration SET interrupted = ?2 WHERE id = ?1 AND state = 'RUNNING' AND interrupted IS NULL",
                    store_params![id, at],
                )?;
            }
            Ok((
                unresumable.into_iter().map(|(id, _)| id).collect(),
                waiting.into_iter().map(|(id, _)| id).collect(),
            ))
        })
    }
}
