//! The migration receipt: what the cloud endpoint states, and signs, when it
//! registers a migrated VM. It names the VM (by name, cloud id and datastore
//! path), each disk with its Merkle root over the chunk hashes (see
//! [`crate::merkle`]), when the plan was accepted and the VM committed, and
//! the endpoint (its name, its certificate chain and the leaf's SHA-256
//! thumbprint). Anyone holding the source disks can later recompute the roots
//! and check them against a receipt whose signature verifies under a
//! certificate they trust: no access to the cloud needed.
//!
//! Signing: the canonical bytes are `serde_json` of [`Receipt`] (compact, its
//! fields in declaration order, which never changes within a format version);
//! the signature is ECDSA P-256 with SHA-256 (ASN.1 DER), made with ring by the
//! endpoint's TLS private key. A signed receipt is the JSON document
//! `{"receipt": {...}, "signature": "<base64>"}`; a verifier re-derives the
//! canonical bytes from the parsed struct, and unknown fields are refused, so
//! nothing can be added to a receipt without breaking its signature.

use std::time::Duration;

use base64::Engine as _;
use certs::Thumbprint;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::SignatureScheme;
use serde::{Deserialize, Serialize};

use crate::chunk::ChunkHash;
use crate::integrity::hex;
use crate::plan::MigrationPlan;
use crate::transport::ServerTrust;

/// Format version this build writes. A change to the fields or to how the signature is
/// made is a new version. Version 2 adds `source_descriptor_sha256`: the receipt binds the
/// source VM's .vmx or OVF descriptor, not only its name and disks. Version 3 adds
/// `chunk_hash`: the Merkle roots are BLAKE3 trees over BLAKE3 chunk hashes (protocol
/// version 8); versions 1 and 2 name no hash and mean SHA-256.
pub const RECEIPT_FORMAT_VERSION: u32 = 3;

/// The oldest format version this build still reads and verifies: version 1 receipts
/// (without the descriptor's digest) stay verifiable for what they bind.
pub const OLDEST_RECEIPT_FORMAT_VERSION: u32 = 1;

/// Largest signed receipt accepted: 256 disks and a certificate chain take
/// under 100 KiB, and the control frame that carries one is 1 MiB at most.
pub const MAX_RECEIPT_BYTES: usize = 512 * 1024;

/// Why a receipt cannot be made or does not verify. Every message says what
/// the receipt or key failed and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiptError {
    #[error("not a migration receipt: {0}; pass the file `edge-agent migrate` wrote or the body of GET /api/gateway/migrations/{{id}}/receipt")]
    Malformed(String),
    #[error("receipt format version {0} is not known to this build (it reads versions {OLDEST_RECEIPT_FORMAT_VERSION} to {RECEIPT_FORMAT_VERSION}); use a newer edge-agent")]
    UnsupportedVersion(u32),
    #[error("the receipt's endpoint certificate cannot be read: {0}; the receipt is damaged")]
    Certificate(String),
    #[error("the receipt states endpoint thumbprint {stated}, but its certificate's thumbprint is {actual}: the receipt was altered")]
    ThumbprintMismatch { stated: String, actual: String },
    #[error("the receipt's signature does not verify under the endpoint certificate it carries: the receipt was altered after it was signed, or was not signed by that endpoint")]
    BadSignature,
    #[error("the receipt was signed by endpoint certificate {actual}, not by the pinned {pinned}: it is not from the endpoint you trust")]
    PinMismatch { pinned: String, actual: String },
    #[error("the receipt's endpoint certificate does not chain to the given CA bundle ({0}): it is not from an endpoint you trust; pass the CA that issued the endpoint's certificate")]
    UntrustedEndpoint(String),
    #[error("the endpoint key cannot sign receipts: {0}; receipts are signed with the endpoint's TLS key, which must be ECDSA P-256 (as `certs endpoint` makes it)")]
    Key(String),
    #[error("signing the receipt failed: {0}")]
    Sign(String),
    #[error("the receipt's signing certificate is not an endpoint's: {0}; only a certificate for server authentication (serverAuth extended key usage, as `certs endpoint` makes it) may sign receipts")]
    NotAnEndpoint(String),
}

