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

use super::error::ApiError;
use crate::config::ApiSettings;

/// How soon a login refused for want of session slots is told to try again.
const RETRY_WHEN_FULL: Duration = Duration::from_secs(60);

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
    started: Instant,
    last_used: Instant,
}

impl Session {
    /// Whether the session has ended by `now`: unused for `idle`, or older than `lifetime`.
    fn ended(&self, now: Instant, idle: Duration, lifetime: Duration) -> bool {
        now.saturating_duration_since(self.last_used) >= idle || now.saturating_duration_since(self.started) >= lifetime
    }
}

/// The sessions of one API server.
///
/// Bounds: at most `max_sessions` in all and `max_per_user` per user. A user at its own
/// limit loses its own least recently used session to a new login (a script that logs in
/// per request and never logs out keeps working); a login when every slot is taken is
/// refused. No login ever ends another user's session: otherwise any user, a ReadOnly one
/// included, could log every administrator out by logging in often enough.
#[derive(Debug)]
pub struct SessionStore {
    sessions: Mutex<HashMap<String, Session>>,
    idle_timeout: Duration,
    max_lifetime: Duration,
    max_sessions: usize,
    max_per_user: usize,
}

impl Default for SessionStore {
    fn default() -> Self {
        SessionStore::new(&ApiSettings::default())
    }
}

