//! NHS numbers: ten digits, the last a Modulus 11 check digit.
//!
//! ```
//! use careweave_protocol::NhsNumber;
//!
//! let nhs: NhsNumber = "999 000 0018".parse()?;
//! assert_eq!(nhs.to_string(), "999 000 0018");
//! assert_eq!(nhs.digits(), "9990000018");
//! assert!(nhs.is_test_range());
//! # Ok::<(), careweave_protocol::NhsNumberError>(())
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

// NHS numbers are grouped 3-3-4, as people read them.
#[allow(clippy::inconsistent_digit_grouping)]
/// Lowest number of the range set aside for synthetic and test data.
pub const TEST_RANGE_START: u64 = 999_000_0000;
#[allow(clippy::inconsistent_digit_grouping)]
/// Highest number of the range set aside for synthetic and test data.
pub const TEST_RANGE_END: u64 = 999_999_9999;

/// A valid NHS number, held as its ten digits.
///
/// Only a number whose check digit is right can be constructed, so every
/// `NhsNumber` in the system has passed the Modulus 11 check.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NhsNumber([u8; 10]);

/// Why a string is not a valid NHS number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NhsNumberError {
    #[error("NHS number contains {found:?}; only digits and spaces are allowed")]
    InvalidCharacter { found: char },
    #[error("NHS number has {digits} digits; it must have exactly 10")]
    WrongLength { digits: usize },
    #[error("NHS number stem {stem} has no valid check digit (Modulus 11 gives 10)")]
    NoValidCheckDigit { stem: String },
    #[error("NHS number check digit is {found}, but Modulus 11 gives {expected}")]
    WrongCheckDigit { found: u8, expected: u8 },
    #[error("NHS number {number} is outside the test range 999 000 0000 to 999 999 9999")]
    OutsideTestRange { number: NhsNumber },
}

/// The Modulus 11 check digit for nine stem digits, or `None` when the
/// algorithm gives 10 (such stems are never issued).
pub fn check_digit(stem: &[u8; 9]) -> Option<u8> {
    let sum: u32 = stem
        .iter()
        .zip((2..=10u32).rev())
        .map(|(digit, weight)| u32::from(*digit) * weight)
        .sum();
    match 11 - (sum % 11) {
        11 => Some(0),
        10 => None,
        digit => u8::try_from(digit).ok(),
    }
}

impl NhsNumber {
    /// Parses a number, accepting spaces anywhere (as people type `999 000 0018`).
    pub fn parse(input: &str) -> Result<Self, NhsNumberError> {
        let mut digits = [0u8; 10];
        let mut count = 0usize;
        for ch in input.chars() {
            match ch {
                ' ' => continue,
                '0'..='9' => {
                    if let Some(slot) = digits.get_mut(count) {
                        *slot = ch as u8 - b'0';
                    }
                    count += 1;
                }
                other => return Err(NhsNumberError::InvalidCharacter { found: other }),
            }
        }
        if count != 10 {
            return Err(NhsNumberError::WrongLength { digits: count });
        }
        Self::from_digits(digits)
    }

    /// Builds a number from ten digit values (each 0 to 9), checking the check digit.
    pub fn from_digits(digits: [u8; 10]) -> Result<Self, NhsNumberError> {
        if let Some(bad) = digits.iter().find(|d| **d > 9) {
            return Err(NhsNumberError::InvalidCharacter {
                found: char::from(b'0'.saturating_add(*bad)),
            });
        }
        let [s0, s1, s2, s3, s4, s5, s6, s7, s8, found] = digits;
        let stem = [s0, s1, s2, s3, s4, s5, s6, s7, s8];
        match check_digit(&stem) {
            None => Err(NhsNumberError::NoValidCheckDigit {
                stem: stem.iter().map(|d| char::from(b'0' + d)).collect(),
            }),
            Some(expected) if expected != found => {
                Err(NhsNumberError::WrongCheckDigit { found, expected })
            }
            Some(_) => Ok(Self(digits)),
        }
    }

