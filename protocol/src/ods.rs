//! ODS codes: the Organisation Data Service codes that name NHS organisations.
//!
//! ICB codes made in 2022 have three characters (`QE1`); those made by the
//! April 2026 merges have five, so no code assumes a fixed length.
//!
//! ```
//! use careweave_protocol::OdsCode;
//!
//! let ods: OdsCode = "QE1".parse()?;
//! assert_eq!(ods.as_str(), "QE1");
//! assert!("qe1".parse::<OdsCode>().is_err());
//! # Ok::<(), careweave_protocol::OdsCodeError>(())
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Shortest ODS code accepted.
pub const MIN_LEN: usize = 3;
/// Longest ODS code accepted.
pub const MAX_LEN: usize = 6;

/// An ODS code: 3 to 6 characters, uppercase letters and digits.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OdsCode(String);

/// Why a string is not an ODS code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OdsCodeError {
    #[error("ODS code has {len} characters; it must have 3 to 6")]
    WrongLength { len: usize },
    #[error("ODS code contains {found:?}; only uppercase letters A-Z and digits 0-9 are allowed")]
    InvalidCharacter { found: char },
}

impl OdsCode {
    /// Checks and wraps a code. Lowercase is refused rather than folded, so a
    /// code is compared exactly as the trust list spells it.
    pub fn parse(input: &str) -> Result<Self, OdsCodeError> {
        if let Some(found) = input
            .chars()
            .find(|c| !(c.is_ascii_uppercase() || c.is_ascii_digit()))
        {
            return Err(OdsCodeError::InvalidCharacter { found });
        }
        let len = input.len();
        if !(MIN_LEN..=MAX_LEN).contains(&len) {
            return Err(OdsCodeError::WrongLength { len });
        }
        Ok(Self(input.to_owned()))
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for OdsCode {
    type Err = OdsCodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for OdsCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for OdsCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OdsCode({})", self.0)
    }
}

impl Serialize for OdsCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for OdsCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_three_to_six_uppercase_alphanumerics() {
        for code in ["QE1", "QWO", "Q1A2B", "ABCDEF", "123"] {
            assert_eq!(OdsCode::parse(code).unwrap().as_str(), code);
        }
    }

    #[test]
    fn refuses_bad_codes_with_reasons() {
        assert_eq!(
            OdsCode::parse("Q1"),
            Err(OdsCodeError::WrongLength { len: 2 })
        );
        assert_eq!(
            OdsCode::parse("ABCDEFG"),
            Err(OdsCodeError::WrongLength { len: 7 })
        );
        assert_eq!(
            OdsCode::parse(""),
            Err(OdsCodeError::WrongLength { len: 0 })
        );
        assert_eq!(
            OdsCode::parse("qe1"),
            Err(OdsCodeError::InvalidCharacter { found: 'q' })
        );
        assert_eq!(
            OdsCode::parse("QE 1"),
            Err(OdsCodeError::InvalidCharacter { found: ' ' })
        );
        assert_eq!(
            OdsCode::parse("QÉ1"),
            Err(OdsCodeError::InvalidCharacter { found: 'É' })
        );
    }

    #[test]
    fn serde_checks_on_the_way_in() {
        let bytes = serde_cbor::to_vec(&"qe1").unwrap();
        assert!(serde_cbor::from_slice::<OdsCode>(&bytes).is_err());
        let bytes = serde_cbor::to_vec(&OdsCode::parse("QE1").unwrap()).unwrap();
        assert_eq!(
            serde_cbor::from_slice::<OdsCode>(&bytes).unwrap().as_str(),
            "QE1"
        );
    }
}
