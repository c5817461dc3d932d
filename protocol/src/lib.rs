//! careweave's protocol: the identifiers, encodings, signed messages, trust
//! documents and audit proofs that every careweave node and tool shares.
//!
//! The crate does no I/O and reads no clock or randomness of its own: callers
//! hand it the time, random bytes and received bytes, so every rule here can
//! be unit-tested and fuzzed deterministically.
//!
//! | module | what it holds |
//! |---|---|
//! | [`nhs`], [`ods`], [`keys`] | NHS numbers, ODS codes, Ed25519 keys, key ids, PeerIds |
//! | [`cbor`] | the only place CBOR is encoded or decoded, with size and nesting limits |
//! | [`cose`] | COSE_Sign1 and COSE_Sign in careweave's profile |
//! | [`message`] | locate, fetch, trust pull and error payloads |
//! | [`envelope`] | sealing and opening signed peer messages, checks in order |
//! | [`record`] | custodian-signed FHIR records |
//! | [`trust`] | trust roots and lists: building, signing, acceptance, look-ups |
//! | [`audit`] | RFC 6962 Merkle proofs and signed checkpoints |
//! | [`civil`] | calendar dates as day numbers, for what people type and read |
//!
//! The normative description of the wire formats is `docs/protocol.md`.

#![forbid(unsafe_code)]

pub mod audit;
pub mod cbor;
pub mod civil;
pub mod cose;
pub mod envelope;
pub mod keys;
pub mod message;
pub mod nhs;
pub mod ods;
pub mod record;
pub mod trust;

pub use keys::{KeyId, KeyPair, PeerIdBytes, PublicKey};
pub use nhs::{NhsNumber, NhsNumberError};
pub use ods::{OdsCode, OdsCodeError};
