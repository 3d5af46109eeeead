use std::net::{IpAddr, Ipv4Addr};

use super::*;

const ADMIN: &str = "administrator@cloud.local";

fn policy() -> Policy {
    Policy::from(&LoginSettings::default())
}

fn ip(last: u8) -> SourceKey {
    SourceKey::of(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)))
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn one_guessing_source_waits_longer_each_time_then_is_blocked_for_every_user() {
    let mut t = Throttle::new(policy());
    let t0 = Instant::now();
    let a = ip(1);
    assert_eq!(t.admit(ADMIN, a, t0), Ok(()));
    // A typo costs nothing.
    let f = t.failed(ADMIN, a, t0);
    assert_eq!(
        f,
        Failure {
            user_sources: 1,
            ..Failure::default()
        }
    );
    assert_eq!(t.admit(ADMIN, a, t0), Ok(()));
    // Then 1 s, 2 s, 4 s between tries.
    let mut now = t0;
    for delay in [1, 2, 4] {
        let f = t.failed(ADMIN, a, now);
        assert_eq!(f.source_waits, Some(now + secs(delay)));
        assert_eq!(
            t.admit(ADMIN, a, now),
            Err(Refusal::SourceDelayed {
                until: now + secs(delay)
            })
        );
        assert_eq!(
            t.admit("migrator@cloud.local", a, now),
            Err(Refusal::SourceDelayed {
                until: now + secs(delay)
            }),
            "the delay holds for every user"
        );
        // Another source is not held up.
        assert_eq!(t.admit(ADMIN, ip(2), now), Ok(()));
        now += secs(delay);
        assert_eq!(t.admit(ADMIN, a, now), Ok(()));
    }
    // The fifth failure blocks the source for the unlock time, for every user; the user
    // is not locked out: one source alone never locks a user.
    let f = t.failed(ADMIN, a, now);
    assert_eq!(f.source_blocked, Some(now + secs(300)));
    assert_eq!(f.user_locked, None);
    for user in [ADMIN, "migrator@cloud.local", "nobody"] {
        assert_eq!(
            t.admit(user, a, now + secs(299)),
            Err(Refusal::SourceBlocked { until: now + secs(300) })
        );
    }
    assert_eq!(t.admit(ADMIN, ip(2), now), Ok(()));
    assert_eq!(t.blocked_sources(now), [(a, now + secs(300))]);
    assert!(t.locked_users(now).is_empty());
    // Served: a fresh start, one free failure again.
    let later = now + secs(300);
    assert_eq!(t.admit(ADMIN, a, later), Ok(()));
    assert_eq!(t.failed(ADMIN, a, later).source_waits, None);
    assert!(t.blocked_sources(later).is_empty());
}

#[test]
fn failures_from_five_sources_lock_the_user_out_also_for_the_right_password() {
    let mut t = Throttle::new(policy());
    let t0 = Instant::now();
    for n in 1..=4 {
        let f = t.failed(ADMIN, ip(n), t0 + secs(u64::from(n)));
        assert_eq!((f.user_sources, f.user_locked), (usize::from(n), None));
    }
    // The same source again does not count twice.
    assert_eq!(t.failed(ADMIN, ip(4), t0 + secs(5)).user_sources, 4);
    let f = t.failed(ADMIN, ip(5), t0 + secs(6));
    let until = t0 + secs(306);
    assert_eq!(f.user_locked, Some(until));
    // Locked for everyone, a fresh source included; other users are not.
    assert_eq!(t.admit(ADMIN, ip(99), t0 + secs(7)), Err(Refusal::UserLocked { until }));
    assert_eq!(t.admit("migrator@cloud.local", ip(99), t0 + secs(7)), Ok(()));
    assert_eq!(t.locked_users(t0 + secs(7)), [(ADMIN.to_owned(), until)]);
    // A check that was under way when the lockout began must not say the password was
    // right.
    assert_eq!(t.succeeded(ADMIN, t0 + secs(8)), Err(Refusal::UserLocked { until }));
    // After the unlock time the user logs in again.
    assert_eq!(t.admit(ADMIN, ip(99), until), Ok(()));
    assert_eq!(t.succeeded(ADMIN, until), Ok(()));
    assert!(t.locked_users(until).is_empty());
}

