//! API sessions: a login (user and password checked against the inventory) gives an opaque
//! token; later requests carry it. Sessions live in memory only, so a restart logs every
//! client out, as a vCenter restart does.
//!
//! The store takes the current time as an argument ([`Now`]) instead of reading a clock,
//! so expiry is tested without waiting.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rand::TryRngCore as _;
use time::OffsetDateTime;

use crate::inventory::Principal;

/// A session unused for this long is gone (vCenter's default idle timeout is 30 minutes).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// At most this many sessions at once; a login beyond it ends the least recently used one.
/// Bounds memory against clients that log in per request and never log out.
pub const MAX_SESSIONS: usize = 1000;

/// The instant of a request: monotonic for expiry, wall clock for what clients see.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub instant: Instant,
    pub wall: OffsetDateTime,
}

impl Now {
    pub fn current() -> Now {
        Now {
            instant: Instant::now(),
            wall: OffsetDateTime::now_utc(),
        }
    }

    /// `self` moved `by` forward (tests).
    pub fn plus(self, by: Duration) -> Now {
        Now {
            instant: self.instant + by,
            wall: self.wall + by,
        }
    }
}

/// What a valid session token stands for.
#[derive(Debug, Clone)]
pub struct Session {
    pub principal: Principal,
    pub created: OffsetDateTime,
    pub last_accessed: OffsetDateTime,
    last_used: Instant,
}

/// The sessions of one API server.
#[derive(Debug)]
pub struct SessionStore {
    sessions: Mutex<HashMap<String, Session>>,
    idle_timeout: Duration,
    max_sessions: usize,
}

impl Default for SessionStore {
    fn default() -> Self {
        SessionStore::new(IDLE_TIMEOUT, MAX_SESSIONS)
    }
}

