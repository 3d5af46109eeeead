//! Who may try a password now: the login throttle's state, without I/O (the time is passed
//! in, so tests move it instead of waiting).
//!
//! Two tables, each bounded:
//! - per source (a client address; see [`SourceKey`]): a second failure within the
//!   failure interval makes the source wait before its next try, twice as long after each
//!   further failure; at the source limit it is blocked for the unlock time, whatever
//!   user it tries.
//! - per user (the name as given, `user@domain`, exactly as the inventory matches it):
//!   once failures within the failure interval came from `max_failed_attempts`
//!   *different* sources, the user is locked out for the unlock time.
//!
//! Why failures count per source for a user: a lockout that any single address can
//! cause is a denial of service on the administrator from anywhere. One source guessing
//! is stopped by its own limit and never locks a user out; guessing spread over many
//! sources (which no per-source limit sees) locks the user, as vCenter's SSO does. The
//! price: a user takes at most `(max_failed_attempts - 1) * source_max_failed_attempts + 1`
//! guesses per unlock time before it locks (21 by default, vCenter's 5), and whoever
//! controls `max_failed_attempts` addresses can still lock a user out for a while.
//!
//! Clients behind one NAT share an address: a guesser among them blocks them all for the
//! unlock time (they are told so, and until when), as it would at any per-address limit.
//!
//! Unknown users are tracked like known ones, so a lockout tells nothing about which
//! names exist.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::config::LoginSettings;

/// Longest user name kept as a key: names are chosen by clients, and a table of
/// megabyte-long names would not be bounded by its entry count. Longer names share the
/// entry of their first 256 bytes; no configured user has such a name in practice.
const MAX_USER_KEY: usize = 256;

/// Where a login came from, as the throttle counts it: an IPv4 address, or the /64 of an
/// IPv6 address (one host is given a whole /64, so counting single IPv6 addresses would
/// give every guesser 2^64 fresh sources). IPv4-mapped IPv6 addresses count as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourceKey(IpAddr);

impl SourceKey {
    pub fn of(addr: IpAddr) -> SourceKey {
        match addr {
            IpAddr::V4(v4) => SourceKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey(IpAddr::V4(v4)),
                None => SourceKey(IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX)))),
            },
        }
    }
}

impl fmt::Display for SourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// Why an attempt is refused before its password is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source reached its limit: nothing from it is tried until `until`.
    SourceBlocked { until: Instant },
    /// The source failed recently: its next try may come at `until`.
    SourceDelayed { until: Instant },
    /// The user is locked out until `until`, whoever tries.
    UserLocked { until: Instant },
}

/// What a failure led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Failure {
    /// The source is now blocked (until the instant given).
    pub source_blocked: Option<Instant>,
    /// The user is now locked out (until the instant given).
    pub user_locked: Option<Instant>,
    /// The source must wait until then before its next try.
    pub source_waits: Option<Instant>,
    /// Different sources that failed as this user within the interval, this one included
    /// (0 once the user is locked: the count starts again after the lockout).
    pub user_sources: usize,
}

/// The throttle's policy, from the `[logins]` settings.
#[derive(Debug, Clone)]
pub struct Policy {
    pub max_failed_attempts: usize,
    pub failure_interval: Duration,
    pub unlock_time: Duration,
    pub source_max_failed_attempts: usize,
    pub source_delay: Duration,
    pub max_tracked: usize,
}

impl From<&LoginSettings> for Policy {
    fn from(s: &LoginSettings) -> Policy {
        let count = |n: u32| usize::try_from(n).unwrap_or(usize::MAX).max(1);
        Policy {
            max_failed_attempts: count(s.max_failed_attempts),
            failure_interval: s.failure_interval(),
            unlock_time: s.unlock_time(),
            source_max_failed_attempts: count(s.source_max_failed_attempts),
            source_delay: s.source_delay(),
            max_tracked: count(s.max_tracked),
        }
    }
}

#[derive(Debug)]
struct SourceEntry {
    /// Failures within the interval, oldest first (fewer than the source limit).
    failures: VecDeque<Instant>,
    wait_until: Option<Instant>,
    blocked_until: Option<Instant>,
    last_seen: Instant,
}

