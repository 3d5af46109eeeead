//! Password hashes: argon2id with a random salt, stored as PHC strings.

use std::sync::{Condvar, Mutex, OnceLock, PoisonError};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use super::InventoryError;

/// Hashes `password` with argon2id (the crate's default parameters, OWASP's minimum:
/// 19 MiB, 2 passes) and a fresh random salt; returns the PHC string.
pub fn hash_password(password: &str) -> Result<String, InventoryError> {
    // argon2's own OsRng needs a feature we do not enable; rand gives the salt instead.
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| InventoryError::PasswordHash {
        user: String::new(),
        reason: e.to_string(),
    })?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| InventoryError::PasswordHash {
            user: String::new(),
            reason: e.to_string(),
        })
}

/// Password checks that may run at once. Each argon2id check fills its own 19 MiB block:
/// 32 edges connecting together (the default migration limit) took 608 MiB at once for
/// a moment, and a flood of logins (REST sessions, or Hellos of connections that have no
/// migration slot yet) had no bound at all. Further checks wait their turn; four keep
/// two cores busy and cost 76 MiB.
pub const MAX_CONCURRENT_CHECKS: usize = 4;

/// Running checks, and the signal that one ended.
static CHECKS: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

/// Runs `f` (a password check) once fewer than [`MAX_CONCURRENT_CHECKS`] others run.
pub(super) fn bounded<T>(f: impl FnOnce() -> T) -> T {
    struct Done;
    impl Drop for Done {
        fn drop(&mut self) {
            *CHECKS.0.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
            CHECKS.1.notify_one();
        }
    }
    let running = CHECKS.0.lock().unwrap_or_else(PoisonError::into_inner);
    let mut running = CHECKS
        .1
        .wait_while(running, |n| *n >= MAX_CONCURRENT_CHECKS)
        .unwrap_or_else(PoisonError::into_inner);
    *running += 1;
    drop(running);
    let _done = Done;
    f()
}

/// Whether `password` matches the PHC string `hash` (with the parameters the hash names).
/// An unparsable hash matches nothing. Call it inside [`bounded`].
pub(super) fn verify(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(e) => {
            tracing::error!(error = %e, "a stored password hash cannot be parsed; that user cannot log in");
            false
        }
    }
}

/// A hash of a random password, verified against when the user is unknown so that the
/// answer takes as long as for a known user.
pub(super) fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let random: [u8; 16] = rand::random();
        let password: String = random.iter().map(|b| format!("{b:02x}")).collect();
        hash_password(&password).unwrap_or_default()
    })
}
