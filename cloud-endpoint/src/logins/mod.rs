//! Password logins, guarded: every login of the endpoint (REST and vAPI sessions, edge
//! agents' Hellos over QUIC, live migrations) goes through [`Logins::authenticate`],
//! which asks the [`throttle`] before it lets the inventory run a password hash, and
//! counts and logs what happened; the caller then holds a failure's answer for the
//! source's delay ([`hold_answer`]).
//!
//! A refused attempt costs a lookup in two hash maps, not an argon2 hash (about 20 ms of a
//! core, 19 MiB): a locked user or a throttled address cannot make the endpoint burn its
//! CPU. The throttle is asked twice, before queueing for a hash slot and again once the
//! slot is free, so attempts that queued while others failed are refused too; at most
//! the few hashes that run at once (four) can overshoot a limit.

pub mod throttle;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use time::OffsetDateTime;

use crate::config::LoginSettings;
use crate::inventory::{Inventory, InventoryError, Principal};
use throttle::{Policy, Refusal, SourceKey, Throttle};

/// Locked users and blocked sources listed at most by [`Logins::stats`].
const MAX_LISTED: usize = 100;

/// The longest a failure's answer is held (see [`LoginError::BadCredentials`]): well
/// within the API's request time limit and the edges' idle timeout. A source told sooner
/// than its next try may come is refused until then, and told when.
const MAX_ANSWER_HOLD: Duration = Duration::from_secs(10);

/// Why a login was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoginError {
    /// Wrong password or unknown user (told apart nowhere). `hold` is how long the caller
    /// holds this answer: the source's delay before its next try, so that a client that
    /// retries one by one is slowed down instead of refused, and only a parallel guesser
    /// meets [`LoginError::SourceDelayed`]. Holding costs a timer, not a thread or a core.
    #[error("{}", InventoryError::BadCredentials)]
    BadCredentials { hold: Duration },

    /// The inventory failed.
    #[error(transparent)]
    Inventory(InventoryError),

    #[error("the account {user:?} is locked after too many failed logins until {until}; try again after that time")]
    Locked { user: String, until: String },

    #[error("too many failed logins from {address}: logins from this address are blocked until {until}; try again after that time with the right password")]
    SourceBlocked { address: String, until: String },

    #[error("failed logins from {address}: the next try from this address is accepted from {until} on; wait and check the user name and password")]
    SourceDelayed { address: String, until: String },

    /// Too many logins wait already (from this address, or in all): refused at once,
    /// before any queueing, so that a flood cannot make real users wait behind it.
    #[error("the endpoint is busy with {waiting} logins waiting {scope}; try again in {} s", retry_after.as_secs().max(1))]
    Busy {
        waiting: usize,
        scope: String,
        retry_after: Duration,
    },

    /// The password check failed inside the endpoint (a worker ended).
    #[error("the login failed inside the endpoint: {0}; see the endpoint's log")]
    Internal(String),
}

impl LoginError {
    /// Whether the answer is "not accepted" (bad credentials or a throttle refusal) rather
    /// than the endpoint failing.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, LoginError::Inventory(_) | LoginError::Internal(_))
    }
}

/// Holds a failed login's answer for its [`LoginError::BadCredentials`] `hold` (async:
/// a timer, not a thread). Callers run it after [`Logins::authenticate`], outside any
/// slot or lock.
pub async fn hold_answer(result: &Result<Principal, LoginError>) {
    if let Err(LoginError::BadCredentials { hold }) = result {
        if !hold.is_zero() {
            tokio::time::sleep(*hold).await;
        }
    }
}

/// How an edge agent is told over QUIC: a busy queue is `Busy` (try again soon); a throttle refusal is `BadCredentials` with its
/// message (it names the time to try again), as a wrong password is; only the endpoint
/// failing is `EndpointFailure`.
pub fn refusal(e: &LoginError) -> (gateway::wire::RefusalCode, String) {
    let code = if let LoginError::Busy { .. } = e {
        gateway::wire::RefusalCode::Busy
    } else if e.is_refusal() {
        gateway::wire::RefusalCode::BadCredentials
    } else {
        gateway::wire::RefusalCode::EndpointFailure
    };
    (code, e.to_string())
}

