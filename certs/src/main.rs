#![forbid(unsafe_code)]
//! `certs`: makes the gateway's CA, cloud-endpoint and edge-agent certificates.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use certs::{thumbprint_of_pem_file, Ca, Issued, Validity};
use clap::{Parser, Subcommand};

const DEFAULT_DAYS: u32 = 825;

#[derive(Debug, Parser)]
#[command(
    name = "certs",
    version,
    about = "Make the migration gateway's CA, cloud-endpoint and edge-agent certificates"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a CA: DIR/ca.pem (install on every endpoint and edge agent) and DIR/ca.key.
    Ca {
        /// Directory to write ca.pem and ca.key into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Common name of the CA certificate.
        #[arg(long, default_value = "Gateway CA")]
        name: String,
        /// Replace an existing ca.key; certificates signed by the old CA stop verifying.
        #[arg(long)]
        force: bool,
    },
    /// Issue a server certificate for a cloud endpoint: DIR/endpoint.pem and DIR/endpoint.key.
    Endpoint {
        /// Directory holding ca.pem and ca.key.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Directory to write the certificate and key into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// DNS name or IP address the edge agents connect to; repeat for several. The first
        /// is the certificate's common name.
        #[arg(long = "name", value_name = "NAME", required = true)]
        names: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = DEFAULT_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
        /// File name without extension.
        #[arg(long, default_value = "endpoint")]
        stem: String,
    },
    /// Issue a client certificate for an edge agent: DIR/edge.pem and DIR/edge.key.
    Edge {
        /// Directory holding ca.pem and ca.key.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Directory to write the certificate and key into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The edge agent's name (common name and DNS subject alternative name).
        #[arg(long)]
        name: String,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = DEFAULT_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
        /// File name without extension.
        #[arg(long, default_value = "edge")]
        stem: String,
    },
    /// Print the SHA-256 thumbprint of the first certificate in a PEM file.
    Thumbprint {
        /// PEM certificate file.
        file: PathBuf,
    },
    /// Make everything a local demo needs in one directory: a CA (kept if DIR already has
    /// one), an endpoint certificate for localhost, 127.0.0.1 and ::1, and an edge
    /// certificate for "edge-01".
    Quickstart {
        /// Directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Another name for the endpoint certificate; repeat for several.
        #[arg(long = "endpoint-name", value_name = "NAME")]
        endpoint_names: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Library errors already name the file and what to do; one line is enough.
            eprintln!("certs: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Ca { out, name, force } => {
            let key = out.join("ca.key");
            if key.exists() && !force {
                bail!(
                    "{} already exists; refusing to replace the CA key, because certificates it \
                     signed would stop verifying; pass --force to replace it or choose another --out",
                    key.display()
                );
            }
            let ca = Ca::generate(&name)?;
            ca.write(&out)?;
            println!("CA certificate: {}", out.join("ca.pem").display());
            println!("CA key:         {}", key.display());
            println!("SHA-256 thumbprint: {}", ca.thumbprint());
        }
        Command::Endpoint {
            ca,
            out,
            names,
            days,
            stem,
        } => {
            let issued = Ca::load(&ca)?.issue_endpoint(&names, Validity::days(days))?;
            report(&issued, &out, &stem)?;
        }
        Command::Edge {
            ca,
            out,
            name,
            days,
            stem,
        } => {
            let issued = Ca::load(&ca)?.issue_edge(&name, Validity::days(days))?;
            report(&issued, &out, &stem)?;
        }
        Command::Thumbprint { file } => println!("{}", thumbprint_of_pem_file(&file)?),
        Command::Quickstart { out, endpoint_names } => quickstart(&out, endpoint_names)?,
    }
    Ok(())
}

/// Writes a certificate and key and prints where they went and the thumbprint.
fn report(issued: &Issued, out: &Path, stem: &str) -> Result<()> {
    let (cert, key) = issued.write(out, stem)?;
    println!("certificate: {}", cert.display());
    println!("key:         {}", key.display());
    println!("SHA-256 thumbprint: {}", issued.thumbprint());
    Ok(())
}

fn quickstart(out: &Path, extra_names: Vec<String>) -> Result<()> {
    // Re-running the demo keeps an existing CA, so agents that already trust it keep working
    // and a CA key is never silently replaced.
    let existing = out.join("ca.key").exists();
    let ca = if existing {
        Ca::load(out)?
    } else {
        let ca = Ca::generate("Gateway CA")?;
        ca.write(out)?;
        ca
    };

    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for name in extra_names {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let endpoint = ca.issue_endpoint(&names, Validity::default())?;
    let (endpoint_pem, endpoint_key) = endpoint.write(out, "endpoint")?;
    let edge = ca.issue_edge("edge-01", Validity::default())?;
    let (edge_pem, edge_key) = edge.write(out, "edge")?;

    let kept = if existing { " (existing, kept)" } else { "" };
    println!("{}  CA certificate{kept}", out.join("ca.pem").display());
    println!("{}  CA private key{kept}", out.join("ca.key").display());
    println!(
        "{}  cloud-endpoint certificate for {}",
        endpoint_pem.display(),
        names.join(", ")
    );
    println!("{}  cloud-endpoint private key", endpoint_key.display());
    println!("{}  edge-agent certificate for edge-01", edge_pem.display());
    println!("{}  edge-agent private key", edge_key.display());
    println!("SHA-256 thumbprint: {}", endpoint.thumbprint());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ca_refuses_to_replace_a_key_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let ca = |force| Command::Ca {
            out: dir.path().to_owned(),
            name: "Gateway CA".into(),
            force,
        };
        run(ca(false)).unwrap();
        let first = std::fs::read(dir.path().join("ca.key")).unwrap();
        let err = run(ca(false)).unwrap_err().to_string();
        assert!(err.contains("--force") && err.contains("ca.key"), "{err}");
        assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), first);
        run(ca(true)).unwrap();
        assert_ne!(std::fs::read(dir.path().join("ca.key")).unwrap(), first);
    }

    #[test]
    fn quickstart_writes_everything_and_keeps_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pki");
        quickstart(&out, vec!["gw.example.com".into(), "localhost".into()]).unwrap();
        let ca_thumbprint = thumbprint_of_pem_file(&out.join("ca.pem")).unwrap();
        for file in [
            "ca.pem",
            "ca.key",
            "endpoint.pem",
            "endpoint.key",
            "edge.pem",
            "edge.key",
        ] {
            assert!(out.join(file).exists(), "{file}");
        }
        quickstart(&out, vec![]).unwrap();
        assert_eq!(thumbprint_of_pem_file(&out.join("ca.pem")).unwrap(), ca_thumbprint);
    }
}