impl SessionStore {
    /// A store with the session bounds of `settings` (each at least 1).
    pub fn new(settings: &ApiSettings) -> SessionStore {
        SessionStore {
            sessions: Mutex::new(HashMap::new()),
            idle_timeout: settings.session_idle_timeout(),
            max_lifetime: settings.session_max_lifetime(),
            max_sessions: (settings.max_sessions as usize).max(1),
            max_per_user: (settings.max_sessions_per_user as usize).max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // The map is consistent after every statement; a panic elsewhere cannot tear it.
        self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts a session for `principal` and returns its token: 128 random bits from the
    /// operating system, as 32 hex digits (vCenter's tokens look the same). At the user's
    /// own limit its least recently used session ends; when every slot is taken by live
    /// sessions, the login is refused (SERVICE_UNAVAILABLE, try again later).
    pub fn create(&self, principal: Principal, now: Now) -> Result<String, ApiError> {
        let token = new_token();
        let mut sessions = self.lock();
        sessions.retain(|_, s| !s.ended(now.instant, self.idle_timeout, self.max_lifetime));
        let (held, oldest) = sessions
            .iter()
            .filter(|(_, s)| s.principal.user == principal.user)
            .fold((0usize, None::<(&String, Instant)>), |(n, oldest), (token, s)| {
                let older = oldest.is_none_or(|(_, t)| s.last_used < t);
                (n + 1, if older { Some((token, s.last_used)) } else { oldest })
            });
        if held >= self.max_per_user {
            if let Some(token) = oldest.map(|(token, _)| token.clone()) {
                sessions.remove(&token);
                tracing::info!(
                    user = ?principal.user,
                    limit = self.max_per_user,
                    "API session ended: the user logged in again at its session limit; its least recently used session made room"
                );
            }
        } else if sessions.len() >= self.max_sessions {
            drop(sessions);
            tracing::warn!(user = ?principal.user, limit = self.max_sessions, "API login refused: every session slot is taken");
            return Err(ApiError::busy(
                format!(
                    "the endpoint holds its limit of {} sessions; log out sessions no longer used \
                     (DELETE /api/session) or try again later",
                    self.max_sessions
                ),
                RETRY_WHEN_FULL,
            ));
        }
        sessions.insert(
            token.clone(),
            Session {
                principal,
                created: now.wall,
                last_accessed: now.wall,
                started: now.instant,
                last_used: now.instant,
            },
        );
        Ok(token)
    }

    /// The session of `token` if it is live, marked as used `now`; an ended session (idle
    /// too long, or past its lifetime) is removed and gives `None`, like an unknown token.
    pub fn touch(&self, token: &str, now: Now) -> Option<Session> {
        let mut sessions = self.lock();
        let session = sessions.get_mut(token)?;
        if session.ended(now.instant, self.idle_timeout, self.max_lifetime) {
            sessions.remove(token);
            return None;
        }
        session.last_used = session.last_used.max(now.instant);
        session.last_accessed = now.wall;
        Some(session.clone())
    }

    /// Whether `token` is a live session at `now`, without marking it used.
    pub fn is_live(&self, token: &str, now: Now) -> bool {
        self.lock()
            .get(token)
            .is_some_and(|s| !s.ended(now.instant, self.idle_timeout, self.max_lifetime))
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

    fn store(idle_secs: u64, lifetime_secs: u64, max: u32, per_user: u32) -> SessionStore {
        SessionStore::new(&ApiSettings {
            session_idle_timeout_secs: idle_secs,
            session_max_lifetime_secs: lifetime_secs,
            max_sessions: max,
            max_sessions_per_user: per_user,
            ..ApiSettings::default()
        })
    }

    fn who(user: &str) -> Principal {
        Principal {
            user: user.into(),
            role: Role::ReadOnly,
        }
    }

    #[test]
    fn a_session_lives_while_used_and_expires_when_idle() {
        let store = store(1800, 24 * 3600, 10, 10);
        let t0 = Now::current();
        let token = store.create(who("a"), t0).unwrap();
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
        let token = store.create(who("a"), now).unwrap();
        let other = store.create(who("b"), now).unwrap();
        assert_ne!(token, other);
        assert!(store.remove(&token));
        assert!(!store.remove(&token));
        assert!(store.touch(&token, now).is_none());
        assert_eq!(store.touch(&other, now).unwrap().principal.user, "b");
    }

    #[test]
    fn a_session_ends_at_its_lifetime_however_often_it_is_used() {
        let store = store(60, 3600, 10, 10);
        let t0 = Now::current();
        let token = store.create(who("a"), t0).unwrap();
        let mut t = t0;
        for _ in 0..59 {
            t = t.plus(Duration::from_secs(59));
            assert!(store.touch(&token, t).is_some(), "used every 59 s: alive");
        }
        // 59 x 59 s = 58 min 1 s; the hour ends the session however busy it is.
        assert!(store.touch(&token, t0.plus(Duration::from_secs(3600))).is_none());
        assert!(store.is_empty());
    }

    #[test]
    fn a_user_at_its_limit_loses_its_own_oldest_session_and_no_one_elses() {
        let store = store(10_000, 20_000, 5, 3);
        let t0 = Now::current();
        let at = |s: u64| t0.plus(Duration::from_secs(s));
        let admin = store.create(who("admin"), at(0)).unwrap();
        let a1 = store.create(who("a"), at(1)).unwrap();
        let a2 = store.create(who("a"), at(2)).unwrap();
        let a3 = store.create(who("a"), at(3)).unwrap();
        // a1 is used again: a2 is now a's least recently used session.
        store.touch(&a1, at(4)).unwrap();
        // "a" logs in many more times: only its own sessions make room.
        let mut last = String::new();
        for i in 0..1000 {
            last = store.create(who("a"), at(5 + i)).unwrap();
        }
        assert_eq!(store.len(), 4, "admin's one and a's three");
        assert!(store.touch(&admin, at(2000)).is_some(), "another user's session stays");
        assert!(store.touch(&last, at(2000)).is_some());
        for gone in [&a1, &a2, &a3] {
            assert!(store.touch(gone, at(2000)).is_none());
        }
    }

    #[test]
    fn a_login_is_refused_when_every_slot_is_taken_by_live_sessions() {
        let store = store(60, 3600, 3, 2);
        let t0 = Now::current();
        let kept: Vec<String> = ["a", "b", "c"]
            .iter()
            .map(|u| store.create(who(u), t0).unwrap())
            .collect();
        let refused = store.create(who("d"), t0.plus(Duration::from_secs(1))).unwrap_err();
        assert_eq!(refused.kind, crate::api::error::ErrorKind::ServiceUnavailable);
        assert!(refused.message.contains("limit of 3 sessions"), "{}", refused.message);
        assert!(refused.retry_after.is_some());
        for token in &kept {
            assert!(store.touch(token, t0.plus(Duration::from_secs(2))).is_some());
        }
        // Ended sessions are swept at login before anyone is refused.
        let later = t0.plus(Duration::from_secs(120));
        let d = store.create(who("d"), later).unwrap();
        assert_eq!(store.len(), 1);
        assert!(store.touch(&d, later).is_some());
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