/// What the endpoint counted since it started, and who is held now.
#[derive(Debug, Clone, Serialize)]
pub struct LoginStats {
    /// Logins accepted.
    pub successful_logins: u64,
    /// Wrong passwords and unknown users, each found by a password check.
    pub failed_logins: u64,
    /// Attempts refused by the throttle before any password check.
    pub refused_logins: u64,
    /// Attempts refused as busy: the login queue was full (in all, or for the address).
    pub busy_logins: u64,
    /// Password checks (argon2 hashes) run.
    pub password_checks: u64,
    /// Users locked out, and sources blocked, since the start.
    pub lockouts: u64,
    pub source_blocks: u64,
    /// Held now (at most 100 each, soonest to end first).
    pub locked_users: Vec<Held>,
    pub blocked_sources: Vec<Held>,
    /// Users and sources the throttle remembers now.
    pub tracked_users: usize,
    pub tracked_sources: usize,
    /// The policy in force.
    pub policy: LoginSettings,
}

/// A user or source held until a time (RFC 3339, UTC).
#[derive(Debug, Clone, Serialize)]
pub struct Held {
    pub name: String,
    pub until: String,
}

#[derive(Debug, Default)]
struct Counters {
    successful: AtomicU64,
    failed: AtomicU64,
    refused: AtomicU64,
    busy: AtomicU64,
    checks: AtomicU64,
    lockouts: AtomicU64,
    source_blocks: AtomicU64,
}

/// How soon a login refused as busy is told to try again.
const BUSY_RETRY: Duration = Duration::from_secs(1);

/// Logins waiting or being checked: in all, and per source.
#[derive(Debug, Default)]
struct Waiting {
    total: usize,
    per_source: HashMap<SourceKey, usize>,
}

/// A login's place in the queue, given back when dropped.
#[derive(Debug)]
pub struct QueuePlace<'a> {
    logins: &'a Logins,
    key: SourceKey,
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        let mut waiting = self.logins.waiting();
        waiting.total -= 1;
        if let Some(n) = waiting.per_source.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                waiting.per_source.remove(&self.key);
            }
        }
    }
}

/// Whose turn it is to have a password checked: at most `max_checks` logins run their
/// check at once; the others wait in one queue per client address, and the addresses are
/// served round-robin. One address with many logins waiting (up to
/// `max_waiting_per_source`) then delays another address's login by one check at most,
/// not by all of its own.
#[derive(Debug, Default)]
struct Turns {
    running: usize,
    /// Addresses with logins waiting, in serving order; each appears once.
    rotation: VecDeque<SourceKey>,
    /// Each address's waiting logins, first come first served.
    queues: HashMap<SourceKey, VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>>,
    next_id: u64,
}

impl Turns {
    /// Gives the free check slots to the next waiting logins, one address after another.
    fn serve_next(&mut self, max_checks: usize) {
        while self.running < max_checks {
            let Some(key) = self.rotation.pop_front() else {
                return;
            };
            let Some(queue) = self.queues.get_mut(&key) else {
                continue;
            };
            let Some((_, wake)) = queue.pop_front() else {
                continue;
            };
            if queue.is_empty() {
                self.queues.remove(&key);
            } else {
                self.rotation.push_back(key);
            }
            // Counted as running from here: the login's Turn gives the slot back when it
            // ends, also if it was abandoned before it saw its turn.
            self.running += 1;
            let _ = wake.send(());
        }
    }
}

/// A login's turn for a password check (or its place in the line for one); the slot is
/// given to the next address's login when dropped.
#[derive(Debug)]
struct Turn<'a> {
    logins: &'a Logins,
    key: SourceKey,
    id: u64,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut turns = self.logins.turns();
        if let Some(queue) = turns.queues.get_mut(&self.key) {
            if let Some(at) = queue.iter().position(|(id, _)| *id == self.id) {
                // Still waiting: it leaves the line, and held no slot.
                queue.remove(at);
                if queue.is_empty() {
                    turns.queues.remove(&self.key);
                    let key = self.key;
                    turns.rotation.retain(|k| *k != key);
                }
                return;
            }
        }
        turns.running -= 1;
        turns.serve_next(self.logins.max_checks());
    }
}

/// The endpoint's login gate: the queue bound, the throttle, its counters and its settings.
#[derive(Debug)]
pub struct Logins {
    throttle: Mutex<Throttle>,
    waiting: Mutex<Waiting>,
    turns: Mutex<Turns>,
    counters: Counters,
    settings: LoginSettings,
}

impl Default for Logins {
    fn default() -> Self {
        Logins::new(&LoginSettings::default())
    }
}

impl Logins {
    pub fn new(settings: &LoginSettings) -> Logins {
        Logins {
            throttle: Mutex::new(Throttle::new(Policy::from(settings))),
            waiting: Mutex::new(Waiting::default()),
            turns: Mutex::new(Turns::default()),
            counters: Counters::default(),
            settings: settings.clone(),
        }
    }

