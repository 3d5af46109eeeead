//! Who owns a migration in a domain of several endpoints: a lease per migration, kept in
//! the shared database, renewed by its owner and free for another endpoint to take once
//! it expires. No I/O here: the decisions take the lease as read and the time, and the
//! inventory applies them inside one transaction (`inventory::leases`).
//!
//! Times are the database's clock in milliseconds: the one clock all endpoints share. The
//! owner never relies on that clock to stop: it keeps its own deadline on its monotonic
//! clock ([`Hold`]), counted from before it asked, so it stops writing no later than the
//! database lets another endpoint take over.
//!
//! The epoch counts owners: each take-over increments it, and the owner's every renewal
//! names the epoch it holds, so a slow owner that comes back after losing its lease is
//! told so even when the new owner has the same name (it restarted).

use std::time::{Duration, Instant};

/// A migration's lease as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub migration: String,
    /// The endpoint (its host name in the domain) that owns the migration.
    pub owner: String,
    pub epoch: i64,
    /// Database time (ms since the Unix epoch) from which another endpoint may take it.
    pub expires_ms: i64,
}

/// The answer to an endpoint that wants a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The endpoint owns it (new, taken over from an expired owner, or already its own).
    Granted(Lease),
    /// Another endpoint owns it until `expires_ms`: the edge must come back later (or to
    /// that endpoint).
    HeldBy(Lease),
}

/// Why a renewal failed: the owner must stop writing at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Lost {
    #[error("the lease of migration {migration} expired at {expired_ms} before its owner renewed it")]
    Expired { migration: String, expired_ms: i64 },
    #[error("migration {migration} is owned by endpoint {owner} (epoch {epoch}) now")]
    TakenBy {
        migration: String,
        owner: String,
        epoch: i64,
    },
    #[error("migration {migration} has no lease any more (it ended)")]
    Released { migration: String },
    #[error("the lease of migration {migration} could not be renewed before its deadline (the database did not answer in time)")]
    NotRenewed { migration: String },
}

/// `me` asks for `migration`, whose lease is `current`, at database time `now_ms`.
pub fn claim(current: Option<&Lease>, migration: &str, me: &str, now_ms: i64, period: Duration) -> Claim {
    let expires_ms = now_ms.saturating_add(millis(period));
    match current {
        None => Claim::Granted(Lease {
            migration: migration.to_owned(),
            owner: me.to_owned(),
            epoch: 1,
            expires_ms,
        }),
        // Its own, still valid: the edge reconnected to the endpoint that holds it.
        Some(lease) if lease.owner == me && lease.expires_ms > now_ms => Claim::Granted(Lease {
            expires_ms,
            ..lease.clone()
        }),
        // Expired: whoever held it (this endpoint too, before a restart) has stopped by
        // its own deadline, so the next owner starts a new epoch.
        Some(lease) if lease.expires_ms <= now_ms => Claim::Granted(Lease {
            migration: migration.to_owned(),
            owner: me.to_owned(),
            epoch: lease.epoch + 1,
            expires_ms,
        }),
        Some(lease) => Claim::HeldBy(lease.clone()),
    }
}

/// The owner `me`, holding `epoch`, renews at database time `now_ms`. A lease that expired
/// is not renewed even if no one took it: its owner's deadline has passed, so it stopped
/// writing and must claim the migration again (a new epoch) to go on.
pub fn renew(
    current: Option<&Lease>,
    migration: &str,
    me: &str,
    epoch: i64,
    now_ms: i64,
    period: Duration,
) -> Result<Lease, Lost> {
    match current {
        None => Err(Lost::Released {
            migration: migration.to_owned(),
        }),
        Some(lease) if lease.owner != me || lease.epoch != epoch => Err(Lost::TakenBy {
            migration: migration.to_owned(),
            owner: lease.owner.clone(),
            epoch: lease.epoch,
        }),
        Some(lease) if lease.expires_ms <= now_ms => Err(Lost::Expired {
            migration: migration.to_owned(),
            expired_ms: lease.expires_ms,
        }),
        Some(lease) => Ok(Lease {
            expires_ms: now_ms.saturating_add(millis(period)),
            ..lease.clone()
        }),
    }
}