#[derive(Debug)]
struct UserEntry {
    /// The sources that failed as this user within the interval, each with its latest
    /// failure (fewer than the user limit).
    failed_from: Vec<(SourceKey, Instant)>,
    locked_until: Option<Instant>,
    last_seen: Instant,
}

/// An entry of a bounded table.
trait Tracked {
    /// Refusing something until then (a block or a lockout), if still in force at `now`.
    fn held_until(&self, now: Instant) -> Option<Instant>;
    /// Whether it still means anything at `now`: a hold, or failures within the interval.
    fn live(&self, now: Instant, interval: Duration) -> bool;
    fn last_seen(&self) -> Instant;
}

impl Tracked for SourceEntry {
    fn held_until(&self, now: Instant) -> Option<Instant> {
        self.blocked_until.filter(|&t| t > now)
    }

    fn live(&self, now: Instant, interval: Duration) -> bool {
        self.held_until(now).is_some()
            || self.wait_until.is_some_and(|t| t > now)
            || self
                .failures
                .back()
                .is_some_and(|&t| now.saturating_duration_since(t) < interval)
    }

    fn last_seen(&self) -> Instant {
        self.last_seen
    }
}

impl Tracked for UserEntry {
    fn held_until(&self, now: Instant) -> Option<Instant> {
        self.locked_until.filter(|&t| t > now)
    }

    fn live(&self, now: Instant, interval: Duration) -> bool {
        self.held_until(now).is_some()
            || self
                .failed_from
                .iter()
                .any(|&(_, t)| now.saturating_duration_since(t) < interval)
    }

    fn last_seen(&self) -> Instant {
        self.last_seen
    }
}

/// Makes room for one more entry in `table` (at most `cap`): first forget entries that no
/// longer mean anything, then the least recently seen one that holds nothing, and only if
/// every entry holds a block or lockout, the one whose hold ends first. A flood of new
/// names or addresses can so push out an old block only after filling the whole table,
/// each entry with a failure that cost the guesser a password check.
fn make_room<K: Clone + Eq + Hash, V: Tracked>(
    table: &mut HashMap<K, V>,
    cap: usize,
    now: Instant,
    interval: Duration,
) {
    if table.len() < cap {
        return;
    }
    table.retain(|_, v| v.live(now, interval));
    while table.len() >= cap {
        let victim = table
            .iter()
            .min_by_key(|(_, v)| (v.held_until(now), v.last_seen()))
            .map(|(k, _)| k.clone());
        match victim {
            Some(k) => table.remove(&k),
            None => break,
        };
    }
}

fn user_key(user: &str) -> &str {
    if user.len() <= MAX_USER_KEY {
        return user;
    }
    let mut end = MAX_USER_KEY;
    while !user.is_char_boundary(end) {
        end -= 1;
    }
    &user[..end]
}

/// The throttle's tables. See the module documentation.
#[derive(Debug)]
pub struct Throttle {
    policy: Policy,
    sources: HashMap<SourceKey, SourceEntry>,
    users: HashMap<String, UserEntry>,
}