    /// Completes a nine-digit stem (0 to 999 999 999) with its check digit.
    /// Returns `None` for stems that have no valid check digit, or are too large.
    pub fn from_stem(stem: u32) -> Option<Self> {
        if stem > 999_999_999 {
            return None;
        }
        let mut digits = [0u8; 10];
        let mut rest = stem;
        for slot in digits.iter_mut().take(9).rev() {
            *slot = u8::try_from(rest % 10).ok()?;
            rest /= 10;
        }
        let mut stem_digits = [0u8; 9];
        stem_digits.copy_from_slice(digits.get(..9)?);
        let check = check_digit(&stem_digits)?;
        *digits.get_mut(9)? = check;
        Some(Self(digits))
    }

    /// Parses and additionally requires the synthetic test range.
    pub fn parse_test(input: &str) -> Result<Self, NhsNumberError> {
        let number = Self::parse(input)?;
        number.require_test_range()
    }

    /// The number as an integer.
    pub fn value(&self) -> u64 {
        self.0.iter().fold(0u64, |acc, d| acc * 10 + u64::from(*d))
    }

    /// The ten digits with no spaces, the form that is stored and sent.
    pub fn digits(&self) -> String {
        self.0.iter().map(|d| char::from(b'0' + d)).collect()
    }

    /// Whether the number lies in 999 000 0000 to 999 999 9999, the range
    /// never issued to real people.
    pub fn is_test_range(&self) -> bool {
        (TEST_RANGE_START..=TEST_RANGE_END).contains(&self.value())
    }

    /// Returns the number if it is in the test range, else an error saying so.
    pub fn require_test_range(self) -> Result<Self, NhsNumberError> {
        if self.is_test_range() {
            Ok(self)
        } else {
            Err(NhsNumberError::OutsideTestRange { number: self })
        }
    }
}

impl FromStr for NhsNumber {
    type Err = NhsNumberError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Displays as 3-3-4 groups: `999 000 0018`.
impl fmt::Display for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.digits();
        let (a, rest) = d.split_at(3);
        let (b, c) = rest.split_at(3);
        write!(f, "{a} {b} {c}")
    }
}

/// Debug output hides the middle digits so a stray `{:?}` in a log does not
/// disclose a whole number.
impl fmt::Debug for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.digits();
        write!(
            f,
            "NhsNumber({}*****{})",
            d.get(..3).unwrap_or(""),
            d.get(8..).unwrap_or("")
        )
    }
}

impl Serialize for NhsNumber {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.digits())
    }
}

impl<'de> Deserialize<'de> for NhsNumber {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        // On the wire only the ten-digit form is allowed.
        if text.len() != 10 {
            return Err(serde::de::Error::custom(NhsNumberError::WrongLength {
                digits: text.chars().filter(char::is_ascii_digit).count(),
            }));
        }
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_valid_numbers_with_or_without_spaces() {
        let a = NhsNumber::parse("9990000018").unwrap();
        let b = NhsNumber::parse("999 000 0018").unwrap();
        let c = NhsNumber::parse(" 999  0000018 ").unwrap();
        assert_eq!(a, b);
        assert_eq!(b, c);
        assert_eq!(a.digits(), "9990000018");
        assert_eq!(a.to_string(), "999 000 0018");
    }

    #[test]
    fn check_digit_eleven_becomes_zero() {
        // 999 000 001: sum = 9*10 + 9*9 + 9*8 + 1*2 = 245; 245 mod 11 = 3 -> 8.
        assert_eq!(check_digit(&[9, 9, 9, 0, 0, 0, 0, 0, 1]), Some(8));
        // A stem whose sum is a multiple of 11 gets check digit 0.
        let stem = [9, 9, 9, 0, 0, 0, 0, 0, 0]; // 243 -> 243 mod 11 = 1 -> 10
        assert_eq!(check_digit(&stem), None);
        let stem = [9, 9, 9, 0, 0, 0, 0, 1, 2]; // 243 + 3 + 4 = 250 -> 8 -> 3
        assert_eq!(check_digit(&stem), Some(3));
        let zero = (0..=999_999_999u32)
            .step_by(7)
            .filter_map(NhsNumber::from_stem)
            .find(|n| n.digits().ends_with('0'))
            .unwrap();
        let mut digits = [0u8; 9];
        for (slot, ch) in digits.iter_mut().zip(zero.digits().bytes()) {
            *slot = ch - b'0';
        }
        assert_eq!(check_digit(&digits), Some(0));
    }

