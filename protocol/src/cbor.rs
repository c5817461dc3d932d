//! Every CBOR encode and decode in careweave goes through this module.
//!
//! serde_cbor is unmaintained (RUSTSEC-2021-0127), so it only ever sees input
//! that this module has already walked and bounded: [`check_well_formed`]
//! refuses oversized input, nesting beyond the limit, too many items, lengths
//! that run past the end, indefinite lengths, non-minimal heads, duplicate map
//! keys, tags, floats and odd simple values, all without allocating more than
//! the input's size. Only then is serde_cbor asked to decode.
//!
//! ```
//! use careweave_protocol::cbor::{self, Limits};
//!
//! let bytes = cbor::encode(&vec![1u32, 2, 3])?;
//! let back: Vec<u32> = cbor::decode(&bytes, Limits::MESSAGE)?;
//! assert_eq!(back, [1, 2, 3]);
//! // A declared length longer than the input is refused before any allocation.
//! assert!(cbor::decode::<Vec<u8>>(&[0x5a, 0xff, 0xff, 0xff, 0xff], Limits::MESSAGE).is_err());
//! # Ok::<(), careweave_protocol::cbor::CborError>(())
//! ```

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use serde_cbor::Value;

/// Bounds applied to every decode.
///
/// Memory used while decoding is bounded by these limits: at most
/// `max_bytes + max_items * ALLOCATION_PER_ITEM` bytes beyond the input
/// itself, whatever the input (checked by `tests/allocation.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest input accepted, in bytes.
    pub max_bytes: usize,
    /// Deepest nesting of arrays and maps.
    pub max_depth: usize,
    /// Most data items in one input.
    pub max_items: usize,
}

impl Limits {
    /// Peer messages: requests and responses, including fetched records.
    pub const MESSAGE: Limits = Limits {
        max_bytes: 4 * 1024 * 1024,
        max_depth: 16,
        max_items: 50_000,
    };
    /// Trust roots and trust lists.
    pub const TRUST: Limits = Limits {
        max_bytes: 1024 * 1024,
        max_depth: 16,
        max_items: 100_000,
    };
    /// COSE protected headers.
    pub const HEADER: Limits = Limits {
        max_bytes: 4096,
        max_depth: 4,
        max_items: 64,
    };
}

/// Upper bound on the heap bytes one decoded data item may take.
pub const ALLOCATION_PER_ITEM: usize = 256;

/// Why bytes are not acceptable CBOR, or could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CborError {
    #[error("CBOR input is {len} bytes, over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("CBOR nesting deeper than {max} levels at byte {offset}")]
    TooDeep { max: usize, offset: usize },
    #[error("CBOR input has more than {max} data items")]
    TooManyItems { max: usize },
    #[error("CBOR input ends early at byte {offset}")]
    Truncated { offset: usize },
    #[error("CBOR input has {extra} bytes after the end of the item")]
    TrailingBytes { extra: usize },
    #[error("CBOR indefinite-length item at byte {offset} is not allowed")]
    IndefiniteLength { offset: usize },
    #[error("CBOR integer or length at byte {offset} is not in its shortest form")]
    NonMinimal { offset: usize },
    #[error("CBOR reserved additional information at byte {offset}")]
    Reserved { offset: usize },
    #[error("CBOR tag at byte {offset} is not allowed here")]
    TagNotAllowed { offset: usize },
    #[error("CBOR floating-point value at byte {offset} is not allowed")]
    FloatNotAllowed { offset: usize },
    #[error("CBOR simple value at byte {offset} is not allowed (only false, true, null)")]
    SimpleNotAllowed { offset: usize },
    #[error("CBOR map has a duplicate key at byte {offset}")]
    DuplicateKey { offset: usize },
    #[error("CBOR text string at byte {offset} is not valid UTF-8")]
    InvalidUtf8 { offset: usize },
    #[error("expected CBOR tag {expected}, found {found}")]
    WrongTag { expected: u64, found: String },
    #[error("CBOR does not have the expected shape: {0}")]
    Shape(String),
    #[error("could not encode CBOR: {0}")]
    Encode(String),
}

/// Encodes a value. serde_cbor writes every head in its shortest form and
/// struct fields in declaration order, so encoding is deterministic.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CborError> {
    serde_cbor::to_vec(value).map_err(|e| CborError::Encode(e.to_string()))
}

/// Encodes `value` with struct fields keyed by their position instead of
/// their name: for stored values, where the names would be repeated in every
/// one. [`decode`] reads both forms.
pub fn encode_packed<T: Serialize>(value: &T) -> Result<Vec<u8>, CborError> {
    serde_cbor::ser::to_vec_packed(value).map_err(|e| CborError::Encode(e.to_string()))
}