/// What the cloud endpoint states about one migrated VM. Field order is part
/// of the format: the canonical bytes follow it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// [`RECEIPT_FORMAT_VERSION`].
    pub format_version: u32,
    /// The endpoint's migration id, e.g. `migration-7`.
    pub migration_id: String,
    /// The VM's name in the cloud domain.
    pub vm_name: String,
    /// SHA-256 of the source's .vmx or OVF descriptor as the edge read it, lowercase hex
    /// (from format version 2; absent in version 1, whose canonical bytes it then leaves
    /// as they were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_descriptor_sha256: Option<String>,
    /// The hash of the chunks and Merkle trees, `blake3` (from format version 3; absent
    /// before, which means `sha256`). [`Receipt::chunk_hash`] reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_hash: Option<String>,
    /// The VM's id in the cloud inventory, e.g. `vm-14`.
    pub vm_id: String,
    /// The datastore path of its .vmx, e.g. `[cloud-ds1] web01/web01.vmx`.
    pub vm_path: String,
    /// Every disk, in plan order.
    pub disks: Vec<ReceiptDisk>,
    /// When the plan was accepted (RFC 3339, UTC).
    pub planned_at: String,
    /// When the VM was registered (RFC 3339, UTC).
    pub committed_at: String,
    /// How the endpoint names itself to edges.
    pub endpoint: String,
    /// The endpoint's certificate chain (PEM, leaf first): the leaf's key signed.
    pub endpoint_certificate: String,
    /// SHA-256 thumbprint of the leaf certificate, `AA:BB:...`.
    pub endpoint_thumbprint: String,
}

/// One disk of a receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptDisk {
    /// Controller slot, e.g. `scsi0:0`.
    pub key: String,
    /// Size of the disk in the cloud (whole sectors).
    pub capacity: u64,
    /// Chunk size the tree was built with: recompute with the same one.
    pub chunk_size: u32,
    /// Merkle root over the chunk hashes, lowercase hex.
    pub merkle_root: String,
    /// Source bytes the root covers (the source disk's size).
    pub logical_bytes: u64,
}

/// A receipt with the endpoint's signature over its canonical bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedReceipt {
    pub receipt: Receipt,
    /// ECDSA P-256 SHA-256 signature (ASN.1 DER), standard base64.
    pub signature: String,
}

impl Receipt {
    /// The hash the disks' Merkle roots were built with. Formats 1 and 2 used SHA-256;
    /// [`SignedReceipt::from_json`] has checked that a format 3 receipt names a known one.
    pub fn chunk_hash(&self) -> ChunkHash {
        self.chunk_hash
            .as_deref()
            .and_then(ChunkHash::from_name)
            .unwrap_or(ChunkHash::Sha256)
    }

    /// The bytes the signature covers.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a receipt of strings and integers serializes")
    }

    /// Lists every way this receipt disagrees with what the edge sent: the
    /// migration it accepted, the VM it announced and the roots it computed.
    /// Empty when they agree.
    pub fn differences(
        &self,
        migration_id: &str,
        vm_id: &str,
        vm_path: &str,
        plan: &MigrationPlan,
        roots: &[[u8; 32]],
    ) -> Vec<String> {
        let mut out = Vec::new();
        let mut same = |what: &str, receipt: &dyn std::fmt::Display, ours: &dyn std::fmt::Display| {
            let (r, o) = (receipt.to_string(), ours.to_string());
            if r != o {
                out.push(format!("{what} is {r:?} in the receipt, {o:?} in this migration"));
            }
        };
        same("the migration id", &self.migration_id, &migration_id);
        same("the VM name", &self.vm_name, &plan.vm.name);
        same(
            "the source descriptor's SHA-256",
            &self.source_descriptor_sha256.as_deref().unwrap_or("none"),
            &plan
                .source_descriptor_sha256
                .map_or_else(|| "none".to_owned(), |d| hex(&d)),
        );
        same("the VM id", &self.vm_id, &vm_id);
        same("the VM path", &self.vm_path, &vm_path);
        same("the number of disks", &self.disks.len(), &plan.vm.disks.len());
        for (i, (d, spec)) in self.disks.iter().zip(&plan.vm.disks).enumerate() {
            same(&format!("disk {i}'s key"), &d.key, &spec.key);
            same(&format!("disk {i}'s size"), &d.logical_bytes, &spec.capacity);
            same(&format!("disk {i}'s chunk size"), &d.chunk_size, &plan.chunk_size);
            let root = roots.get(i).map(|r| hex(r)).unwrap_or_default();
            same(&format!("disk {i}'s Merkle root"), &d.merkle_root, &root);
        }
        out
    }
}

