//! A domain served by several endpoints on one shared database (PostgreSQL): which
//! endpoint owns which migration. See `docs/scale-out.md`.

pub mod lease;
pub mod ownership;
