//! The gate over a real inventory (argon2 and all): what runs a hash and what does not.

use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::config::{DomainConfig, DEMO_PASSWORD};

const ADMIN: &str = "administrator@cloud.local";
const MIGRATOR: &str = "migrator@cloud.local";

fn addr(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, last))
}

fn inventory(dir: &tempfile::TempDir) -> Inventory {
    Inventory::open(&dir.path().join("inventory.sqlite3"), &DomainConfig::default()).unwrap()
}

#[test]
fn a_guessing_address_is_refused_without_hashing_and_others_log_in() {
    let dir = tempfile::tempdir().unwrap();
    let inv = inventory(&dir);
    let logins = Logins::new(&LoginSettings {
        source_max_failed_attempts: 3,
        source_delay_ms: 0,
        ..LoginSettings::default()
    });
    let mut answers = Vec::new();
    for _ in 0..20 {
        answers.push(logins.authenticate(&inv, ADMIN, "guess", addr(1), "test").unwrap_err());
    }
    assert!(answers[..3]
        .iter()
        .all(|e| matches!(e, LoginError::BadCredentials { hold } if hold.is_zero())));
    for e in &answers[3..] {
        assert!(matches!(e, LoginError::SourceBlocked { .. }), "{e}");
        let text = e.to_string();
        assert!(text.contains("198.51.100.1") && text.contains("until") && text.ends_with("with the right password"));
    }
    // The right password from there is refused too, and says nothing about the password.
    let blocked = logins
        .authenticate(&inv, ADMIN, DEMO_PASSWORD, addr(1), "test")
        .unwrap_err();
    assert_eq!(blocked.to_string(), answers[19].to_string());
    // Another address logs in as the same user: one address never locks a user out.
    assert_eq!(
        logins
            .authenticate(&inv, ADMIN, DEMO_PASSWORD, addr(2), "test")
            .unwrap()
            .user,
        ADMIN
    );

    let stats = logins.stats();
    assert_eq!(
        stats.password_checks, 4,
        "3 wrong + 1 right; the 18 refusals cost no hash"
    );
    assert_eq!(
        (stats.failed_logins, stats.refused_logins, stats.successful_logins),
        (3, 18, 1)
    );
    assert_eq!((stats.source_blocks, stats.lockouts), (1, 0));
    assert_eq!(stats.blocked_sources.len(), 1);
    assert_eq!(stats.blocked_sources[0].name, "198.51.100.1");
    assert!(stats.locked_users.is_empty());
}

#[test]
fn a_user_failed_from_several_addresses_is_locked_even_for_the_right_password() {
    let dir = tempfile::tempdir().unwrap();
    let inv = inventory(&dir);
    let logins = Logins::new(&LoginSettings {
        max_failed_attempts: 3,
        ..LoginSettings::default()
    });
    for n in 1..=3 {
        let e = logins
            .authenticate(&inv, MIGRATOR, "guess", addr(n), "test")
            .unwrap_err();
        assert!(matches!(e, LoginError::BadCredentials { .. }), "{e}");
    }
    let locked = logins
        .authenticate(&inv, MIGRATOR, DEMO_PASSWORD, addr(9), "test")
        .unwrap_err();
    let text = locked.to_string();
    assert!(matches!(locked, LoginError::Locked { .. }), "{text}");
    assert!(
        text.starts_with("the account \"migrator@cloud.local\" is locked") && text.contains(" until 20"),
        "{text}"
    );
    assert!(locked.is_refusal());
    assert_eq!(refusal(&locked).0, gateway::wire::RefusalCode::BadCredentials);
    // Other users are not locked out.
    assert!(logins.authenticate(&inv, ADMIN, DEMO_PASSWORD, addr(9), "test").is_ok());
    let stats = logins.stats();
    assert_eq!((stats.lockouts, stats.password_checks), (1, 4));
    assert_eq!(stats.locked_users.len(), 1);
    assert_eq!(stats.locked_users[0].name, MIGRATOR);
}

#[test]
fn a_retrying_client_is_slowed_down_and_a_parallel_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let inv = inventory(&dir);
    let logins = Logins::new(&LoginSettings {
        source_delay_ms: 300,
        ..LoginSettings::default()
    });
    let hold = |e: LoginError| match e {
        LoginError::BadCredentials { hold } => hold,
        other => panic!("expected bad credentials, got {other}"),
    };
    let first = logins.authenticate(&inv, ADMIN, "guess", addr(1), "test").unwrap_err();
    assert_eq!(hold(first), Duration::ZERO, "a typo is answered at once");
    let second = hold(logins.authenticate(&inv, ADMIN, "guess", addr(1), "test").unwrap_err());
    assert!(
        second > Duration::from_millis(200) && second <= Duration::from_millis(300),
        "{second:?}"
    );
    // A try before the hold is over (a parallel guesser) costs no hash.
    let early = logins
        .authenticate(&inv, ADMIN, DEMO_PASSWORD, addr(1), "test")
        .unwrap_err();
    assert!(matches!(early, LoginError::SourceDelayed { .. }), "{early}");
    assert!(early
        .to_string()
        .contains("the next try from this address is accepted from 20"));
    assert_eq!(logins.stats().password_checks, 2);
    // One that waited for its answer is heard, and the next hold is twice as long.
    std::thread::sleep(second);
    let third = hold(logins.authenticate(&inv, ADMIN, "guess", addr(1), "test").unwrap_err());
    assert!(
        third > Duration::from_millis(500) && third <= Duration::from_millis(600),
        "{third:?}"
    );
    std::thread::sleep(third);
    assert_eq!(
        logins
            .authenticate(&inv, ADMIN, DEMO_PASSWORD, addr(1), "test")
            .unwrap()
            .user,
        ADMIN
    );
}

#[test]
fn a_name_logs_in_whatever_its_case_and_is_locked_out_whatever_its_case() {
    let dir = tempfile::tempdir().unwrap();
    let inv = inventory(&dir);
    let logins = Logins::new(&LoginSettings {
        max_failed_attempts: 3,
        ..LoginSettings::default()
    });
    // The session's user is the configured name, not the typed one.
    for typed in ["administrator@CLOUD.LOCAL", "Administrator@Cloud.Local", ADMIN] {
        let principal = logins
            .authenticate(&inv, typed, DEMO_PASSWORD, addr(1), "test")
            .unwrap();
        assert_eq!(principal.user, ADMIN, "{typed}");
    }
    // Failures under three spellings are three failures of one user.
    for (n, typed) in [(1, "MIGRATOR@cloud.local"), (2, "migrator@CLOUD.local"), (3, MIGRATOR)] {
        let e = logins.authenticate(&inv, typed, "guess", addr(n), "test").unwrap_err();
        assert!(matches!(e, LoginError::BadCredentials { .. }), "{e}");
    }
    for typed in [MIGRATOR, "Migrator@Cloud.Local"] {
        let e = logins
            .authenticate(&inv, typed, DEMO_PASSWORD, addr(9), "test")
            .unwrap_err();
        assert!(matches!(e, LoginError::Locked { .. }), "{typed}: {e}");
    }
    assert_eq!(logins.stats().locked_users.len(), 1);
}