/// The endpoint's signing side: its TLS key and the certificate chain that
/// goes into every receipt.
#[derive(Debug)]
pub struct ReceiptSigner {
    signer: Box<dyn rustls::sign::Signer>,
    certificate_pem: String,
    thumbprint: Thumbprint,
}

impl ReceiptSigner {
    /// Checks that `key` is an ECDSA P-256 key belonging to `chain[0]` (a
    /// probe signature must verify under the certificate), so a misconfigured
    /// endpoint fails at start rather than at its first commit.
    pub fn new(chain: &[CertificateDer<'static>], key: &PrivateKeyDer<'_>) -> Result<ReceiptSigner, ReceiptError> {
        let leaf = chain
            .first()
            .ok_or_else(|| ReceiptError::Key("the endpoint certificate file holds no certificate".into()))?;
        // rustls's ring signer reads both PKCS#8 and SEC1 keys, as TLS does.
        let key = rustls::crypto::ring::sign::any_ecdsa_type(key)
            .map_err(|e| ReceiptError::Key(format!("not an ECDSA key ({e})")))?;
        let signer = key
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
            .ok_or_else(|| ReceiptError::Key("an ECDSA key, but not on curve P-256".into()))?;
        require_server_auth(leaf).map_err(|e| match e {
            ReceiptError::NotAnEndpoint(why) => ReceiptError::Key(format!(
                "the endpoint certificate is not for server authentication ({why}); issue it with `certs endpoint`"
            )),
            other => other,
        })?;
        let probe = b"hcm receipt signer probe";
        let signature = signer.sign(probe).map_err(|e| ReceiptError::Sign(e.to_string()))?;
        verify_with(leaf, probe, &signature).map_err(|_| {
            ReceiptError::Key(
                "the key does not belong to the endpoint certificate (cert and key files do not match)".into(),
            )
        })?;
        Ok(ReceiptSigner {
            signer,
            certificate_pem: pem_encode(chain),
            thumbprint: Thumbprint::of_der(leaf),
        })
    }

    /// The chain as it goes into receipts (PEM, leaf first).
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    pub fn thumbprint(&self) -> Thumbprint {
        self.thumbprint
    }

    /// Signs `receipt` (whose endpoint certificate and thumbprint must be this
    /// signer's: see [`Self::certificate_pem`] and [`Self::thumbprint`]).
    pub fn sign(&self, receipt: Receipt) -> Result<SignedReceipt, ReceiptError> {
        if receipt.endpoint_certificate != self.certificate_pem
            || receipt.endpoint_thumbprint != self.thumbprint.to_string()
        {
            return Err(ReceiptError::Sign(
                "the receipt names another endpoint certificate than the signing key's".into(),
            ));
        }
        let signature = self
            .signer
            .sign(&receipt.canonical_bytes())
            .map_err(|e| ReceiptError::Sign(e.to_string()))?;
        Ok(SignedReceipt {
            receipt,
            signature: base64::engine::general_purpose::STANDARD.encode(signature),
        })
    }
}

impl SignedReceipt {
    /// The document as stored and handed out: pretty JSON, so a person can read it.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a receipt serializes")
    }

