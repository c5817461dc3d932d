//! careweave-testnet: whole careweave networks on one machine, for testers
//! and newcomers. Real node processes, real keys, a real co-signed trust
//! list, real mutual TLS, synthetic patients.

#![forbid(unsafe_code)]

pub mod bench;
pub mod data;
pub mod floor;
pub mod scenarios;
pub mod setup;
pub mod soak;
