//! A small CA for the clinical API's mutual TLS: one CA per ICB (or per
//! testnet), server certificates for nodes, client certificates for
//! clinical systems carrying their ODS code and whether they may use the
//! admin endpoints.
//!
//! Client identity is in the certificate's subject alternative names as
//! URIs, `urn:careweave:ods:<ODS>` and `urn:careweave:role:<admin|clinical>`,
//! and in the subject (CN = system name, O = ODS code).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// CA certificates live five years; issued certificates one year.
pub const CA_DAYS: i64 = 5 * 365;
/// Lifetime of issued certificates.
pub const LEAF_DAYS: i64 = 365;

/// Problems making certificates.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{0} already exists; careweave-certs never overwrites keys or certificates")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

/// What an issued certificate is for.
#[derive(Debug, Clone)]
pub enum Leaf {
    Server {
        dns: Vec<String>,
        ips: Vec<std::net::IpAddr>,
    },
    Client {
        name: String,
        ods: careweave_protocol::OdsCode,
        admin: bool,
    },
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), CaError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => CaError::Exists(path.to_path_buf()),
            _ => CaError::Write {
                path: path.to_path_buf(),
                source,
            },
        })?;
    file.write_all(text.as_bytes())
        .map_err(|source| CaError::Write {
            path: path.to_path_buf(),
            source,
        })
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time_now();
    params.not_before = now;
    params.not_after = now + rcgen_days(days);
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn rcgen_days(days: i64) -> time::Duration {
    time::Duration::days(days)
}

/// Creates `ca.pem` and `ca.key` (mode 0600) in `dir`.
pub fn init(dir: &Path, name: &str) -> Result<(), CaError> {
    std::fs::create_dir_all(dir).map_err(|source| CaError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    for f in ["ca.pem", "ca.key"] {
        if dir.join(f).exists() {
            return Err(CaError::Exists(dir.join(f)));
        }
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "careweave clinical API");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, CA_DAYS);
    let cert = params.self_signed(&key)?;
    write_new(&dir.join("ca.key"), &key.serialize_pem(), 0o600)?;
    write_new(&dir.join("ca.pem"), &cert.pem(), 0o644)?;
    Ok(())
}

/// Issues a certificate from the CA in `ca_dir` into `out` as `cert.pem`
/// and `key.pem` (mode 0600).
pub fn issue(ca_dir: &Path, leaf: &Leaf, out: &Path) -> Result<(), CaError> {
    let read = |f: &str| {
        std::fs::read_to_string(ca_dir.join(f)).map_err(|source| CaError::Read {
            path: ca_dir.join(f),
            source,
        })
    };
    let ca_key = KeyPair::from_pem(&read("ca.key")?)?;
    let issuer = Issuer::from_ca_cert_pem(&read("ca.pem")?, ca_key)?;
    std::fs::create_dir_all(out).map_err(|source| CaError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    for f in ["cert.pem", "key.pem"] {
        if out.join(f).exists() {
            return Err(CaError::Exists(out.join(f)));
        }
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    match leaf {
        Leaf::Server { dns, ips } => {
            if dns.is_empty() && ips.is_empty() {
                return Err(CaError::Invalid(
                    "a server certificate needs --dns or --ip".into(),
                ));
            }
            dn.push(
                DnType::CommonName,
                dns.first()
                    .cloned()
                    .unwrap_or_else(|| ips.first().map(ToString::to_string).unwrap_or_default()),
            );
            for name in dns {
                params
                    .subject_alt_names
                    .push(SanType::DnsName(name.clone().try_into()?));
            }
            for ip in ips {
                params.subject_alt_names.push(SanType::IpAddress(*ip));
            }
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        }
        Leaf::Client { name, ods, admin } => {
            if name.trim().is_empty() {
                return Err(CaError::Invalid("--name is empty".into()));
            }
            dn.push(DnType::CommonName, name.clone());
            dn.push(DnType::OrganizationName, ods.as_str());
            params
                .subject_alt_names
                .push(SanType::URI(format!("urn:careweave:ods:{ods}").try_into()?));
            let role = if *admin { "admin" } else { "clinical" };
            params.subject_alt_names.push(SanType::URI(
                format!("urn:careweave:role:{role}").try_into()?,
            ));
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut params, LEAF_DAYS);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_new(&out.join("key.pem"), &key.serialize_pem(), 0o600)?;
    write_new(&out.join("cert.pem"), &cert.pem(), 0o644)?;
    Ok(())
}