    /// Parses a signed receipt document; checks its size and format version,
    /// not its signature.
    pub fn from_json(text: &str) -> Result<SignedReceipt, ReceiptError> {
        if text.len() > MAX_RECEIPT_BYTES {
            return Err(ReceiptError::Malformed(format!(
                "{} bytes is more than a receipt may have ({MAX_RECEIPT_BYTES})",
                text.len()
            )));
        }
        let signed: SignedReceipt = serde_json::from_str(text).map_err(|e| ReceiptError::Malformed(e.to_string()))?;
        let version = signed.receipt.format_version;
        if !(OLDEST_RECEIPT_FORMAT_VERSION..=RECEIPT_FORMAT_VERSION).contains(&version) {
            return Err(ReceiptError::UnsupportedVersion(version));
        }
        // Each version has its fields, no more and no fewer.
        match (version, &signed.receipt.source_descriptor_sha256) {
            (1, Some(_)) => Err(ReceiptError::Malformed(
                "a format 1 receipt has no source_descriptor_sha256".into(),
            )),
            (2.., None) => Err(ReceiptError::Malformed(format!(
                "a format {version} receipt lacks source_descriptor_sha256"
            ))),
            _ => Ok(()),
        }?;
        match (version, signed.receipt.chunk_hash.as_deref()) {
            (..=2, Some(_)) => Err(ReceiptError::Malformed(format!(
                "a format {version} receipt has no chunk_hash (it means SHA-256)"
            ))),
            (3.., None) => Err(ReceiptError::Malformed(format!(
                "a format {version} receipt lacks chunk_hash"
            ))),
            (3.., Some(name)) if ChunkHash::from_name(name).is_none() => Err(ReceiptError::Malformed(format!(
                "chunk_hash {name:?} is not a hash this build knows (sha256, blake3); use a newer edge-agent"
            ))),
            _ => Ok(signed),
        }
    }

