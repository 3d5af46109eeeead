#![forbid(unsafe_code)]
//! PKI for the migration gateway.
//!
//! The cloud endpoint and the edge agents authenticate each other with mutual TLS over QUIC.
//! This crate makes the certificates for that: one private CA (the trust anchor of both
//! sides), a server certificate per cloud endpoint and a client certificate per edge agent.
//! It also computes SHA-256 thumbprints in the form vSphere shows them, so an operator can
//! compare a certificate with what a console displays.

mod ca;
mod pem;
mod thumbprint;

use std::io;
use std::path::PathBuf;

pub use ca::{Ca, Issued, Validity};
pub use pem::{load_certs, load_key, thumbprint_of_pem_file};
pub use thumbprint::Thumbprint;

/// Everything that can go wrong while making, loading or storing certificates.
///
/// Each message says what was wrong and what to do about it, and names the file involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {what} {}: {source}; {hint}", path.display())]
    Read {
        /// What the file should hold, e.g. "CA certificate".
        what: &'static str,
        path: PathBuf,
        /// What the user can do, e.g. which command creates the file.
        hint: &'static str,
        #[source]
        source: io::Error,
    },

    /// A file or directory could not be written.
    #[error(
        "cannot write {}: {source}; check that the directory is writable or choose another --out",
        path.display()
    )]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A file is not valid PEM.
    #[error("cannot parse PEM in {}: {source}; pass a PEM file (-----BEGIN ...-----)", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A PEM file holds no certificate.
    #[error(
        "{} holds no certificate; pass a PEM file with a -----BEGIN CERTIFICATE----- block",
        path.display()
    )]
    NoCertificate { path: PathBuf },

    /// A PEM file holds no private key.
    #[error(
        "{} holds no private key; pass a PKCS#8, PKCS#1 or SEC1 PEM key file (-----BEGIN ... PRIVATE KEY-----)",
        path.display()
    )]
    NoKey { path: PathBuf },

    /// A CA certificate and key cannot be used to sign.
    #[error(
        "invalid CA in {origin}: {reason}; pass the right --ca directory or create a CA with `certs ca --out DIR`"
    )]
    InvalidCa {
        /// Where the CA came from: a directory or "PEM input".
        origin: String,
        reason: String,
    },

    /// An endpoint certificate was requested without any name.
    #[error("an endpoint certificate needs at least one name; pass --name HOST (a DNS name or an IP address)")]
    NoNames,

    /// A name is neither a valid DNS name nor an IP address.
    #[error(
        "'{name}' is not a valid DNS name or IP address; use a host name such as gw.example.com \
         or an address such as 10.0.0.5 or ::1 (no wildcards, ports or brackets)"
    )]
    InvalidName { name: String },

    /// A validity period that ends before it starts.
    #[error("validity period ends ({not_after}) before it starts ({not_before}); pass a positive --days")]
    InvalidValidity {
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    },

    /// Key generation, signing or certificate encoding failed.
    #[error("cannot {what}: {source}; this is a bug or an unsupported key type, please report it")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },

    /// A string is not a SHA-256 thumbprint.
    #[error(
        "'{input}' is not a SHA-256 thumbprint; expected 32 bytes as 64 hex digits, \
         optionally colon-separated (AA:BB:...) and optionally prefixed with sha256:"
    )]
    InvalidThumbprint { input: String },
}

#[cfg(test)]
mod tests;
