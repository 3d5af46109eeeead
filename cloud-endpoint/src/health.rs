//! What the endpoint's probes report: whether the QUIC server listens, and whether the
//! endpoint is draining for a stop. The server sets it; the API's `/readyz` reads it
//! (with its own checks of the inventory and the datastores).

use std::sync::atomic::{AtomicU8, Ordering};

/// The migration port's state, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuicState {
    /// Not bound yet (the endpoint is starting), or stopped.
    NotListening,
    /// Accepting edges.
    Listening,
    /// A stop was asked for: new connections are refused while running migrations are
    /// brought to a resumable state.
    Draining,
}

/// Shared by the QUIC server (writer) and the API (reader).
#[derive(Debug, Default)]
pub struct Health {
    quic: AtomicU8,
}

impl Health {
    pub fn quic(&self) -> QuicState {
        match self.quic.load(Ordering::SeqCst) {
            1 => QuicState::Listening,
            2 => QuicState::Draining,
            _ => QuicState::NotListening,
        }
    }

    pub fn set_quic(&self, state: QuicState) {
        let value = match state {
            QuicState::NotListening => 0,
            QuicState::Listening => 1,
            QuicState::Draining => 2,
        };
        self.quic.store(value, Ordering::SeqCst);
    }

    /// Whether a stop was asked for.
    pub fn is_draining(&self) -> bool {
        self.quic() == QuicState::Draining
    }
}
