//! SHA-256 certificate thumbprints, formatted the way vSphere shows them.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// SHA-256 of a certificate's DER encoding.
///
/// Displays as 32 uppercase hex bytes separated by colons (`AA:BB:...`, 95 characters), the
/// form vSphere and `openssl x509 -fingerprint -sha256` show.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Thumbprint([u8; 32]);

impl Thumbprint {
    /// Thumbprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Thumbprint {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        Thumbprint(bytes)
    }

    /// The 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl From<[u8; 32]> for Thumbprint {
    fn from(bytes: [u8; 32]) -> Self {
        Thumbprint(bytes)
    }
}

impl fmt::Display for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{byte:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Thumbprint({self})")
    }
}

impl FromStr for Thumbprint {
    type Err = Error;

    /// Accepts `AA:BB:...` or `aabb...` (any case), optionally prefixed with `sha256:`.
    fn from_str(input: &str) -> Result<Self, Error> {
        let invalid = || Error::InvalidThumbprint {
            input: input.to_owned(),
        };
        let trimmed = input.trim();
        let hex = match trimmed.get(..7) {
            Some(prefix) if prefix.eq_ignore_ascii_case("sha256:") => &trimmed[7..],
            _ => trimmed,
        };
        // With colons, every byte must be exactly two digits, so "A:BBB..." is rejected
        // rather than silently re-grouped.
        let pairs: Vec<&str> = if hex.contains(':') {
            hex.split(':').collect()
        } else if hex.len() == 64 && hex.is_ascii() {
            (0..32).map(|i| &hex[2 * i..2 * i + 2]).collect()
        } else {
            return Err(invalid());
        };
        if pairs.len() != 32 {
            return Err(invalid());
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(pairs) {
            if pair.len() != 2 || !pair.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid());
            }
            *byte = u8::from_str_radix(pair, 16).map_err(|_| invalid())?;
        }
        Ok(Thumbprint(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Thumbprint {
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(0xa0);
        }
        Thumbprint(bytes)
    }

    #[test]
    fn display_is_uppercase_colon_form() {
        let text = sample().to_string();
        assert_eq!(text.len(), 95);
        assert!(text.starts_with("A0:C5:EA:0F:"), "{text}");
        assert!(!text.chars().any(|c| c.is_ascii_lowercase()));
        assert_eq!(format!("{:?}", sample()), format!("Thumbprint({text})"));
    }

    #[test]
    fn parse_round_trips_in_every_accepted_form() {
        let t = sample();
        let colon = t.to_string();
        let bare: String = colon.replace(':', "");
        for form in [
            colon.clone(),
            colon.to_lowercase(),
            bare.clone(),
            bare.to_lowercase(),
            format!("sha256:{colon}"),
            format!("SHA256:{bare}"),
            format!("  {colon}\n"),
        ] {
            assert_eq!(form.parse::<Thumbprint>().unwrap(), t, "{form}");
        }
    }

    #[test]
    fn parse_rejects_malformed_input_with_a_clear_message() {
        let colon = sample().to_string();
        for bad in [
            String::new(),
            colon[..colon.len() - 3].to_owned(),          // 31 bytes
            format!("{colon}:00"),                        // 33 bytes
            colon.replacen("A0", "G0", 1),                // not hex
            colon.replacen("A0:C5", "A:0C5", 1),          // misgrouped
            colon.replace(':', "").replacen('A', "é", 1), // non-ASCII
            format!("sha1:{colon}"),
            "+0".repeat(32),
        ] {
            let err = bad.parse::<Thumbprint>().unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("64 hex digits") && msg.contains("32 bytes"), "{msg}");
        }
    }

    #[test]
    fn of_der_is_sha256() {
        // SHA-256("abc") from FIPS 180-2.
        assert_eq!(
            Thumbprint::of_der(b"abc").to_string().replace(':', ""),
            "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD"
        );
    }
}