#[test]
fn failures_older_than_the_interval_and_a_successful_login_are_forgotten() {
    let mut t = Throttle::new(policy());
    let t0 = Instant::now();
    for n in 1..=4 {
        t.failed(ADMIN, ip(n), t0);
    }
    // 180 s later those four no longer count.
    assert_eq!(t.failed(ADMIN, ip(5), t0 + secs(180)).user_sources, 1);
    for n in 1..=3 {
        t.failed(ADMIN, ip(n), t0 + secs(181));
    }
    assert_eq!(t.succeeded(ADMIN, t0 + secs(182)), Ok(()));
    assert_eq!(
        t.failed(ADMIN, ip(4), t0 + secs(183)).user_sources,
        1,
        "a login resets the user's count"
    );
    // A source's own record survives its login as another user.
    let a = ip(7);
    t.failed("mallory@cloud.local", a, t0);
    t.failed("mallory@cloud.local", a, t0);
    assert_eq!(t.succeeded("mallory@cloud.local", t0), Ok(()));
    assert_eq!(
        t.admit(ADMIN, a, t0),
        Err(Refusal::SourceDelayed { until: t0 + secs(1) })
    );
}

#[test]
fn unknown_users_lock_like_known_ones_and_names_are_taken_exactly() {
    let mut t = Throttle::new(policy());
    let t0 = Instant::now();
    for n in 1..=5 {
        t.failed("ghost@cloud.local", ip(n), t0);
    }
    assert!(matches!(
        t.admit("ghost@cloud.local", ip(9), t0),
        Err(Refusal::UserLocked { .. })
    ));
    // The inventory matches names exactly: so does the lockout.
    assert_eq!(t.admit("Ghost@cloud.local", ip(9), t0), Ok(()));
    assert_eq!(t.admit("ghost@cloud.other", ip(9), t0), Ok(()));
    // Huge names share an entry of bounded size.
    let long = "x".repeat(10_000);
    t.failed(&long, ip(1), t0);
    assert!(t.users.keys().all(|k| k.len() <= MAX_USER_KEY));
}

#[test]
fn ipv6_sources_count_per_64_and_mapped_ipv4_as_ipv4() {
    let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
    let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
    let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
    assert_eq!(SourceKey::of(a), SourceKey::of(b));
    assert_ne!(SourceKey::of(a), SourceKey::of(c));
    assert_eq!(SourceKey::of(a).to_string(), "2001:db8:1:2::/64");
    let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
    assert_eq!(SourceKey::of(mapped), ip(1));
    assert_eq!(ip(1).to_string(), "192.0.2.1");
}

#[test]
fn the_tables_stay_bounded_and_forget_the_least_useful_first() {
    let mut p = policy();
    p.max_tracked = 3;
    let mut t = Throttle::new(p);
    let t0 = Instant::now();
    // A blocked source and a locked user survive a flood of new names and addresses.
    let blocked = ip(200);
    for _ in 0..5 {
        t.failed(ADMIN, blocked, t0);
    }
    let mut q = Throttle::new(t.policy().clone());
    for n in 1..=5 {
        q.failed(ADMIN, ip(n), t0);
    }
    for n in 0..100u8 {
        let now = t0 + secs(1);
        t.failed(&format!("user{n}"), ip(n), now);
        q.failed(&format!("user{n}"), ip(100 + n), now);
        assert!(t.tracked().0 <= 3 && t.tracked().1 <= 3, "{:?}", t.tracked());
    }
    let now = t0 + secs(2);
    assert!(matches!(t.admit("x", blocked, now), Err(Refusal::SourceBlocked { .. })));
    assert!(matches!(q.admit(ADMIN, ip(250), now), Err(Refusal::UserLocked { .. })));
    // Entries that mean nothing any more go first, whatever their number.
    let late = t0 + secs(1000);
    t.failed("new", ip(201), late);
    assert_eq!(t.tracked(), (1, 1));
}
