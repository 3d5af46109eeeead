//! Migration receipts on the edge: keeping the one the cloud issued at commit,
//! and verifying a receipt later against the source VM (`edge-agent
//! verify-receipt`): the endpoint's signature, that the endpoint is one the
//! user trusts, then every disk's Merkle root recomputed from the source.

use std::fmt;
use std::path::{Path, PathBuf};

use certs::Thumbprint;
use gateway::chunk::ChunkHash;
use gateway::integrity::hex;
use gateway::merkle::MerkleBuilder;
use gateway::plan::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use gateway::receipt::{ReceiptError, SignedReceipt, MAX_RECEIPT_BYTES};
use gateway::transport::ServerTrust;

use crate::source::{self, DiskReader, SourceError};
use crate::MigrateError;

/// Why a receipt could not be checked at all, or failed before its disks were.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error("cannot read the receipt {}: {source}; pass the file `edge-agent migrate` wrote (its --receipt)", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{} is {len} bytes, more than a receipt may have ({MAX_RECEIPT_BYTES}); pass the receipt file", path.display())]
    TooLarge { path: PathBuf, len: u64 },
    #[error("receipt {}: {source}", path.display())]
    Receipt { path: PathBuf, source: ReceiptError },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("the receipt gives disk {key} a chunk size of {chunk_size} bytes, which no migration uses ({MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}, a multiple of 4096): the receipt is damaged")]
    BadChunkSize { key: String, chunk_size: u32 },
}

/// One disk's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCheck {
    pub key: String,
    /// The root the receipt states.
    pub receipt_root: String,
    /// The root recomputed from the source, if the disk could be read.
    pub source_root: Option<String>,
    /// `None` when the roots match; otherwise what differs.
    pub mismatch: Option<String>,
}

impl DiskCheck {
    pub fn ok(&self) -> bool {
        self.mismatch.is_none()
    }
}

/// A receipt whose signature and endpoint were accepted, with the verdict on
/// every disk (and on source disks the receipt does not name).
#[derive(Debug, Clone)]
pub struct Verification {
    pub receipt: gateway::receipt::Receipt,
    /// `None` when the source VM is the one the receipt names; otherwise what differs.
    /// Disks of the same bytes in another VM match every root: the VM's name and (from
    /// receipt format 2) its descriptor's SHA-256, which the receipt signs, tell them apart.
    pub vm_mismatch: Option<String>,
    pub disks: Vec<DiskCheck>,
}

impl Verification {
    /// True when the source is the VM the receipt names and every disk matches it.
    pub fn ok(&self) -> bool {
        self.vm_mismatch.is_none() && self.disks.iter().all(DiskCheck::ok)
    }

    pub fn failures(&self) -> usize {
        usize::from(self.vm_mismatch.is_some()) + self.disks.iter().filter(|d| !d.ok()).count()
    }
}

impl fmt::Display for Verification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.receipt;
        writeln!(
            f,
            "receipt of {}: {} -> {} at {}, committed {}",
            r.migration_id, r.vm_name, r.vm_id, r.vm_path, r.committed_at
        )?;
        // The endpoint's name usually carries its thumbprint already.
        if r.endpoint.contains(&r.endpoint_thumbprint) {
            writeln!(f, "signed by {}: signature and identity OK", r.endpoint)?;
        } else {
            writeln!(
                f,
                "signed by {} (certificate {}): signature and identity OK",
                r.endpoint, r.endpoint_thumbprint
            )?;
        }
        match &r.source_descriptor_sha256 {
            Some(digest) if self.vm_mismatch.is_none() => {
                writeln!(f, "  {:<9} OK        {} SHA-256 {digest}", "VM", r.vm_name)?
            }
            Some(_) => {}
            None => writeln!(
                f,
                "  receipt format {}: it does not bind the source's .vmx or OVF descriptor (format 2 does); the VM's name and disks are checked",
                r.format_version
            )?,
        }
        if let Some(why) = &self.vm_mismatch {
            writeln!(f, "  {:<9} MISMATCH  {why}", "VM")?;
        }
        writeln!(f, "  Merkle roots over {} chunk hashes", r.chunk_hash().name())?;
        for d in &self.disks {
            match &d.mismatch {
                None => writeln!(f, "  {:<9} OK        Merkle root {}", d.key, d.receipt_root)?,
                Some(why) => writeln!(f, "  {:<9} MISMATCH  {why}", d.key)?,
            }
        }
        Ok(())
    }
}

