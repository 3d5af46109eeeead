//! How a migration moves between the endpoints of a target (several endpoints of one
//! domain, issue 18): which endpoint the next connection goes to, how long a resume
//! refused as busy is waited for, and what the operator is told meanwhile. The
//! connections themselves are [`crate::target`]'s; the retry loop is
//! [`crate::migrate`]'s.

use std::time::Duration;

use crate::target::Target;
use crate::MigrateError;

/// Which endpoint of a target a migration's next connection goes to. It stays with the
/// endpoint it reached while that one serves it; once the connection is lost (or the
/// endpoint answers busy) it moves on to the next in the list, round robin, so that a
/// dead endpoint is left and a busy one is asked again only after the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    count: usize,
    next: usize,
    reached: Option<usize>,
}

impl Rotation {
    /// For a target of `count` endpoints, starting at the first.
    pub fn new(count: usize) -> Rotation {
        Rotation {
            count: count.max(1),
            next: 0,
            reached: None,
        }
    }

    /// Where the next connection starts.
    pub fn next(&self) -> usize {
        self.next
    }

    /// A connection is being made: where it starts. Until it reaches an endpoint,
    /// none is [`Rotation::reached`].
    pub fn start(&mut self) -> usize {
        self.reached = None;
        self.next
    }

    /// The endpoint the last connection reached, if one did.
    pub fn reached(&self) -> Option<usize> {
        self.reached
    }

    /// A connection reached endpoint `index`: the next one starts there too, unless
    /// [`Rotation::move_on`] is called.
    pub fn connected(&mut self, index: usize) {
        let index = index % self.count;
        self.reached = Some(index);
        self.next = index;
    }

    /// The endpoint the last connection reached was lost (or was busy): the next
    /// connection starts at the one after it. Returns (from, to) when that is another
    /// endpoint; `None` for a target of one, or when no connection was made (every
    /// endpoint was tried already).
    pub fn move_on(&mut self) -> Option<(usize, usize)> {
        let from = self.reached.take()?;
        self.next = (from + 1) % self.count;
        (self.next != from).then_some((from, self.next))
    }
}

/// How long an edge keeps resuming a migration that endpoints refuse as busy, whatever
/// `--retry-for` says: an endpoint that takes over a migration from a lost one refuses
/// its resume until the lost endpoint's lease on it expired (up to about two lease
/// periods, 20 s with the default 10 s lease), and a restarted endpoint closes a
/// migration's previous connection first.
pub const BUSY_RESUME_PATIENCE: Duration = Duration::from_secs(60);

/// The longest wait between two resumes refused as busy: the migration is released at a
/// moment the edge cannot know, and a refused resume costs the endpoint one login.
pub const BUSY_POLL: Duration = Duration::from_secs(2);

/// Where the next attempt goes and when, for the operator.
pub fn next_attempt(target: &Target, moved: Option<(usize, usize)>, next: usize, wait: Duration) -> String {
    let secs = wait.as_secs_f64();
    match moved {
        Some((_, to)) => format!("trying endpoint {} in {secs:.0} s", target.addr(to)),
        None if target.endpoints.len() > 1 => {
            format!("trying endpoint {} and the others in {secs:.0} s", target.addr(next))
        }
        None => format!("trying again in {secs:.0} s"),
    }
}

