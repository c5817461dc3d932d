//! The careweave node, everything but the network: configuration, keys, the
//! store (sled and audit segment files), FHIR import, policy, the audit log and request handling.
//!
//! The peer plane (`careweave-node run`) and the clinical HTTPS API call into
//! what this crate provides.

#![forbid(unsafe_code)]

pub mod allocator;
pub mod api;
pub mod audit;
pub mod config;
pub mod daemon;
pub mod fhir;
mod group_commit;
pub mod import;
pub mod keys;
pub mod net;
pub mod node;
pub mod opening;
pub mod pointers;
pub mod policy;
mod segments;
pub mod sharing;
pub mod store;
pub mod strikes;
pub mod transparency;