impl Throttle {
    pub fn new(policy: Policy) -> Throttle {
        Throttle {
            policy,
            sources: HashMap::new(),
            users: HashMap::new(),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Whether `source` may try a password for `user` at `now`. Cheap: call it before
    /// the password check, and again once the check may run (others may have failed
    /// while this one waited its turn).
    pub fn admit(&self, user: &str, source: SourceKey, now: Instant) -> Result<(), Refusal> {
        if let Some(s) = self.sources.get(&source) {
            if let Some(until) = s.held_until(now) {
                return Err(Refusal::SourceBlocked { until });
            }
            if let Some(until) = s.wait_until.filter(|&t| t > now) {
                return Err(Refusal::SourceDelayed { until });
            }
        }
        if let Some(until) = self.users.get(user_key(user)).and_then(|u| u.held_until(now)) {
            return Err(Refusal::UserLocked { until });
        }
        Ok(())
    }

    /// Records a wrong password (or an unknown user) from `source`.
    pub fn failed(&mut self, user: &str, source: SourceKey, now: Instant) -> Failure {
        let p = self.policy.clone();
        let mut outcome = Failure::default();

        if !self.sources.contains_key(&source) {
            make_room(&mut self.sources, p.max_tracked, now, p.failure_interval);
        }
        let s = self.sources.entry(source).or_insert_with(|| SourceEntry {
            failures: VecDeque::new(),
            wait_until: None,
            blocked_until: None,
            last_seen: now,
        });
        s.last_seen = now;
        if s.blocked_until.is_some_and(|t| t <= now) {
            // A block served wipes the slate: the source starts again from one failure.
            s.blocked_until = None;
            s.failures.clear();
        }
        while s
            .failures
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= p.failure_interval)
        {
            s.failures.pop_front();
        }
        s.failures.push_back(now);
        if s.failures.len() >= p.source_max_failed_attempts {
            let until = now + p.unlock_time;
            s.blocked_until = Some(until);
            s.wait_until = None;
            s.failures.clear();
            outcome.source_blocked = Some(until);
        } else if s.failures.len() >= 2 && !p.source_delay.is_zero() {
            // 2nd failure: one delay, 3rd: two, 4th: four... never longer than a block.
            let doublings = u32::try_from(s.failures.len() - 2).unwrap_or(u32::MAX).min(30);
            let delay = p.source_delay.saturating_mul(1 << doublings).min(p.unlock_time);
            s.wait_until = Some(now + delay);
            outcome.source_waits = s.wait_until;
        }

        let key = user_key(user);
        if !self.users.contains_key(key) {
            make_room(&mut self.users, p.max_tracked, now, p.failure_interval);
        }
        let u = self.users.entry(key.to_owned()).or_insert_with(|| UserEntry {
            failed_from: Vec::new(),
            locked_until: None,
            last_seen: now,
        });
        u.last_seen = now;
        if u.locked_until.is_some_and(|t| t <= now) {
            u.locked_until = None;
        }
        u.failed_from
            .retain(|&(_, t)| now.saturating_duration_since(t) < p.failure_interval);
        match u.failed_from.iter_mut().find(|(from, _)| *from == source) {
            Some(entry) => entry.1 = now,
            None => u.failed_from.push((source, now)),
        }
        outcome.user_sources = u.failed_from.len();
        if u.failed_from.len() >= p.max_failed_attempts {
            let until = now + p.unlock_time;
            u.locked_until = Some(until);
            u.failed_from.clear();
            outcome.user_locked = Some(until);
            outcome.user_sources = 0;
        }
        outcome
    }

    /// Records the right password for `user`: its failures are forgotten (the source's are
    /// not: a guesser must not wipe its own record by logging in as itself). Refused if
    /// the user was locked out while its password was being checked, so that no answer
    /// tells a locked user's password was right.
    pub fn succeeded(&mut self, user: &str, now: Instant) -> Result<(), Refusal> {
        let Some(u) = self.users.get_mut(user_key(user)) else {
            return Ok(());
        };
        if let Some(until) = u.held_until(now) {
            return Err(Refusal::UserLocked { until });
        }
        self.users.remove(user_key(user));
        Ok(())
    }

    /// Users locked out at `now`, with the end of each lockout, soonest first.
    pub fn locked_users(&self, now: Instant) -> Vec<(String, Instant)> {
        let mut list: Vec<_> = self
            .users
            .iter()
            .filter_map(|(name, u)| Some((name.clone(), u.held_until(now)?)))
            .collect();
        list.sort_by_key(|(_, until)| *until);
        list
    }

    /// Sources blocked at `now`, with the end of each block, soonest first.
    pub fn blocked_sources(&self, now: Instant) -> Vec<(SourceKey, Instant)> {
        let mut list: Vec<_> = self
            .sources
            .iter()
            .filter_map(|(key, s)| Some((*key, s.held_until(now)?)))
            .collect();
        list.sort_by_key(|(_, until)| *until);
        list
    }

    /// Entries held: users, sources.
    pub fn tracked(&self) -> (usize, usize) {
        (self.users.len(), self.sources.len())
    }
}

#[cfg(test)]
#[path = "throttle_tests.rs"]
mod tests;