/// Reads a signed receipt file (bounded; the signature is not checked yet).
pub fn read(path: &Path) -> Result<SignedReceipt, VerifyError> {
    let read_err = |source| VerifyError::Read {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_RECEIPT_BYTES as u64 {
        return Err(VerifyError::TooLarge {
            path: path.to_owned(),
            len,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    SignedReceipt::from_json(&text).map_err(|source| VerifyError::Receipt {
        path: path.to_owned(),
        source,
    })
}

/// Verifies the receipt at `receipt_path` against the source VM at `source`
/// (a .vmx, .ovf or .ova): the signature, the endpoint against `trust`, then
/// each disk's Merkle root recomputed from the source with the receipt's chunk
/// size. Disk mismatches are in the result ([`Verification::ok`]); a receipt
/// that is damaged, forged or from an untrusted endpoint is an error, and then
/// no disk is read.
pub fn verify(receipt_path: &Path, source: &Path, trust: &ServerTrust) -> Result<Verification, VerifyError> {
    verify_with(receipt_path, source, &source::SourceOptions::default(), trust)
}

/// [`verify`], reading the source's disks as `options` says (the `--raw-disk` flags the
/// migration was given).
pub fn verify_with(
    receipt_path: &Path,
    source: &Path,
    options: &source::SourceOptions,
    trust: &ServerTrust,
) -> Result<Verification, VerifyError> {
    let signed = read(receipt_path)?;
    signed.verify(trust).map_err(|source| VerifyError::Receipt {
        path: receipt_path.to_owned(),
        source,
    })?;
    let receipt = signed.receipt;
    for d in &receipt.disks {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&d.chunk_size) || !d.chunk_size.is_multiple_of(4096) {
            return Err(VerifyError::BadChunkSize {
                key: d.key.clone(),
                chunk_size: d.chunk_size,
            });
        }
    }
    let vm = source::open_vm_with(source, options)?;
    let mut differs = Vec::new();
    if vm.name != receipt.vm_name {
        differs.push(format!(
            "the source VM is named {:?}, the receipt is of {:?}: it is another VM, whatever its disks hold",
            vm.name, receipt.vm_name
        ));
    }
    // Format 1 receipts do not bind the descriptor: only the name and disks are checked.
    if let Some(signed) = &receipt.source_descriptor_sha256 {
        let read = hex(&vm.descriptor_sha256);
        if *signed != read {
            differs.push(format!(
                "the source's descriptor {} has SHA-256 {read}, the receipt binds {signed}: this is not the .vmx (or OVF) the migration read, so not the VM the receipt is of (another VM with the same disks, or its configuration was edited since); check the receipt against the descriptor as it was migrated",
                vm.vmx_path.display()
            ));
        }
    }
    let vm_mismatch = (!differs.is_empty()).then(|| differs.join("; "));

    let mut checks: Vec<DiskCheck> = Vec::new();
    // The roots are rebuilt with the receipt's own hash: SHA-256 for formats 1 and 2.
    let alg = receipt.chunk_hash();
    // Disks are independent: hash them on separate threads (reads are positional).
    std::thread::scope(|scope| -> Result<(), VerifyError> {
        let mut running = Vec::new();
        for d in &receipt.disks {
            let Some(src) = vm.disks.iter().find(|s| s.key == d.key) else {
                checks.push(DiskCheck {
                    key: d.key.clone(),
                    receipt_root: d.merkle_root.clone(),
                    source_root: None,
                    mismatch: Some(format!("the source VM has no disk {}", d.key)),
                });
                continue;
            };
            if src.capacity != d.logical_bytes {
                checks.push(DiskCheck {
                    key: d.key.clone(),
                    receipt_root: d.merkle_root.clone(),
                    source_root: None,
                    mismatch: Some(format!(
                        "the source disk {} has {} bytes, the receipt {}",
                        src.path.display(),
                        src.capacity,
                        d.logical_bytes
                    )),
                });
                continue;
            }
            let reader = source::open_source_disk(src)?;
            let chunk_size = d.chunk_size;
            let at = checks.len();
            checks.push(DiskCheck {
                key: d.key.clone(),
                receipt_root: d.merkle_root.clone(),
                source_root: None,
                mismatch: None,
            });
            let path = src.path.clone();
            running.push((
                at,
                path,
                scope.spawn(move || disk_root(reader.as_ref(), chunk_size, alg)),
            ));
        }
        for (at, path, handle) in running {
            let check = &mut checks[at];
            match handle.join().expect("hashing does not panic") {
                Ok(root) => {
                    let root = hex(&root);
                    if root != check.receipt_root {
                        check.mismatch = Some(format!(
                            "the source disk {} has Merkle root {root}, the receipt {}: it differs from what the cloud received",
                            path.display(),
                            check.receipt_root
                        ));
                    }
                    check.source_root = Some(root);
                }
                Err(e) => {
                    check.mismatch = Some(format!("cannot read the source disk {}: {e}", path.display()));
                }
            }
        }
        Ok(())
    })?;
    for src in &vm.disks {
        if !receipt.disks.iter().any(|d| d.key == src.key) {
            checks.push(DiskCheck {
                key: src.key.clone(),
                receipt_root: String::new(),
                source_root: None,
                mismatch: Some(format!(
                    "the source VM has disk {} ({}), which the receipt does not name",
                    src.key,
                    src.path.display()
                )),
            });
        }
    }
    Ok(Verification {
        receipt,
        vm_mismatch,
        disks: checks,
    })
}

/// The Merkle root of a source disk, as both sides of a migration compute it:
/// one leaf per chunk, the hash (`alg`, the receipt's: SHA-256 for formats 1 and 2) of
/// its plaintext; a hole (known zero without reading) has the hash of its zeros, exactly
/// what reading it would give.
pub fn disk_root(reader: &dyn DiskReader, chunk_size: u32, alg: ChunkHash) -> std::io::Result<[u8; 32]> {
    let cs = u64::from(chunk_size);
    let capacity = reader.capacity();
    let zero_full = alg.digest(&vec![0u8; chunk_size as usize]);
    let mut tree = MerkleBuilder::with(alg);
    let mut buf = vec![0u8; chunk_size as usize];
    let mut offset = 0;
    while offset < capacity {
        let len = (capacity - offset).min(cs);
        let hash = if reader.is_hole(offset, len) {
            if len == cs {
                zero_full
            } else {
                alg.digest(&vec![0u8; len as usize])
            }
        } else {
            let plain = &mut buf[..len as usize];
            reader.read_at(offset, plain)?;
            alg.digest(plain)
        };
        tree.push(&hash);
        offset += len;
    }
    Ok(tree.root())
}

/// After a commit: checks that the receipt was signed by the endpoint this
/// agent authenticated in TLS (the session already checked its signature and
/// contents), then writes it to `path` if one is given. The VM is registered
/// either way; the errors say so and where to fetch the receipt again.
pub fn keep(
    conn: &quinn::Connection,
    receipt: Option<&str>,
    path: Option<&Path>,
    vm_id: &str,
    migration_id: &str,
) -> Result<Option<PathBuf>, MigrateError> {
    let registered = format!("the VM is registered in the cloud as {vm_id} (migration {migration_id}), but");
    let receipt = receipt.ok_or_else(|| MigrateError::Receipt(format!("{registered} the endpoint sent no receipt")))?;
    let signed = SignedReceipt::from_json(receipt).map_err(|e| MigrateError::Receipt(format!("{registered} {e}")))?;
    let peer = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(|c| Thumbprint::of_der(c)));
    let stated = signed.receipt.endpoint_thumbprint.parse::<Thumbprint>().ok();
    if peer.is_none() || peer != stated {
        return Err(MigrateError::Receipt(format!(
            "{registered} its receipt is signed by certificate {}, not by the endpoint this agent connected to ({}); \
             do not rely on it",
            signed.receipt.endpoint_thumbprint,
            peer.map(|p| p.to_string()).unwrap_or_else(|| "unknown".into())
        )));
    }
    let Some(path) = path else {
        return Ok(None);
    };
    std::fs::write(path, receipt).map_err(|e| {
        MigrateError::Receipt(format!(
            "{registered} its receipt cannot be written to {}: {e}; fetch it with GET /api/gateway/migrations/{migration_id}/receipt",
            path.display()
        ))
    })?;
    Ok(Some(path.to_owned()))
}
