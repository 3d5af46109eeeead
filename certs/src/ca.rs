//! The gateway's private CA and the certificates it issues.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};

use crate::pem::{create_dir, first_cert_der, first_key_der, read, write_file, Secrecy};
use crate::{Error, Thumbprint};

/// Lifetime of a CA certificate. Long, because replacing the trust anchor means
/// redistributing it to every edge agent and endpoint.
const CA_DAYS: u32 = 3650;

/// Default lifetime of endpoint and edge certificates: the longest that common TLS clients
/// accept for a server certificate.
const LEAF_DAYS: u32 = 825;

const CA_HINT: &str = "create a CA with `certs ca --out DIR` or pass the directory that holds ca.pem and ca.key";

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// Valid for `days` days from now. Starts an hour ago, so a peer whose clock is a little
    /// behind does not reject a certificate that was just made.
    pub fn days(days: u32) -> Validity {
        let now = OffsetDateTime::now_utc();
        // Certificates carry whole seconds only.
        let now = now - Duration::nanoseconds(now.nanosecond().into());
        // RFC 5280 4.1.2.5: 9999-12-31 23:59:59 is the latest date a certificate can carry;
        // a larger --days means "does not expire" rather than an overflow.
        let latest = time::Date::from_calendar_date(9999, time::Month::December, 31)
            .and_then(|d| d.with_hms(23, 59, 59))
            .expect("9999-12-31 23:59:59 is a valid date and time")
            .assume_utc();
        let not_after = now
            .checked_add(Duration::days(days.into()))
            .map_or(latest, |t| t.min(latest));
        Validity {
            not_before: now - Duration::hours(1),
            not_after,
        }
    }
}

impl Default for Validity {
    /// 825 days, for endpoint and edge certificates (a CA always gets 10 years).
    fn default() -> Self {
        Validity::days(LEAF_DAYS)
    }
}

/// A certificate and its private key, both PEM (the key as PKCS#8).
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Issued {
    /// Thumbprint of the certificate.
    ///
    /// # Panics
    /// If `cert_pem` holds no certificate, which cannot happen for one made by [`Ca`].
    pub fn thumbprint(&self) -> Thumbprint {
        Thumbprint::of_der(&self.cert_der())
    }

    /// The certificate as DER.
    ///
    /// # Panics
    /// If `cert_pem` holds no certificate, which cannot happen for one made by [`Ca`].
    pub fn cert_der(&self) -> CertificateDer<'static> {
        first_cert_der(&self.cert_pem).expect("Issued::cert_pem holds no PEM certificate")
    }

    /// The private key as DER.
    ///
    /// # Panics
    /// If `key_pem` holds no private key, which cannot happen for one made by [`Ca`].
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        first_key_der(&self.key_pem).expect("Issued::key_pem holds no PEM private key")
    }

    /// Writes `<dir>/<stem>.pem` and `<dir>/<stem>.key` (key file mode 0600), creating `dir`;
    /// returns (cert path, key path).
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), Error> {
        create_dir(dir)?;
        let cert = write_file(&dir.join(format!("{stem}.pem")), &self.cert_pem, Secrecy::Public)?;
        let key = write_file(&dir.join(format!("{stem}.key")), &self.key_pem, Secrecy::Secret)?;
        Ok((cert, key))
    }
}

impl fmt::Debug for Issued {
    /// Leaves the private key out, so it never ends up in a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field(
                "thumbprint",
                &first_cert_der(&self.cert_pem).map(|d| Thumbprint::of_der(&d)),
            )
            .field("key_pem", &"[elided]")
            .finish()
    }
}