    #[test]
    fn rejects_wrong_check_digit() {
        assert_eq!(
            NhsNumber::parse("9990000019"),
            Err(NhsNumberError::WrongCheckDigit {
                found: 9,
                expected: 8
            })
        );
    }

    #[test]
    fn rejects_stem_with_check_value_ten() {
        assert!(matches!(
            NhsNumber::parse("9990000000"),
            Err(NhsNumberError::NoValidCheckDigit { .. })
        ));
    }

    #[test]
    fn rejects_wrong_length_and_characters() {
        assert_eq!(
            NhsNumber::parse("999000001"),
            Err(NhsNumberError::WrongLength { digits: 9 })
        );
        assert_eq!(
            NhsNumber::parse("99900000181"),
            Err(NhsNumberError::WrongLength { digits: 11 })
        );
        assert_eq!(
            NhsNumber::parse("999-000-0018"),
            Err(NhsNumberError::InvalidCharacter { found: '-' })
        );
        assert_eq!(
            NhsNumber::parse(""),
            Err(NhsNumberError::WrongLength { digits: 0 })
        );
        assert_eq!(
            NhsNumber::parse("９９９0000018"),
            Err(NhsNumberError::InvalidCharacter { found: '９' })
        );
    }

    #[test]
    fn test_range_is_enforced_on_request() {
        let inside = NhsNumber::parse_test("9990000018");
        assert!(inside.is_ok());
        // 000 000 001 9: a valid check digit outside the test range.
        let outside = NhsNumber::from_stem(1).unwrap();
        assert!(!outside.is_test_range());
        assert!(matches!(
            outside.require_test_range(),
            Err(NhsNumberError::OutsideTestRange { .. })
        ));
        assert!(NhsNumber::from_stem(998_999_999).is_none_or(|n| !n.is_test_range()));
    }

    #[test]
    fn debug_masks_the_middle() {
        let n = NhsNumber::parse("9990000018").unwrap();
        assert_eq!(format!("{n:?}"), "NhsNumber(999*****18)");
    }

    #[test]
    fn serde_uses_ten_digits_only() {
        let n = NhsNumber::parse("9990000018").unwrap();
        let bytes = serde_cbor::to_vec(&n).unwrap();
        assert_eq!(serde_cbor::from_slice::<NhsNumber>(&bytes).unwrap(), n);
        let spaced = serde_cbor::to_vec(&"999 000 0018").unwrap();
        assert!(serde_cbor::from_slice::<NhsNumber>(&spaced).is_err());
        let bad = serde_cbor::to_vec(&"9990000019").unwrap();
        assert!(serde_cbor::from_slice::<NhsNumber>(&bad).is_err());
    }

    proptest! {
        /// Every stem in the test range: the computed check digit is accepted
        /// and every other digit refused; stems whose check value is 10 refuse all.
        #[test]
        fn every_test_stem_check_digit(stem in 999_000_000u32..=999_999_999) {
            let mut stem_digits = [0u8; 9];
            let mut rest = stem;
            for slot in stem_digits.iter_mut().rev() {
                *slot = (rest % 10) as u8;
                rest /= 10;
            }
            let expected = check_digit(&stem_digits);
            for last in 0..=9u8 {
                let text = format!("{stem:09}{last}");
                let parsed = NhsNumber::parse(&text);
                if expected == Some(last) {
                    let n = parsed.unwrap();
                    prop_assert!(n.is_test_range());
                    prop_assert_eq!(n.digits(), text);
                } else {
                    prop_assert!(parsed.is_err());
                }
            }
        }

        #[test]
        fn parse_never_panics(s in ".{0,40}") {
            let _ = NhsNumber::parse(&s);
        }
    }

    #[test]
    fn exhaustive_check_of_a_slice_of_the_test_range() {
        // A full sweep of 100 000 consecutive stems, beside the random sample above.
        for stem in 999_000_000u32..999_100_000 {
            let n = NhsNumber::from_stem(stem);
            let mut accepted = 0;
            for last in 0..=9u8 {
                if NhsNumber::parse(&format!("{stem:09}{last}")).is_ok() {
                    accepted += 1;
                }
            }
            assert_eq!(accepted, usize::from(n.is_some()));
        }
    }
}