/// What the operator is told while a migration waits to resume: which endpoint was
/// lost or refused it, which one it waits for, and `then`, where it goes next.
pub fn waiting_for(
    target: &Target,
    id: &str,
    e: &MigrateError,
    reached: Option<usize>,
    holder: Option<usize>,
    progressed: bool,
    then: &str,
) -> String {
    match (e, reached) {
        (MigrateError::Refused { problems, .. }, Some(at)) => {
            let why = problems.join("; ");
            let at_addr = target.addr(at);
            match holder.filter(|&h| h != at) {
                _ if progressed => format!("endpoint {at_addr} stopped serving migration {id} ({why}); {then}"),
                Some(owner) => format!(
                    "waiting for endpoint {} to release migration {id}: endpoint {at_addr} refused to resume it yet ({why}); {then}",
                    target.addr(owner)
                ),
                None => format!(
                    "waiting for migration {id} to be released: endpoint {at_addr} refused to resume it yet ({why}); {then}"
                ),
            }
        }
        (e, Some(at)) => format!(
            "lost endpoint {} ({e}); resuming migration {id}, {then}",
            target.addr(at)
        ),
        (e, None) => format!("cannot reach the cloud endpoint ({e}); resuming migration {id}, {then}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Endpoint;
    use gateway::transport::{Identity, ServerTrust};
    use gateway::wire::RefusalCode;

    #[test]
    fn a_lost_endpoint_hands_over_to_the_next_round_robin() {
        let mut r = Rotation::new(3);
        assert_eq!(r.start(), 0);
        // A connection that reaches no endpoint (all were tried) leaves the order.
        assert_eq!(r.move_on(), None);
        assert_eq!(r.start(), 0);
        // The first endpoint that answered was the second: it is kept while it serves.
        r.connected(1);
        assert_eq!(r.reached(), Some(1));
        assert_eq!(r.start(), 1);
        assert_eq!(r.reached(), None);
        r.connected(1);
        assert_eq!(r.move_on(), Some((1, 2)));
        assert_eq!(r.start(), 2);
        r.connected(2);
        assert_eq!(r.move_on(), Some((2, 0)));
        let at = r.start();
        r.connected(at);
        assert_eq!(r.move_on(), Some((0, 1)));
        // One endpoint: nowhere else to go.
        let mut one = Rotation::new(1);
        let at = one.start();
        one.connected(at);
        assert_eq!(one.move_on(), None);
        assert_eq!(one.start(), 0);
    }

    fn two() -> Target {
        let ca = certs::Ca::generate("test CA").unwrap();
        let edge = ca.issue_edge("edge", certs::Validity::days(1)).unwrap();
        Target {
            endpoints: ["10.0.0.1:4433", "10.0.0.2:4433"]
                .iter()
                .map(|a| Endpoint::new(a.parse().unwrap(), "gw"))
                .collect(),
            names: Vec::new(),
            user: String::new(),
            password: String::new(),
            trust: ServerTrust::Ca(vec![ca.cert_der()]),
            identity: Identity {
                chain: vec![edge.cert_der()],
                key: edge.key_der(),
            },
        }
    }

    #[test]
    fn the_operator_is_told_which_endpoint_is_waited_for_and_where_it_goes() {
        let t = two();
        let busy = MigrateError::Refused {
            code: RefusalCode::Busy,
            problems: vec!["its lease runs".into()],
        };
        let then = next_attempt(&t, Some((1, 0)), 0, Duration::from_secs(2));
        assert_eq!(then, "trying endpoint 10.0.0.1:4433 in 2 s");
        // Lost the first, the second refuses the resume while the first holds it.
        let said = waiting_for(&t, "migration-7", &busy, Some(1), Some(0), false, &then);
        assert_eq!(
            said,
            "waiting for endpoint 10.0.0.1:4433 to release migration migration-7: endpoint 10.0.0.2:4433 \
             refused to resume it yet (its lease runs); trying endpoint 10.0.0.1:4433 in 2 s"
        );
        // The endpoint that served it closes it as busy (it drains).
        let said = waiting_for(&t, "migration-7", &busy, Some(0), Some(0), true, "x");
        assert!(
            said.starts_with("endpoint 10.0.0.1:4433 stopped serving migration migration-7"),
            "{said}"
        );
        // A lost link names the endpoint lost.
        let lost = MigrateError::Protocol(gateway::protocol::ProtocolError::TimedOut("acks"));
        let said = waiting_for(
            &t,
            "migration-7",
            &lost,
            Some(0),
            Some(0),
            true,
            "trying endpoint 10.0.0.2:4433 in 1 s",
        );
        assert!(said.starts_with("lost endpoint 10.0.0.1:4433 ("), "{said}");
        assert!(
            said.ends_with("resuming migration migration-7, trying endpoint 10.0.0.2:4433 in 1 s"),
            "{said}"
        );
        // Nothing answered: every endpoint is tried again.
        assert_eq!(
            next_attempt(&t, None, 1, Duration::from_secs(4)),
            "trying endpoint 10.0.0.2:4433 and the others in 4 s"
        );
    }
}