/// Whether `me` holding `epoch` may delete the lease (its migration ended).
pub fn may_release(current: Option<&Lease>, me: &str, epoch: i64) -> bool {
    current.is_some_and(|lease| lease.owner == me && lease.epoch == epoch)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The owner's side of a lease: until when it may write, on its own monotonic clock.
///
/// A grant or renewal that the database stamped `now_db + period` was asked at
/// `asked` (before the request left): the database's `now_db` is no earlier than that,
/// so `asked + period` is no later than the expiry every other endpoint sees. The margin
/// covers the two clocks running at slightly different rates over one period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    pub epoch: i64,
    deadline: Instant,
}

/// The share of a period kept as a margin against clock rate differences.
const MARGIN_DIVISOR: u32 = 10;

impl Hold {
    pub fn new(epoch: i64, asked: Instant, period: Duration) -> Hold {
        Hold {
            epoch,
            deadline: asked + period - period / MARGIN_DIVISOR,
        }
    }

    /// Whether the owner may still write at `now`.
    pub fn valid_at(&self, now: Instant) -> bool {
        now < self.deadline
    }

    /// When the owner should renew: a third of the way, so that two renewals can fail
    /// (a slow database, a lost packet) before it must stop.
    pub fn renew_at(asked: Instant, period: Duration) -> Instant {
        asked + period / 3
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERIOD: Duration = Duration::from_secs(10);

    /// A fake database clock: milliseconds that a test moves by hand.
    struct Clock(i64);

    impl Clock {
        fn advance(&mut self, d: Duration) -> i64 {
            self.0 += millis(d);
            self.0
        }
    }

    fn granted(claim: Claim) -> Lease {
        match claim {
            Claim::Granted(lease) => lease,
            Claim::HeldBy(lease) => panic!("held by {lease:?}"),
        }
    }

    #[test]
    fn the_first_claim_owns_and_others_wait_until_expiry() {
        let mut clock = Clock(1_000_000);
        let a = granted(claim(None, "migration-3", "esx-a", clock.0, PERIOD));
        assert_eq!((a.owner.as_str(), a.epoch, a.expires_ms), ("esx-a", 1, 1_010_000));
        // Another endpoint is refused for the whole period, to the millisecond.
        clock.advance(Duration::from_millis(9_999));
        assert_eq!(
            claim(Some(&a), "migration-3", "esx-b", clock.0, PERIOD),
            Claim::HeldBy(a.clone())
        );
        clock.advance(Duration::from_millis(1));
        let b = granted(claim(Some(&a), "migration-3", "esx-b", clock.0, PERIOD));
        assert_eq!((b.owner.as_str(), b.epoch, b.expires_ms), ("esx-b", 2, 1_020_000));
    }

    #[test]
    fn renewals_keep_the_lease_as_long_as_they_come_in_time() {
        let mut clock = Clock(0);
        let mut lease = granted(claim(None, "migration-3", "esx-a", clock.0, PERIOD));
        for _ in 0..100 {
            clock.advance(PERIOD / 3);
            assert_eq!(
                claim(Some(&lease), "migration-3", "esx-b", clock.0, PERIOD),
                Claim::HeldBy(lease.clone())
            );
            lease = renew(Some(&lease), "migration-3", "esx-a", 1, clock.0, PERIOD).unwrap();
        }
        assert_eq!(lease.epoch, 1);
        assert_eq!(lease.expires_ms, clock.0 + 10_000);
    }

    #[test]
    fn a_slow_owner_that_comes_back_after_expiry_has_lost_even_if_no_one_took_it() {
        let mut clock = Clock(0);
        let lease = granted(claim(None, "migration-3", "esx-a", clock.0, PERIOD));
        clock.advance(PERIOD);
        assert_eq!(
            renew(Some(&lease), "migration-3", "esx-a", 1, clock.0, PERIOD),
            Err(Lost::Expired {
                migration: "migration-3".into(),
                expired_ms: 10_000
            })
        );
        // It may claim it again, as a new owner: a new epoch, and its journal reopened.
        let again = granted(claim(Some(&lease), "migration-3", "esx-a", clock.0, PERIOD));
        assert_eq!(again.epoch, 2);
    }

    #[test]
    fn a_slow_owner_whose_lease_was_taken_is_told_by_whom() {
        let mut clock = Clock(0);
        let a = granted(claim(None, "migration-3", "esx-a", clock.0, PERIOD));
        clock.advance(PERIOD + Duration::from_secs(1));
        let b = granted(claim(Some(&a), "migration-3", "esx-b", clock.0, PERIOD));
        clock.advance(Duration::from_secs(1));
        let lost = renew(Some(&b), "migration-3", "esx-a", a.epoch, clock.0, PERIOD).unwrap_err();
        assert_eq!(
            lost,
            Lost::TakenBy {
                migration: "migration-3".into(),
                owner: "esx-b".into(),
                epoch: 2
            }
        );
        assert_eq!(
            lost.to_string(),
            "migration migration-3 is owned by endpoint esx-b (epoch 2) now"
        );
        // Nor may it release the new owner's lease.
        assert!(!may_release(Some(&b), "esx-a", 1));
        assert!(may_release(Some(&b), "esx-b", 2));
    }

    #[test]
    fn a_restarted_owner_with_the_same_name_cannot_renew_its_old_epoch() {
        let mut clock = Clock(0);
        let old = granted(claim(None, "migration-3", "esx-a", clock.0, PERIOD));
        clock.advance(PERIOD);
        let new = granted(claim(Some(&old), "migration-3", "esx-a", clock.0, PERIOD));
        assert_eq!(new.epoch, 2);
        assert!(matches!(
            renew(Some(&new), "migration-3", "esx-a", 1, clock.0, PERIOD),
            Err(Lost::TakenBy { epoch: 2, .. })
        ));
        assert!(renew(Some(&new), "migration-3", "esx-a", 2, clock.0, PERIOD).is_ok());
    }

    #[test]
    fn the_owner_reclaiming_a_valid_lease_keeps_its_epoch() {
        let mut clock = Clock(0);
        let lease = granted(claim(None, "migration-3", "esx-a", clock.0, PERIOD));
        clock.advance(Duration::from_secs(4));
        let again = granted(claim(Some(&lease), "migration-3", "esx-a", clock.0, PERIOD));
        assert_eq!((again.epoch, again.expires_ms), (1, 14_000));
    }

    #[test]
    fn a_released_lease_cannot_be_renewed() {
        assert_eq!(
            renew(None, "migration-3", "esx-a", 1, 0, PERIOD),
            Err(Lost::Released {
                migration: "migration-3".into()
            })
        );
    }

    #[test]
    fn the_owner_stops_before_anyone_else_may_start() {
        // The owner asked at `asked`; the database stamped the grant up to 300 ms later
        // (a slow round trip). Whatever that delay, the owner's deadline comes first.
        let start = Instant::now();
        for delay_ms in [0u64, 5, 300, 3_000] {
            let asked = start;
            let db_now = 50_000 + delay_ms as i64;
            let lease = granted(claim(None, "migration-3", "esx-a", db_now, PERIOD));
            let hold = Hold::new(lease.epoch, asked, PERIOD);
            // The moment another endpoint may take over, on the owner's clock (the two
            // clocks agree on rates here; the margin covers when they do not).
            let others_may_take =
                asked + Duration::from_millis(delay_ms) + Duration::from_millis((lease.expires_ms - db_now) as u64);
            assert!(hold.deadline() < others_may_take, "delay {delay_ms} ms");
            assert!(hold.valid_at(asked + PERIOD / 2));
            assert!(!hold.valid_at(hold.deadline()));
            assert!(Hold::renew_at(asked, PERIOD) < hold.deadline());
        }
    }
}