    fn throttle(&self) -> MutexGuard<'_, Throttle> {
        // Every method leaves the tables consistent; a panic elsewhere cannot tear them.
        self.throttle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn waiting(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn turns(&self) -> MutexGuard<'_, Turns> {
        self.turns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Password checks at once: the setting, within the inventory's own bound.
    fn max_checks(&self) -> usize {
        (self.settings.max_concurrent_checks as usize).clamp(1, crate::inventory::MAX_CONCURRENT_PASSWORD_CHECKS)
    }

    /// Waits for this login's turn at a password check ([`Turns`]).
    async fn turn(&self, key: SourceKey) -> Turn<'_> {
        let (turn, woken) = {
            let mut turns = self.turns();
            let id = turns.next_id;
            turns.next_id += 1;
            let turn = Turn { logins: self, key, id };
            if turns.running < self.max_checks() && turns.rotation.is_empty() {
                turns.running += 1;
                return turn;
            }
            let (wake, woken) = tokio::sync::oneshot::channel();
            let queue = turns.queues.entry(key).or_default();
            queue.push_back((id, wake));
            if queue.len() == 1 {
                turns.rotation.push_back(key);
            }
            (turn, woken)
        };
        // The sender goes only with a wake-up, or with the endpoint.
        let _ = woken.await;
        turn
    }