    /// The certificate chain the receipt carries, leaf first.
    pub fn certificates(&self) -> Result<Vec<CertificateDer<'static>>, ReceiptError> {
        let chain = CertificateDer::pem_slice_iter(self.receipt.endpoint_certificate.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ReceiptError::Certificate(e.to_string()))?;
        if chain.is_empty() {
            return Err(ReceiptError::Certificate("it holds no PEM certificate".into()));
        }
        Ok(chain)
    }

    /// Checks that the signature verifies under the certificate the receipt
    /// carries and that the stated thumbprint is that certificate's. Says
    /// nothing about whether that endpoint is trusted: see [`Self::verify`].
    /// Returns the chain, leaf first.
    pub fn verify_signature(&self) -> Result<Vec<CertificateDer<'static>>, ReceiptError> {
        let chain = self.certificates()?;
        let actual = Thumbprint::of_der(&chain[0]);
        let stated_matches = self
            .receipt
            .endpoint_thumbprint
            .parse::<Thumbprint>()
            .is_ok_and(|t| t == actual);
        if !stated_matches {
            return Err(ReceiptError::ThumbprintMismatch {
                stated: self.receipt.endpoint_thumbprint.clone(),
                actual: actual.to_string(),
            });
        }
        let signature = base64::engine::general_purpose::STANDARD
            .decode(self.signature.trim())
            .map_err(|_| ReceiptError::BadSignature)?;
        verify_with(&chain[0], &self.receipt.canonical_bytes(), &signature)?;
        // An edge (client) certificate of the same CA signs nothing an endpoint states,
        // whether the verifier trusts a CA or a pinned thumbprint.
        require_server_auth(&chain[0])?;
        Ok(chain)
    }

    /// Checks the signature and that the signing endpoint is one `trust`
    /// accepts: its leaf certificate has the pinned thumbprint, and/or it
    /// chains to the CA bundle as a server certificate. The chain is checked
    /// at the receipt's commit time: a receipt stays verifiable after the
    /// endpoint's certificate expires, as long as it was valid when it signed.
    pub fn verify(&self, trust: &ServerTrust) -> Result<(), ReceiptError> {
        let chain = self.verify_signature()?;
        let actual = Thumbprint::of_der(&chain[0]);
        let (cas, pin) = match trust {
            ServerTrust::Ca(cas) => (Some(cas), None),
            ServerTrust::Pinned(pin) => (None, Some(pin)),
            ServerTrust::CaAndPinned(cas, pin) => (Some(cas), Some(pin)),
        };
        if let Some(pin) = pin {
            if *pin != actual {
                return Err(ReceiptError::PinMismatch {
                    pinned: pin.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        if let Some(cas) = cas {
            let at = commit_time(&self.receipt.committed_at)?;
            check_chain(&chain, cas, at)?;
        }
        Ok(())
    }
}

/// Verifies an ECDSA P-256 SHA-256 signature with a certificate's public key.
/// webpki checks that the certificate's key is a P-256 key before using it.
fn verify_with(cert: &CertificateDer<'_>, message: &[u8], signature: &[u8]) -> Result<(), ReceiptError> {
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| ReceiptError::Certificate(e.to_string()))?;
    ee.verify_signature(webpki::ring::ECDSA_P256_SHA256, message, signature)
        .map_err(|_| ReceiptError::BadSignature)
}

/// Checks that `cert` carries the serverAuth extended key usage: a cloud endpoint's
/// certificate, not an edge's (clientAuth) or a CA's.
fn require_server_auth(cert: &CertificateDer<'_>) -> Result<(), ReceiptError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| ReceiptError::Certificate(e.to_string()))?;
    match parsed.extended_key_usage() {
        Ok(Some(eku)) if eku.value.server_auth => Ok(()),
        Ok(Some(_)) => Err(ReceiptError::NotAnEndpoint(
            "its extended key usage does not include serverAuth".into(),
        )),
        Ok(None) => Err(ReceiptError::NotAnEndpoint("it has no extended key usage".into())),
        Err(e) => Err(ReceiptError::Certificate(e.to_string())),
    }
}

fn commit_time(text: &str) -> Result<UnixTime, ReceiptError> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| ReceiptError::Malformed(format!("committed_at {text:?} is not an RFC 3339 time: {e}")))?;
    let secs = u64::try_from(t.unix_timestamp())
        .map_err(|_| ReceiptError::Malformed(format!("committed_at {text:?} is before 1970")))?;
    Ok(UnixTime::since_unix_epoch(Duration::from_secs(secs)))
}

fn check_chain(
    chain: &[CertificateDer<'static>],
    cas: &[CertificateDer<'static>],
    at: UnixTime,
) -> Result<(), ReceiptError> {
    let anchors = cas
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            ReceiptError::UntrustedEndpoint(format!("a CA in the bundle is not usable as a trust anchor: {e}"))
        })?;
    if anchors.is_empty() {
        return Err(ReceiptError::UntrustedEndpoint("the bundle holds no CA".into()));
    }
    let ee = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| ReceiptError::Certificate(e.to_string()))?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &chain[1..],
        at,
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map_err(|e| ReceiptError::UntrustedEndpoint(e.to_string()))?;
    Ok(())
}

