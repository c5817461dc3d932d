//! Handing a trust list to a running node through its admin endpoint
//! (`POST /admin/trust-list`), over HTTPS with an admin client certificate.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Why publishing to a node failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0} is not an https://host:port address")]
    Url(String),
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("connection to {url}: {source}")]
    Io { url: String, source: std::io::Error },
    #[error("{url} refused the list: {status} {body}")]
    Refused {
        url: String,
        status: String,
        body: String,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, PublishError> {
    std::fs::read(path).map_err(|e| PublishError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// POSTs `list` to `url`'s admin endpoint; returns the node's answer.
pub fn to_node(
    url: &str,
    list: &[u8],
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<String, PublishError> {
    let host_port = url
        .strip_prefix("https://")
        .map(|r| r.trim_end_matches('/'))
        .ok_or_else(|| PublishError::Url(url.to_owned()))?;
    let (host, _) = host_port
        .rsplit_once(':')
        .ok_or_else(|| PublishError::Url(url.to_owned()))?;
    let tls = |e: &dyn std::fmt::Display| PublishError::Tls(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&read(ca)?) {
        roots.add(c.map_err(|e| tls(&e))?).map_err(|e| tls(&e))?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| tls(&e))?;
    let key = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| tls(&e))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls(&e))?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .map_err(|e| tls(&e))?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| tls(&e))?;
    let io = |source| PublishError::Io {
        url: url.to_owned(),
        source,
    };
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| tls(&e))?;
    let mut sock = TcpStream::connect(host_port).map_err(io)?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let mut stream = rustls::Stream::new(&mut conn, &mut sock);
    let head = format!(
        "POST /admin/trust-list HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/cose\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        list.len()
    );
    stream.write_all(head.as_bytes()).map_err(io)?;
    stream.write_all(list).map_err(io)?;
    stream.flush().map_err(io)?;
    let mut answer = Vec::new();
    let _ = stream.take(1024 * 1024).read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.lines().next().unwrap_or("").to_owned();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    if status.split(' ').nth(1) == Some("200") {
        Ok(body)
    } else {
        Err(PublishError::Refused {
            url: url.to_owned(),
            status,
            body,
        })
    }
}
