//! careweave-certs: the national coordinator's trust tooling (roots, lists,
//! co-signing) and a small CA for the clinical API's mutual TLS.

#![forbid(unsafe_code)]

pub mod ca;
pub mod keystore;
pub mod members;
pub mod publish;
pub mod time;