/// PEM text of a certificate chain, 64 base64 characters a line (RFC 7468).
fn pem_encode(chain: &[CertificateDer<'_>]) -> String {
    let mut out = String::new();
    for cert in chain {
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use certs::{Ca, Validity};

    struct Endpoint {
        ca: Ca,
        chain: Vec<CertificateDer<'static>>,
        signer: ReceiptSigner,
    }

    fn endpoint() -> Endpoint {
        let ca = Ca::generate("Receipt Test CA").unwrap();
        let issued = ca.issue_endpoint(&["localhost".into()], Validity::days(30)).unwrap();
        let chain = vec![issued.cert_der()];
        let signer = ReceiptSigner::new(&chain, &issued.key_der()).unwrap();
        Endpoint { ca, chain, signer }
    }

    fn receipt(signer: &ReceiptSigner) -> Receipt {
        Receipt {
            format_version: RECEIPT_FORMAT_VERSION,
            migration_id: "migration-3".into(),
            vm_name: "web01".into(),
            source_descriptor_sha256: Some(hex(&[7; 32])),
            chunk_hash: Some(ChunkHash::CURRENT.name().into()),
            vm_id: "vm-14".into(),
            vm_path: "[cloud-ds1] web01/web01.vmx".into(),
            disks: vec![ReceiptDisk {
                key: "scsi0:0".into(),
                capacity: 1 << 30,
                chunk_size: 1 << 20,
                merkle_root: hex(&crate::merkle::root(&[[1; 32], [2; 32], [3; 32]])),
                logical_bytes: 1 << 30,
            }],
            planned_at: "2026-11-26T10:00:00Z".into(),
            committed_at: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap(),
            endpoint: "esx01.cloud.local".into(),
            endpoint_certificate: signer.certificate_pem().to_owned(),
            endpoint_thumbprint: signer.thumbprint().to_string(),
        }
    }

    #[test]
    fn a_signed_receipt_round_trips_and_verifies() {
        let ep = endpoint();
        let signed = ep.signer.sign(receipt(&ep.signer)).unwrap();
        let text = signed.to_json();
        let parsed = SignedReceipt::from_json(&text).unwrap();
        assert_eq!(parsed, signed);
        assert_eq!(parsed.certificates().unwrap(), ep.chain);
        parsed.verify(&ServerTrust::Ca(vec![ep.ca.cert_der()])).unwrap();
        parsed
            .verify(&ServerTrust::Pinned(Thumbprint::of_der(&ep.chain[0])))
            .unwrap();
        parsed
            .verify(&ServerTrust::CaAndPinned(
                vec![ep.ca.cert_der()],
                Thumbprint::of_der(&ep.chain[0]),
            ))
            .unwrap();
        // The canonical bytes are the compact struct in field order.
        let canonical = String::from_utf8(signed.receipt.canonical_bytes()).unwrap();
        assert!(
            canonical.starts_with(
                r#"{"format_version":3,"migration_id":"migration-3","vm_name":"web01","source_descriptor_sha256":"0707"#
            ),
            "{canonical}"
        );
    }

    #[test]
    fn a_format_1_receipt_still_verifies_and_versions_keep_their_fields() {
        let ep = endpoint();
        // As an endpoint before format 2 signed it: no descriptor digest, and canonical
        // bytes without the field.
        let mut old = receipt(&ep.signer);
        old.format_version = 1;
        old.source_descriptor_sha256 = None;
        old.chunk_hash = None;
        let canonical = String::from_utf8(old.canonical_bytes()).unwrap();
        assert!(
            canonical
                .starts_with(r#"{"format_version":1,"migration_id":"migration-3","vm_name":"web01","vm_id":"vm-14","#),
            "{canonical}"
        );
        let signed = ep.signer.sign(old).unwrap();
        let parsed = SignedReceipt::from_json(&signed.to_json()).unwrap();
        parsed.verify(&ServerTrust::Ca(vec![ep.ca.cert_der()])).unwrap();
        assert_eq!(parsed.receipt.source_descriptor_sha256, None);
        assert_eq!(parsed.receipt.chunk_hash(), ChunkHash::Sha256);

        // A digest added to a format 1 receipt, or taken from a format 2 one, is refused
        // before its signature is looked at.
        let mut v: serde_json::Value = serde_json::from_str(&signed.to_json()).unwrap();
        v["receipt"]["source_descriptor_sha256"] = "00".into();
        assert!(matches!(
            SignedReceipt::from_json(&v.to_string()),
            Err(ReceiptError::Malformed(m)) if m.contains("format 1 receipt has no source_descriptor_sha256")
        ));
        let current = ep.signer.sign(receipt(&ep.signer)).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&current.to_json()).unwrap();
        v["receipt"].as_object_mut().unwrap().remove("source_descriptor_sha256");
        assert!(matches!(
            SignedReceipt::from_json(&v.to_string()),
            Err(ReceiptError::Malformed(m)) if m.contains("lacks source_descriptor_sha256")
        ));
        // And the digest is signed like every other field.
        let mut altered = current.clone();
        altered.receipt.source_descriptor_sha256 = Some(hex(&[8; 32]));
        assert_eq!(altered.verify_signature().unwrap_err(), ReceiptError::BadSignature);
    }

    #[test]
    fn any_altered_field_breaks_the_signature() {
        let ep = endpoint();
        let signed = ep.signer.sign(receipt(&ep.signer)).unwrap();
        let alterations: [fn(&mut Receipt); 4] = [
            |r| r.vm_id = "vm-15".into(),
            |r| r.disks[0].merkle_root.replace_range(0..1, "f"),
            |r| r.disks[0].logical_bytes += 1,
            |r| r.committed_at = "2030-01-01T00:00:00Z".into(),
        ];
        for f in alterations {
            let mut bad = signed.clone();
            f(&mut bad.receipt);
            assert_ne!(bad, signed);
            assert_eq!(bad.verify_signature().unwrap_err(), ReceiptError::BadSignature);
        }
        // A field the format does not have is refused, not ignored.
        let mut v: serde_json::Value = serde_json::from_str(&signed.to_json()).unwrap();
        v["receipt"]["note"] = "added".into();
        assert!(matches!(
            SignedReceipt::from_json(&v.to_string()),
            Err(ReceiptError::Malformed(_))
        ));
        let mut garbage = signed.clone();
        garbage.signature = "not base64!".into();
        assert_eq!(garbage.verify_signature().unwrap_err(), ReceiptError::BadSignature);
    }

    #[test]
    fn another_endpoints_certificate_or_ca_is_refused() {
        let ep = endpoint();
        let other = endpoint();
        let signed = ep.signer.sign(receipt(&ep.signer)).unwrap();
        assert!(matches!(
            signed.verify(&ServerTrust::Pinned(Thumbprint::of_der(&other.chain[0]))),
            Err(ReceiptError::PinMismatch { .. })
        ));
        assert!(matches!(
            signed.verify(&ServerTrust::Ca(vec![other.ca.cert_der()])),
            Err(ReceiptError::UntrustedEndpoint(_))
        ));
        // Swapping in the other endpoint's certificate: the thumbprint no longer
        // matches, and with it fixed too the signature fails.
        let mut swapped = signed.clone();
        swapped.receipt.endpoint_certificate = other.signer.certificate_pem().to_owned();
        assert!(matches!(
            swapped.verify_signature(),
            Err(ReceiptError::ThumbprintMismatch { .. })
        ));
        swapped.receipt.endpoint_thumbprint = other.signer.thumbprint().to_string();
        assert_eq!(swapped.verify_signature().unwrap_err(), ReceiptError::BadSignature);
        // An edge (client) certificate of the right CA is not an endpoint's: it cannot
        // be made a receipt signer, and a receipt it signed anyway (with its key, by
        // hand) does not verify under a CA or under a pin of its own thumbprint.
        let edge = ep.ca.issue_edge("edge-01", Validity::days(30)).unwrap();
        let err = ReceiptSigner::new(&[edge.cert_der()], &edge.key_der()).unwrap_err();
        assert!(err.to_string().contains("not for server authentication"), "{err}");
        let key = rustls::crypto::ring::sign::any_ecdsa_type(&edge.key_der()).unwrap();
        let signer = key.choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256]).unwrap();
        let mut forged = receipt(&ep.signer);
        forged.endpoint_certificate = pem_encode(&[edge.cert_der()]);
        forged.endpoint_thumbprint = Thumbprint::of_der(&edge.cert_der()).to_string();
        let by_edge = SignedReceipt {
            signature: base64::engine::general_purpose::STANDARD
                .encode(signer.sign(&forged.canonical_bytes()).unwrap()),
            receipt: forged,
        };
        for trust in [
            ServerTrust::Ca(vec![ep.ca.cert_der()]),
            ServerTrust::Pinned(Thumbprint::of_der(&edge.cert_der())),
        ] {
            assert!(
                matches!(by_edge.verify(&trust), Err(ReceiptError::NotAnEndpoint(_))),
                "{:?}",
                by_edge.verify(&trust)
            );
        }
    }

    #[test]
    fn a_key_of_another_certificate_cannot_sign() {
        let ep = endpoint();
        let other = ep.ca.issue_endpoint(&["other".into()], Validity::days(30)).unwrap();
        let err = ReceiptSigner::new(&ep.chain, &other.key_der()).unwrap_err();
        assert!(err.to_string().contains("do not match"), "{err}");
    }

    #[test]
    fn a_receipt_of_a_newer_format_is_named_as_such() {
        let ep = endpoint();
        let mut signed = ep.signer.sign(receipt(&ep.signer)).unwrap();
        signed.receipt.format_version = 4;
        let err = SignedReceipt::from_json(&signed.to_json()).unwrap_err();
        assert_eq!(err, ReceiptError::UnsupportedVersion(4));
        assert!(err.to_string().contains("it reads versions 1 to 3"), "{err}");
    }

    #[test]
    fn format_3_names_its_hash_and_format_2_still_parses_as_sha256() {
        let ep = endpoint();
        let current = ep.signer.sign(receipt(&ep.signer)).unwrap();
        let parsed = SignedReceipt::from_json(&current.to_json()).unwrap();
        assert_eq!(parsed.receipt.chunk_hash(), ChunkHash::Blake3);
        let canonical = String::from_utf8(current.receipt.canonical_bytes()).unwrap();
        assert!(canonical.contains(r#""chunk_hash":"blake3""#), "{canonical}");
        // Format 2, as an endpoint of protocol version 7 signed it: no chunk_hash, SHA-256.
        let mut v2 = receipt(&ep.signer);
        v2.format_version = 2;
        v2.chunk_hash = None;
        let signed = ep.signer.sign(v2).unwrap();
        let parsed = SignedReceipt::from_json(&signed.to_json()).unwrap();
        parsed.verify(&ServerTrust::Ca(vec![ep.ca.cert_der()])).unwrap();
        assert_eq!(parsed.receipt.chunk_hash(), ChunkHash::Sha256);
        // A hash named in format 2, missing or unknown in format 3: refused, never guessed.
        let mut v: serde_json::Value = serde_json::from_str(&signed.to_json()).unwrap();
        v["receipt"]["chunk_hash"] = "blake3".into();
        assert!(matches!(SignedReceipt::from_json(&v.to_string()),
            Err(ReceiptError::Malformed(m)) if m.contains("format 2 receipt has no chunk_hash")));
        let mut v: serde_json::Value = serde_json::from_str(&current.to_json()).unwrap();
        v["receipt"].as_object_mut().unwrap().remove("chunk_hash");
        assert!(matches!(SignedReceipt::from_json(&v.to_string()),
            Err(ReceiptError::Malformed(m)) if m.contains("lacks chunk_hash")));
        v["receipt"]["chunk_hash"] = "md5".into();
        assert!(matches!(SignedReceipt::from_json(&v.to_string()),
            Err(ReceiptError::Malformed(m)) if m.contains("not a hash this build knows")));
        // The hash's name is signed like every other field.
        let mut altered = current.clone();
        altered.receipt.chunk_hash = Some("sha256".into());
        assert_eq!(altered.verify_signature().unwrap_err(), ReceiptError::BadSignature);
    }
}