impl SessionStore {
    /// A store whose sessions expire after `idle_timeout` unused, holding at most
    /// `max_sessions` (at least 1).
    pub fn new(idle_timeout: Duration, max_sessions: usize) -> SessionStore {
        SessionStore {
            sessions: Mutex::new(HashMap::new()),
            idle_timeout,
            max_sessions: max_sessions.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // The map is consistent after every statement; a panic elsewhere cannot tear it.
        self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts a session for `principal` and returns its token: 128 random bits from the
    /// operating system, as 32 hex digits (vCenter's tokens look the same).
    pub fn create(&self, principal: Principal, now: Now) -> String {
        let token = new_token();
        let mut sessions = self.lock();
        sessions.retain(|_, s| now.instant.saturating_duration_since(s.last_used) < self.idle_timeout);
        while sessions.len() >= self.max_sessions {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(token, _)| token.clone());
            match oldest {
                Some(token) => {
                    if let Some(s) = sessions.remove(&token) {
                        tracing::info!(user = %s.principal.user, "API session evicted: too many sessions");
                    }
                }
                None => break,
            }
        }
        sessions.insert(
            token.clone(),
            Session {
                principal,
                created: now.wall,
                last_accessed: now.wall,
                last_used: now.instant,
            },
        );
        token
    }

    /// The session of `token` if it is live, marked as used `now`; an expired session is
    /// removed and gives `None`, like an unknown token.
    pub fn touch(&self, token: &str, now: Now) -> Option<Session> {
        let mut sessions = self.lock();
        let session = sessions.get_mut(token)?;
        if now.instant.saturating_duration_since(session.last_used) >= self.idle_timeout {
            sessions.remove(token);
            return None;
        }
        session.last_used = session.last_used.max(now.instant);
        session.last_accessed = now.wall;
        Some(session.clone())
    }

    /// Ends a session; false if there was none.
    pub fn remove(&self, token: &str) -> bool {
        self.lock().remove(token).is_some()
    }

    /// Sessions held, expired ones included until they are next looked at.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// RFC 3339 in UTC with milliseconds, as vCenter writes times (`2024-05-01T10:00:00.123Z`).
pub fn rfc3339_millis(t: OffsetDateTime) -> String {
    // A fixed three-digit fraction: the well-known RFC 3339 formatter trims
    // trailing zeros (`.060` becomes `.06`), which clients parsing a fixed
    // width reject.
    const FORMAT: &[time::format_description::FormatItem<'_>] =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    t.to_offset(time::UtcOffset::UTC)
        .format(FORMAT)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_owned())
}

fn new_token() -> String {
    let mut bytes = [0u8; 16];
    // The OS generator failing means no safe token can be made; that is not recoverable.
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the operating system's random generator failed");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// User and password from an `Authorization: Basic ...` header value, or `None` if the
/// value is not one (other scheme, bad base64, no colon, not UTF-8).
pub fn basic_credentials(header: &str) -> Option<(String, String)> {
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    // The user name cannot hold a colon; the password can.
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;

    fn who(user: &str) -> Principal {
        Principal {
            user: user.into(),
            role: Role::ReadOnly,
        }
    }

    #[test]
    fn a_session_lives_while_used_and_expires_when_idle() {
        let store = SessionStore::new(Duration::from_secs(1800), 10);
        let t0 = Now::current();
        let token = store.create(who("a"), t0);
        assert_eq!(token.len(), 32);
        assert!(token.chars().all(|c| c.is_ascii_hexdigit()));

        // Used every 29 minutes for two hours: still alive, last access follows.
        let mut t = t0;
        for _ in 0..4 {
            t = t.plus(Duration::from_secs(29 * 60));
            let s = store.touch(&token, t).expect("alive");
            assert_eq!(s.created, t0.wall);
            assert_eq!(s.last_accessed, t.wall);
            assert_eq!(s.principal.user, "a");
        }
        // Then idle for exactly the timeout: gone, and gone for good.
        let late = t.plus(Duration::from_secs(1800));
        assert!(store.touch(&token, late).is_none());
        assert!(store.is_empty(), "an expired session is dropped when seen");
        assert!(store.touch(&token, t).is_none());
    }

    #[test]
    fn unknown_and_removed_tokens_are_refused() {
        let store = SessionStore::default();
        let now = Now::current();
        assert!(store.touch("00000000000000000000000000000000", now).is_none());
        let token = store.create(who("a"), now);
        let other = store.create(who("b"), now);
        assert_ne!(token, other);
        assert!(store.remove(&token));
        assert!(!store.remove(&token));
        assert!(store.touch(&token, now).is_none());
        assert_eq!(store.touch(&other, now).unwrap().principal.user, "b");
    }

    #[test]
    fn the_least_recently_used_session_makes_room() {
        let store = SessionStore::new(Duration::from_secs(60), 3);
        let t0 = Now::current();
        let a = store.create(who("a"), t0);
        let b = store.create(who("b"), t0.plus(Duration::from_secs(1)));
        let c = store.create(who("c"), t0.plus(Duration::from_secs(2)));
        // a is used again, so b is now the least recently used.
        store.touch(&a, t0.plus(Duration::from_secs(3))).unwrap();
        let d = store.create(who("d"), t0.plus(Duration::from_secs(4)));
        assert_eq!(store.len(), 3);
        let t = t0.plus(Duration::from_secs(5));
        assert!(store.touch(&b, t).is_none());
        for token in [&a, &c, &d] {
            assert!(store.touch(token, t).is_some());
        }
        // Expired sessions are swept at login before anyone live is evicted.
        let later = t.plus(Duration::from_secs(61));
        let e = store.create(who("e"), later);
        assert_eq!(store.len(), 1);
        assert!(store.touch(&e, later).is_some());
    }

    #[test]
    fn basic_credentials_are_parsed_strictly() {
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(
            basic_credentials(&format!("Basic {}", enc("migrator@cloud.local:VMware1!Cloud:x"))),
            Some(("migrator@cloud.local".into(), "VMware1!Cloud:x".into()))
        );
        assert_eq!(
            basic_credentials(&format!("basic  {}", enc("u:"))),
            Some(("u".into(), String::new()))
        );
        assert_eq!(basic_credentials(&format!("Bearer {}", enc("u:p"))), None);
        assert_eq!(basic_credentials(&format!("Basic {}", enc("no colon"))), None);
        assert_eq!(basic_credentials("Basic !!!"), None);
        assert_eq!(basic_credentials("Basic"), None);
    }

    #[test]
    fn times_are_utc_with_milliseconds() {
        // 2024-05-01T08:00:00.123456789Z, seen from UTC+2.
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_714_550_400_123_456_789)
            .unwrap()
            .to_offset(time::UtcOffset::from_hms(2, 0, 0).unwrap());
        assert_eq!(rfc3339_millis(t), "2024-05-01T08:00:00.123Z");
        // Trailing zeros of the fraction are kept: always three digits.
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_714_550_400_060_000_000).unwrap();
        assert_eq!(rfc3339_millis(t), "2024-05-01T08:00:00.060Z");
        let t = OffsetDateTime::from_unix_timestamp(1_714_550_400).unwrap();
        assert_eq!(rfc3339_millis(t), "2024-05-01T08:00:00.000Z");
    }
}