/// The gateway's private CA: the trust anchor of both endpoints and edge agents.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A new self-signed CA: ECDSA P-256, valid 10 years, may sign end-entity certificates
    /// only (path length 0).
    pub fn generate(common_name: &str) -> Result<Ca, Error> {
        if common_name.trim().is_empty() {
            return Err(Error::InvalidCa {
                origin: "the CA name".into(),
                reason: "the name is empty".into(),
            });
        }
        let key = new_key()?;
        let validity = Validity::days(CA_DAYS);
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key).map_err(|source| Error::Generate {
            what: "self-sign the CA certificate",
            source,
        })?;
        Ok(Ca {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its certificate and private key, both PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, Error> {
        Ca::from_pem_at(cert_pem, key_pem, "PEM input".into())
    }

    /// Loads `<dir>/ca.pem` and `<dir>/ca.key`.
    pub fn load(dir: &Path) -> Result<Ca, Error> {
        let origin = dir.display().to_string();
        let text = |name: &str, what| {
            let bytes = read(&dir.join(name), what, CA_HINT)?;
            String::from_utf8(bytes).map_err(|_| Error::InvalidCa {
                origin: origin.clone(),
                reason: format!("{name} is not PEM text"),
            })
        };
        let cert_pem = text("ca.pem", "CA certificate")?;
        let key_pem = text("ca.key", "CA private key")?;
        Ca::from_pem_at(&cert_pem, &key_pem, origin)
    }

    fn from_pem_at(cert_pem: &str, key_pem: &str, origin: String) -> Result<Ca, Error> {
        let invalid = |reason: String| Error::InvalidCa {
            origin: origin.clone(),
            reason,
        };
        let cert_der = first_cert_der(cert_pem).ok_or_else(|| invalid("no PEM certificate".into()))?;
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| invalid(format!("the key is not a usable PEM private key ({e})")))?;
        // The certificate embeds its SubjectPublicKeyInfo verbatim, so finding the key's SPKI
        // in it proves they belong together without a full X.509 parse.
        let spki = key.subject_public_key_info();
        if !cert_der.windows(spki.len()).any(|w| w == spki.as_slice()) {
            return Err(invalid("the key does not belong to the certificate".into()));
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| invalid(format!("cannot parse the certificate ({e})")))?;
        if !issuer.key_usages().contains(&KeyUsagePurpose::KeyCertSign) {
            return Err(invalid(
                "the certificate may not sign certificates (no keyCertSign key usage)".into(),
            ));
        }
        Ok(Ca {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            issuer,
        })
    }

    /// Writes `<dir>/ca.pem` and `<dir>/ca.key` (mode 0600), creating `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        create_dir(dir)?;
        write_file(&dir.join("ca.pem"), &self.cert_pem, Secrecy::Public)?;
        let key_pem = self.issuer.key().serialize_pem();
        write_file(&dir.join("ca.key"), &key_pem, Secrecy::Secret)?;
        Ok(())
    }

    /// The CA certificate as PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate as DER, for a trust store.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// Thumbprint of the CA certificate.
    pub fn thumbprint(&self) -> Thumbprint {
        Thumbprint::of_der(&self.cert_der)
    }

    /// Server certificate for a cloud endpoint. Each name is a DNS name or an IP address
    /// (v4/v6) and becomes a subject alternative name of that type; the first is the CN.
    pub fn issue_endpoint(&self, names: &[String], validity: Validity) -> Result<Issued, Error> {
        let first = names.first().ok_or(Error::NoNames)?;
        let sans = names.iter().map(|n| san(n)).collect::<Result<_, _>>()?;
        self.issue(first, sans, ExtendedKeyUsagePurpose::ServerAuth, validity)
    }

    /// Client certificate for an edge agent: CN = `name`, which is also its subject
    /// alternative name (DNS, or IP if `name` is an address).
    pub fn issue_edge(&self, name: &str, validity: Validity) -> Result<Issued, Error> {
        let sans = vec![san(name)?];
        self.issue(name, sans, ExtendedKeyUsagePurpose::ClientAuth, validity)
    }

    fn issue(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> Result<Issued, Error> {
        if validity.not_after <= validity.not_before {
            return Err(Error::InvalidValidity {
                not_before: validity.not_before,
                not_after: validity.not_after,
            });
        }
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn(common_name);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(&key, &self.issuer).map_err(|source| Error::Generate {
            what: "sign the certificate",
            source,
        })?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl fmt::Debug for Ca {
    /// Leaves the private key out, so it never ends up in a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("thumbprint", &self.thumbprint())
            .field("issuer", &self.issuer)
            .finish()
    }
}

fn new_key() -> Result<KeyPair, Error> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| Error::Generate {
        what: "generate an ECDSA P-256 key",
        source,
    })
}

/// 128 random bits: serial numbers must be unique per CA and unpredictable (CA/B BR 7.1).
fn random_serial() -> Result<SerialNumber, Error> {
    let mut bytes = [0u8; 16];
    SystemRandom::new().fill(&mut bytes).map_err(|_| Error::Generate {
        what: "draw a random serial number",
        source: rcgen::Error::RingUnspecified,
    })?;
    // A serial number is a positive INTEGER.
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

fn common_name_dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A subject alternative name: an IP address if `name` parses as one, else a DNS name,
/// checked with the same rules rustls applies to server names.
fn san(name: &str) -> Result<SanType, Error> {
    let invalid = || Error::InvalidName { name: name.to_owned() };
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    rustls_pki_types::DnsName::try_from(name).map_err(|_| invalid())?;
    Ok(SanType::DnsName(name.try_into().map_err(|_| invalid())?))
}