/// Checks the bytes against `limits` and decodes them into `T`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limits: Limits) -> Result<T, CborError> {
    check_well_formed(bytes, limits)?;
    serde_cbor::from_slice(bytes).map_err(|e| CborError::Shape(e.to_string()))
}

/// Checks the bytes against `limits` and decodes them into a generic value.
pub fn decode_value(bytes: &[u8], limits: Limits) -> Result<Value, CborError> {
    decode(bytes, limits)
}

/// Writes the head of a tag.
pub fn tag_head(tag: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    write_head(&mut out, 6, tag);
    out
}

/// Encodes a byte string head and contents, for building COSE's
/// `Sig_structure` around bytes exactly as they were received.
pub fn write_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    write_head(out, 2, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Encodes a text string head and contents.
pub fn write_text(out: &mut Vec<u8>, text: &str) {
    write_head(out, 3, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

/// Encodes an array head.
pub fn write_array_head(out: &mut Vec<u8>, len: usize) {
    write_head(out, 4, len as u64);
}

fn write_head(out: &mut Vec<u8>, major: u8, arg: u64) {
    let m = major << 5;
    if arg < 24 {
        out.push(m | arg as u8);
    } else if arg <= 0xff {
        out.push(m | 24);
        out.push(arg as u8);
    } else if arg <= 0xffff {
        out.push(m | 25);
        out.extend_from_slice(&(arg as u16).to_be_bytes());
    } else if arg <= 0xffff_ffff {
        out.push(m | 26);
        out.extend_from_slice(&(arg as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&arg.to_be_bytes());
    }
}

/// Removes the expected outer tag and returns the tagged item's bytes.
pub fn strip_tag(bytes: &[u8], expected: u64) -> Result<&[u8], CborError> {
    let head = tag_head(expected);
    match bytes.strip_prefix(head.as_slice()) {
        Some(rest) => Ok(rest),
        None => {
            let found = match bytes.first() {
                None => "nothing".to_owned(),
                Some(b) if b >> 5 == 6 => "another tag".to_owned(),
                Some(_) => "no tag".to_owned(),
            };
            Err(CborError::WrongTag { expected, found })
        }
    }
}

/// Walks the bytes and checks they hold exactly one acceptable data item.
pub fn check_well_formed(bytes: &[u8], limits: Limits) -> Result<(), CborError> {
    if bytes.len() > limits.max_bytes {
        return Err(CborError::TooLarge {
            len: bytes.len(),
            max: limits.max_bytes,
        });
    }
    let mut scanner = Scanner {
        bytes,
        pos: 0,
        items: 0,
        limits,
    };
    scanner.item(0)?;
    if scanner.pos != bytes.len() {
        return Err(CborError::TrailingBytes {
            extra: bytes.len() - scanner.pos,
        });
    }
    Ok(())
}

struct Scanner<'a> {
    bytes: &'a [u8],
    pos: usize,
    items: usize,
    limits: Limits,
}

impl Scanner<'_> {
    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    fn byte(&mut self) -> Result<u8, CborError> {
        let b = *self
            .bytes
            .get(self.pos)
            .ok_or(CborError::Truncated { offset: self.pos })?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&[u8], CborError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(CborError::Truncated { offset: self.pos })?;
        let slice = self
            .bytes
            .get(self.pos..end)
            .ok_or(CborError::Truncated { offset: self.pos })?;
        self.pos = end;
        Ok(slice)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], CborError> {
        let offset = self.pos;
        self.take(N)?
            .try_into()
            .map_err(|_| CborError::Truncated { offset })
    }

    /// Reads a head: major type, additional information, argument.
    fn head(&mut self) -> Result<(u8, u8, u64), CborError> {
        let offset = self.pos;
        let initial = self.byte()?;
        let major = initial >> 5;
        let info = initial & 0x1f;
        let arg = match info {
            0..=23 => u64::from(info),
            24 => {
                let v = u64::from(self.byte()?);
                // Simple values 24..=31 in one extra byte are also non-minimal.
                if v < 24 && major != 7 {
                    return Err(CborError::NonMinimal { offset });
                }
                v
            }
            25 => {
                let v = u64::from(u16::from_be_bytes(self.take_array()?));
                if v <= 0xff && major != 7 {
                    return Err(CborError::NonMinimal { offset });
                }
                v
            }
            26 => {
                let v = u64::from(u32::from_be_bytes(self.take_array()?));
                if v <= 0xffff && major != 7 {
                    return Err(CborError::NonMinimal { offset });
                }
                v
            }
            27 => {
                let v = u64::from_be_bytes(self.take_array()?);
                if v <= 0xffff_ffff && major != 7 {
                    return Err(CborError::NonMinimal { offset });
                }
                v
            }
            31 => return Err(CborError::IndefiniteLength { offset }),
            _ => return Err(CborError::Reserved { offset }),
        };
        Ok((major, info, arg))
    }

    /// A declared length, refused if it cannot fit in what is left, so no
    /// decoder ever reserves memory for bytes that are not there.
    fn length(&self, arg: u64, min_bytes_each: usize, offset: usize) -> Result<usize, CborError> {
        let len = usize::try_from(arg).map_err(|_| CborError::Truncated { offset })?;
        if len.saturating_mul(min_bytes_each) > self.remaining() {
            return Err(CborError::Truncated { offset });
        }
        Ok(len)
    }

    fn item(&mut self, depth: usize) -> Result<(), CborError> {
        self.items += 1;
        if self.items > self.limits.max_items {
            return Err(CborError::TooManyItems {
                max: self.limits.max_items,
            });
        }
        let offset = self.pos;
        let (major, info, arg) = self.head()?;
        match major {
            0 | 1 => Ok(()),
            2 => {
                let len = self.length(arg, 1, offset)?;
                self.take(len)?;
                Ok(())
            }
            3 => {
                let len = self.length(arg, 1, offset)?;
                let text = self.take(len)?;
                std::str::from_utf8(text).map_err(|_| CborError::InvalidUtf8 { offset })?;
                Ok(())
            }
            4 => {
                let len = self.length(arg, 1, offset)?;
                self.enter(depth, offset)?;
                for _ in 0..len {
                    self.item(depth + 1)?;
                }
                Ok(())
            }
            5 => {
                let len = self.length(arg, 2, offset)?;
                self.enter(depth, offset)?;
                let mut keys: Vec<&[u8]> = Vec::with_capacity(len);
                for _ in 0..len {
                    let start = self.pos;
                    self.item(depth + 1)?;
                    let key = self
                        .bytes
                        .get(start..self.pos)
                        .ok_or(CborError::Truncated { offset: start })?;
                    keys.push(key);
                    self.item(depth + 1)?;
                }
                keys.sort_unstable();
                if keys.windows(2).any(|pair| pair.first() == pair.last()) {
                    return Err(CborError::DuplicateKey { offset });
                }
                Ok(())
            }
            6 => Err(CborError::TagNotAllowed { offset }),
            _ => match info {
                20..=22 => Ok(()),
                25..=27 => Err(CborError::FloatNotAllowed { offset }),
                _ => Err(CborError::SimpleNotAllowed { offset }),
            },
        }
    }

    fn enter(&self, depth: usize, offset: usize) -> Result<(), CborError> {
        if depth + 1 > self.limits.max_depth {
            return Err(CborError::TooDeep {
                max: self.limits.max_depth,
                offset,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const L: Limits = Limits::MESSAGE;

    #[test]
    fn round_trips_plain_values() {
        let mut map = BTreeMap::new();
        map.insert("a".to_owned(), vec![1u64, 2, 300, 70_000, 5_000_000_000]);
        let bytes = encode(&map).unwrap();
        let back: BTreeMap<String, Vec<u64>> = decode(&bytes, L).unwrap();
        assert_eq!(back, map);
    }

    #[test]
    fn refuses_oversized_input_before_reading() {
        let limits = Limits { max_bytes: 8, ..L };
        let err = decode::<Value>(&[0x40; 9], limits).unwrap_err();
        assert_eq!(err, CborError::TooLarge { len: 9, max: 8 });
    }

    #[test]
    fn refuses_lengths_past_the_end() {
        // Byte string claiming 2^32 bytes, array claiming 2^64 - 1 items.
        for bytes in [
            &[0x5a, 0xff, 0xff, 0xff, 0xff, 0x00][..],
            &[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff][..],
            &[0xbb, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff][..],
            &[0x82, 0x01][..],
            &[0x18][..],
        ] {
            assert!(
                matches!(
                    check_well_formed(bytes, L),
                    Err(CborError::Truncated { .. })
                ),
                "{bytes:02x?}"
            );
        }
    }

    #[test]
    fn refuses_deep_nesting() {
        let mut bytes = vec![0x81; 17];
        bytes.push(0x00);
        assert!(matches!(
            check_well_formed(&bytes, L),
            Err(CborError::TooDeep { max: 16, .. })
        ));
        let mut ok = vec![0x81; 16];
        ok.push(0x00);
        assert!(check_well_formed(&ok, L).is_ok());
        // Deep maps too.
        let mut maps = vec![];
        for _ in 0..17 {
            maps.extend_from_slice(&[0xa1, 0x00]);
        }
        maps.push(0x00);
        assert!(matches!(
            check_well_formed(&maps, L),
            Err(CborError::TooDeep { .. })
        ));
    }

    #[test]
    fn refuses_too_many_items() {
        let limits = Limits { max_items: 3, ..L };
        assert!(check_well_formed(&[0x82, 0x01, 0x02], limits).is_ok());
        assert_eq!(
            check_well_formed(&[0x83, 0x01, 0x02, 0x03], limits),
            Err(CborError::TooManyItems { max: 3 })
        );
    }

    #[test]
    fn refuses_indefinite_lengths() {
        assert_eq!(
            check_well_formed(&[0x9f, 0xff], L),
            Err(CborError::IndefiniteLength { offset: 0 })
        );
        assert_eq!(
            check_well_formed(&[0x5f, 0x41, 0x00, 0xff], L),
            Err(CborError::IndefiniteLength { offset: 0 })
        );
    }

    #[test]
    fn refuses_non_minimal_heads() {
        for bytes in [
            &[0x18, 0x05][..],
            &[0x19, 0x00, 0x05][..],
            &[0x1a, 0x00, 0x00, 0x01, 0x00][..],
            &[0x1b, 0, 0, 0, 0, 0, 1, 0, 0][..],
            &[0x58, 0x01, 0xaa][..],
        ] {
            assert_eq!(
                check_well_formed(bytes, L),
                Err(CborError::NonMinimal { offset: 0 }),
                "{bytes:02x?}"
            );
        }
    }

    #[test]
    fn refuses_duplicate_keys() {
        // {1: 0, 1: 0}
        assert_eq!(
            check_well_formed(&[0xa2, 0x01, 0x00, 0x01, 0x00], L),
            Err(CborError::DuplicateKey { offset: 0 })
        );
        assert!(check_well_formed(&[0xa2, 0x01, 0x00, 0x02, 0x00], L).is_ok());
    }

    #[test]
    fn refuses_tags_floats_and_odd_simple_values() {
        assert!(matches!(
            check_well_formed(&[0xc1, 0x00], L),
            Err(CborError::TagNotAllowed { .. })
        ));
        assert!(matches!(
            check_well_formed(&[0xf9, 0x3c, 0x00], L),
            Err(CborError::FloatNotAllowed { .. })
        ));
        assert!(matches!(
            check_well_formed(&[0xf7], L),
            Err(CborError::SimpleNotAllowed { .. })
        ));
        assert!(matches!(
            check_well_formed(&[0xf8, 0x20], L),
            Err(CborError::SimpleNotAllowed { .. })
        ));
        for ok in [0xf4, 0xf5, 0xf6] {
            assert!(check_well_formed(&[ok], L).is_ok());
        }
    }

    #[test]
    fn refuses_bad_utf8_and_trailing_bytes() {
        assert!(matches!(
            check_well_formed(&[0x62, 0xc3, 0x28], L),
            Err(CborError::InvalidUtf8 { .. })
        ));
        assert_eq!(
            check_well_formed(&[0x01, 0x02], L),
            Err(CborError::TrailingBytes { extra: 1 })
        );
        assert!(matches!(
            check_well_formed(&[], L),
            Err(CborError::Truncated { offset: 0 })
        ));
    }

    #[test]
    fn strip_tag_checks_the_number() {
        assert_eq!(strip_tag(&[0xd2, 0x80], 18).unwrap(), &[0x80]);
        assert_eq!(strip_tag(&[0xd8, 0x62, 0x80], 98).unwrap(), &[0x80]);
        assert!(matches!(
            strip_tag(&[0xd8, 0x62, 0x80], 18),
            Err(CborError::WrongTag { expected: 18, .. })
        ));
        assert!(strip_tag(&[0x80], 18).is_err());
        assert!(strip_tag(&[], 18).is_err());
    }

    #[test]
    fn head_writer_is_minimal() {
        for n in [
            0u64,
            23,
            24,
            255,
            256,
            65_535,
            65_536,
            4_294_967_295,
            4_294_967_296,
        ] {
            let mut out = vec![];
            write_head(&mut out, 0, n);
            let back: u64 = decode(&out, L).unwrap();
            assert_eq!(back, n);
        }
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_value(&bytes, L);
        }

        #[test]
        fn encode_then_decode_is_identity(
            map in proptest::collection::btree_map(".{0,8}", proptest::collection::vec(any::<u64>(), 0..8), 0..8)
        ) {
            let bytes = encode(&map).unwrap();
            let back: BTreeMap<String, Vec<u64>> = decode(&bytes, L).unwrap();
            prop_assert_eq!(back, map);
        }
    }
}