    /// A place in the login queue for a client at `source`, or [`LoginError::Busy`] at
    /// once when `max_waiting` logins wait in all or `max_waiting_per_source` from that
    /// address (IPv4, or an IPv6 /64). The per-source share keeps a flood from one
    /// address from filling the queue; the total bounds the queue (and the threads
    /// parked in it) whatever the number of sources.
    pub fn enter(&self, source: IpAddr, via: &str) -> Result<QueuePlace<'_>, LoginError> {
        let key = SourceKey::of(source);
        let mut waiting = self.waiting();
        let from_source = waiting.per_source.get(&key).copied().unwrap_or(0);
        let full = if from_source >= self.settings.max_waiting_per_source as usize {
            Some((from_source, format!("from {key}")))
        } else if waiting.total >= self.settings.max_waiting as usize {
            Some((waiting.total, "in all".to_owned()))
        } else {
            None
        };
        if let Some((n, scope)) = full {
            drop(waiting);
            self.counters.busy.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(source = %key, via, waiting = n, scope, "login refused: the login queue is full");
            return Err(LoginError::Busy {
                waiting: n,
                scope,
                retry_after: BUSY_RETRY,
            });
        }
        waiting.total += 1;
        *waiting.per_source.entry(key).or_insert(0) += 1;
        Ok(QueuePlace { logins: self, key })
    }

    /// A whole login of a client at `source` through the `via` door: a place in the queue
    /// ([`Logins::enter`]), its turn among the client addresses ([`Turns`]), then `check`
    /// (normally [`Logins::authenticate`]) on the blocking pool, then a failure's answer
    /// held ([`hold_answer`]) after the place is given back.
    pub async fn login(
        &self,
        source: IpAddr,
        via: &str,
        check: impl FnOnce() -> Result<Principal, LoginError> + Send + 'static,
    ) -> Result<Principal, LoginError> {
        let place = self.enter(source, via)?;
        let turn = self.turn(place.key).await;
        let result = tokio::task::spawn_blocking(check)
            .await
            .unwrap_or_else(|e| Err(LoginError::Internal(e.to_string())));
        drop(turn);
        drop(place);
        hold_answer(&result).await;
        result
    }

    /// Checks `user`'s `password`, for a client at `source`, unless the throttle refuses
    /// the attempt first. Blocks (a hash takes tens of milliseconds): call it from
    /// `spawn_blocking`. `via` names the door in the log ("API", "QUIC", "live").
    pub fn authenticate(
        &self,
        inventory: &Inventory,
        user: &str,
        password: &str,
        source: IpAddr,
        via: &str,
    ) -> Result<Principal, LoginError> {
        let key = SourceKey::of(source);
        // One user whatever the case it is typed in: one count of failures, one lockout.
        let typed = user;
        let user = &crate::inventory::user_key(typed);
        self.admit(user, key, via)?;
        let checked = inventory.authenticate_admitted(typed, password, || {
            self.admit(user, key, via)?;
            self.counters.checks.fetch_add(1, Ordering::Relaxed);
            Ok::<(), LoginError>(())
        })?;
        match checked {
            Ok(principal) => {
                let refused = self.throttle().succeeded(user, Instant::now());
                if let Err(refusal) = refused {
                    return Err(self.refused(user, key, refusal, via));
                }
                self.counters.successful.fetch_add(1, Ordering::Relaxed);
                Ok(principal)
            }
            Err(InventoryError::BadCredentials) => {
                let now = Instant::now();
                let failure = self.throttle().failed(user, key, now);
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                // The name as typed: the log shows what the client sent.
                tracing::warn!(
                    user = ?typed,
                    source = %key,
                    via,
                    user_sources = failure.user_sources,
                    "login failed: wrong password or unknown user"
                );
                if let Some(until) = failure.source_blocked {
                    self.counters.source_blocks.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        source = %key,
                        until = %wall(until, now),
                        failures = self.settings.source_max_failed_attempts,
                        "login source blocked for every user: too many failed logins"
                    );
                }
                if let Some(until) = failure.user_locked {
                    self.counters.lockouts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        user = ?user,
                        source = %key,
                        until = %wall(until, now),
                        sources = self.settings.max_failed_attempts,
                        "user locked out: failed logins from several addresses"
                    );
                }
                let hold = failure.source_waits.map_or(Duration::ZERO, |at| {
                    at.saturating_duration_since(now).min(MAX_ANSWER_HOLD)
                });
                Err(LoginError::BadCredentials { hold })
            }
            Err(other) => {
                tracing::error!(user = ?typed, source = %key, via, error = %other, "login failed inside the endpoint");
                Err(LoginError::Inventory(other))
            }
        }
    }

    /// The throttle's verdict for one attempt; a refusal is counted and logged.
    fn admit(&self, user: &str, key: SourceKey, via: &str) -> Result<(), LoginError> {
        let verdict = self.throttle().admit(user, key, Instant::now());
        verdict.map_err(|refusal| self.refused(user, key, refusal, via))
    }

    fn refused(&self, user: &str, key: SourceKey, refusal: Refusal, via: &str) -> LoginError {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        // Debug, not warn: a flood would otherwise write a line per try. The failures
        // that led here were logged as warnings, and the refusals are counted.
        tracing::debug!(user = ?user, source = %key, via, ?refusal, "login refused by the throttle");
        match refusal {
            Refusal::UserLocked { until } => LoginError::Locked {
                user: user.to_owned(),
                until: wall(until, now),
            },
            Refusal::SourceBlocked { until } => LoginError::SourceBlocked {
                address: key.to_string(),
                until: wall(until, now),
            },
            Refusal::SourceDelayed { until } => LoginError::SourceDelayed {
                address: key.to_string(),
                until: wall(until, now),
            },
        }
    }

    /// Counters since the start, and who is held now.
    pub fn stats(&self) -> LoginStats {
        let now = Instant::now();
        let throttle = self.throttle();
        let held = |list: Vec<(String, Instant)>| -> Vec<Held> {
            list.into_iter()
                .take(MAX_LISTED)
                .map(|(name, until)| Held {
                    name,
                    until: wall(until, now),
                })
                .collect()
        };
        let locked_users = held(throttle.locked_users(now));
        let blocked_sources = held(
            throttle
                .blocked_sources(now)
                .into_iter()
                .map(|(key, until)| (key.to_string(), until))
                .collect(),
        );
        let (tracked_users, tracked_sources) = throttle.tracked();
        drop(throttle);
        let c = &self.counters;
        LoginStats {
            successful_logins: c.successful.load(Ordering::Relaxed),
            failed_logins: c.failed.load(Ordering::Relaxed),
            refused_logins: c.refused.load(Ordering::Relaxed),
            busy_logins: c.busy.load(Ordering::Relaxed),
            password_checks: c.checks.load(Ordering::Relaxed),
            lockouts: c.lockouts.load(Ordering::Relaxed),
            source_blocks: c.source_blocks.load(Ordering::Relaxed),
            locked_users,
            blocked_sources,
            tracked_users,
            tracked_sources,
            policy: self.settings.clone(),
        }
    }
}

/// The wall-clock time of `at` (an instant `now` or later), rounded up to the second, as
/// RFC 3339 UTC: when a refused client may try again.
fn wall(at: Instant, now: Instant) -> String {
    const FORMAT: &[time::format_description::FormatItem<'_>] =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    let t = OffsetDateTime::now_utc() + at.saturating_duration_since(now);
    let rounded = match t.nanosecond() {
        0 => t,
        n => t + Duration::from_nanos(u64::from(1_000_000_000 - n)),
    };
    rounded
        .format(FORMAT)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

#[cfg(test)]
mod tests;
