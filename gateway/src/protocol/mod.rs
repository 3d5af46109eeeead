//! The migration protocol as two state machines with no I/O: the edge agent's
//! [`SenderSession`] and the cloud endpoint's [`ReceiverSession`].
//!
//! Like quinn-proto, a session takes input through `handle_*` methods (with the
//! current time passed in) and gives output through `poll_*` methods: control
//! messages to transmit and events for its driver. Disk reads and writes,
//! compression, the network and the database all stay in the drivers, which
//! report back (`chunk_sent`, `chunk_written`, `authenticated`, ...). The same
//! sessions therefore run over QUIC in production and against each other in
//! memory in the tests below.
//!
//! A migration on the control stream:
//! ```text
//! edge                                   cloud
//! Hello{user,password}          ->
//! Plan (without waiting)        ->       (held until the credential is checked)
//!                               <-       Welcome | Refused(BadCredentials)
//!                               <-       PlanAccepted | Refused(PlanRejected, [problems])
//! (chunks on data streams)      =>
//! ZeroChunks{runs}              ->
//!                               <-       Acks / Nack (resend)
//! DiskSealed{root, frames} per disk ->  (as its last chunk is sent: held until that
//!                                        many frames are durable, then checked)
//! Commit                        ->       (held behind a held seal)
//!                                        (the cloud reads its staged disks back)
//!                               <-       Repair{chunks found damaged}: resend, re-seal, commit again
//!                               <-       Committed{vm id, signed receipt} | Refused(...)
//! ```
//! A delta pass of a replication that ends with the switchover says so in its `Sync`:
//! the cloud reads back the replica it holds while the pass streams
//! ([`ReceiverEvent::VerifyEarly`]), and at the switchover only what the pass wrote and
//! what was not found intact then.
//!
//! Chunk writes are idempotent (a chunk is its disk, offset and hash), so a
//! duplicate is acknowledged again and never written twice.

pub mod live;
mod receiver;
mod sender;

#[cfg(test)]
mod tests;

pub use receiver::{Admission, ReceiverConfig, ReceiverEvent, ReceiverSession, Registered, Unsynced, VerifyScope};
pub use sender::{DoneChunk, SenderConfig, SenderEvent, SenderSession, Work};

use crate::wire::{RefusalCode, WireError};

/// A migration could not go on. Carries the refusal code the peer sees (or
/// saw) and a message that says what happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("{message} is not expected while {phase}")]
    Unexpected { message: &'static str, phase: &'static str },
    #[error("chunk outside the plan: {0}")]
    OutsidePlan(String),
    #[error("integrity check failed: {0}")]
    Integrity(String),
    #[error("the cloud endpoint refused ({code:?}): {}", problems.join("; "))]
    Refused { code: RefusalCode, problems: Vec<String> },
    #[error("timed out {0}")]
    TimedOut(&'static str),
    #[error("migration aborted: {0}")]
    Aborted(String),
}

impl ProtocolError {
    /// The code the connection closes with.
    pub fn code(&self) -> RefusalCode {
        match self {
            ProtocolError::Wire(_)
            | ProtocolError::Unexpected { .. }
            | ProtocolError::OutsidePlan(_)
            | ProtocolError::TimedOut(_) => RefusalCode::ProtocolViolation,
            ProtocolError::Integrity(_) => RefusalCode::IntegrityFailure,
            ProtocolError::Refused { code, .. } => *code,
            ProtocolError::Aborted(_) => RefusalCode::Aborted,
        }
    }
}
