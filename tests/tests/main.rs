//! The end-to-end tests, one module per file of this folder, built as ONE test
//! executable: each file as its own executable linked the whole workspace again, and
//! those 36 links were most of CI's build. Run one file's tests with its module name as
//! the filter: `tests/run.sh resume::` (or `-E 'test(/^resume::/)'`).
//!
//! A new file here needs its `mod` line below (Cargo.toml sets `autotests = false`).

mod api;
mod api_bounds;
mod authz;
mod caps;
mod commit;
mod containers;
mod damaged;
mod dashboard;
mod failover;
mod faults;
mod firewall;
mod first_run;
mod formats;
mod hardening;
mod hardware;
mod hostile;
mod lift;
mod link_test;
mod live;
mod load;
mod logins;
mod metrics;
mod placement;
mod power;
mod preflight;
mod receipt;
mod replication;
mod replication_qemu;
mod replication_snapshots;
mod rest;
mod resume;
mod scale_out;
mod seed;
mod soap;
mod sources;
mod switchover;
mod switchover_api;
mod switchover_window;
mod test_boot;
mod trust;
mod vapi;
mod wan;
