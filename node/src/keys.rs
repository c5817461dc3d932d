//! The node's four Ed25519 keys, stored as PKCS#8 PEM files with mode 0600.
//!
//! Keys are created once by `careweave-node init` and never overwritten or
//! printed. A key file that other users can read is refused, as ssh does.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use careweave_protocol::trust::KeyUse;
use careweave_protocol::{KeyPair, OdsCode, PeerIdBytes};
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, spki::der::pem::LineEnding};

/// The key uses, each with its own file.
pub const KEY_USES: [KeyUse; 4] = [
    KeyUse::Transport,
    KeyUse::Message,
    KeyUse::Record,
    KeyUse::Log,
];

/// The file name for a key use.
pub fn file_name(key_use: KeyUse) -> &'static str {
    match key_use {
        KeyUse::Transport => "transport.pem",
        KeyUse::Message => "message.pem",
        KeyUse::Record => "record.pem",
        KeyUse::Log => "log.pem",
    }
}

/// The name of a key use as the trust list spells it.
pub fn use_name(key_use: KeyUse) -> &'static str {
    match key_use {
        KeyUse::Transport => "transport",
        KeyUse::Message => "message",
        KeyUse::Record => "record",
        KeyUse::Log => "log",
    }
}

/// Problems with key files.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("key file {0} already exists; careweave never overwrites keys")]
    Exists(PathBuf),
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} is readable by other users (mode {mode:o}); run chmod 600 on it")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("key file {path} is not an Ed25519 PKCS#8 PEM private key")]
    NotAKey { path: PathBuf },
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
}

/// The node's keys.
#[derive(Debug)]
pub struct NodeKeys {
    pub transport: KeyPair,
    pub message: KeyPair,
    pub record: KeyPair,
    pub log: KeyPair,
}

fn random_secret() -> Result<[u8; 32], KeyFileError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| KeyFileError::Random(e.to_string()))?;
    Ok(secret)
}

impl NodeKeys {
    /// Four fresh keys from the operating system's RNG.
    pub fn generate() -> Result<Self, KeyFileError> {
        Ok(Self {
            transport: KeyPair::from_secret_bytes(&random_secret()?),
            message: KeyPair::from_secret_bytes(&random_secret()?),
            record: KeyPair::from_secret_bytes(&random_secret()?),
            log: KeyPair::from_secret_bytes(&random_secret()?),
        })
    }

    /// The key for a use.
    pub fn get(&self, key_use: KeyUse) -> &KeyPair {
        match key_use {
            KeyUse::Transport => &self.transport,
            KeyUse::Message => &self.message,
            KeyUse::Record => &self.record,
            KeyUse::Log => &self.log,
        }
    }

    /// The node's libp2p PeerId.
    pub fn peer_id(&self) -> PeerIdBytes {
        self.transport.public_key().peer_id()
    }

    /// Writes the four files into `dir` (created with mode 0700). Refuses if
    /// any key file is already there, before writing anything.
    pub fn write_new(&self, dir: &Path) -> Result<(), KeyFileError> {
        for key_use in KEY_USES {
            let path = dir.join(file_name(key_use));
            if path.exists() {
                return Err(KeyFileError::Exists(path));
            }
        }
        fs::create_dir_all(dir).map_err(|source| KeyFileError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
            KeyFileError::Write {
                path: dir.to_path_buf(),
                source,
            }
        })?;
        for key_use in KEY_USES {
            write_key(&dir.join(file_name(key_use)), self.get(key_use))?;
        }
        Ok(())
    }

    /// Loads the four files from `dir`.
    pub fn load(dir: &Path) -> Result<Self, KeyFileError> {
        Ok(Self {
            transport: read_key(&dir.join(file_name(KeyUse::Transport)))?,
            message: read_key(&dir.join(file_name(KeyUse::Message)))?,
            record: read_key(&dir.join(file_name(KeyUse::Record)))?,
            log: read_key(&dir.join(file_name(KeyUse::Log)))?,
        })
    }

    /// The entry the coordinator adds to the members file: ODS, name,
    /// PeerId, addresses and every public key with its id. No secret.
    pub fn member_entry(&self, ods: &OdsCode, name: &str, addrs: &[String]) -> String {
        let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let mut out = String::new();
        out.push_str("[[member]]\n");
        out.push_str(&format!("ods = {}\n", quote(ods.as_str())));
        out.push_str(&format!("name = {}\n", quote(name)));
        out.push_str(&format!(
            "peer_id = {}\n",
            quote(&self.peer_id().to_base58())
        ));
        let addrs: Vec<String> = addrs.iter().map(|a| quote(a)).collect();
        out.push_str(&format!("addrs = [{}]\n", addrs.join(", ")));
        for key_use in KEY_USES {
            let pair = self.get(key_use);
            out.push_str(&format!(
                "keys.{} = {{ kid = \"{}\", public = \"{}\" }}\n",
                use_name(key_use),
                pair.kid(),
                hex::encode(pair.public_key().as_bytes())
            ));
        }
        out
    }
}

fn write_key(path: &Path, key: &KeyPair) -> Result<(), KeyFileError> {
    let signing = SigningKey::from_bytes(&key.secret_bytes());
    let pem = signing
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyFileError::Write {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => KeyFileError::Exists(path.to_path_buf()),
            _ => KeyFileError::Write {
                path: path.to_path_buf(),
                source,
            },
        })?;
    file.write_all(pem.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| KeyFileError::Write {
            path: path.to_path_buf(),
            source,
        })
}

fn read_key(path: &Path) -> Result<KeyPair, KeyFileError> {
    let read_err = |source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mode = fs::metadata(path).map_err(read_err)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let signing = SigningKey::from_pkcs8_pem(&text).map_err(|_| KeyFileError::NotAKey {
        path: path.to_path_buf(),
    })?;
    Ok(KeyPair::from_secret_bytes(&signing.to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let keys = NodeKeys::generate().unwrap();
        let kdir = dir.path().join("keys");
        keys.write_new(&kdir).unwrap();
        for key_use in KEY_USES {
            let path = kdir.join(file_name(key_use));
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{path:?}");
            let text = fs::read_to_string(&path).unwrap();
            assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"));
        }
        let loaded = NodeKeys::load(&kdir).unwrap();
        assert_eq!(loaded.message.kid(), keys.message.kid());
        assert_eq!(loaded.peer_id(), keys.peer_id());
        // Four different keys.
        let kids: std::collections::BTreeSet<_> =
            KEY_USES.iter().map(|u| loaded.get(*u).kid()).collect();
        assert_eq!(kids.len(), 4);
    }

    #[test]
    fn refuses_to_overwrite_keys() {
        let dir = tempfile::tempdir().unwrap();
        NodeKeys::generate().unwrap().write_new(dir.path()).unwrap();
        let before = fs::read(dir.path().join("message.pem")).unwrap();
        let err = NodeKeys::generate()
            .unwrap()
            .write_new(dir.path())
            .unwrap_err();
        assert!(matches!(err, KeyFileError::Exists(_)), "{err}");
        assert_eq!(fs::read(dir.path().join("message.pem")).unwrap(), before);
    }

    #[test]
    fn refuses_keys_others_can_read_and_files_that_are_not_keys() {
        let dir = tempfile::tempdir().unwrap();
        NodeKeys::generate().unwrap().write_new(dir.path()).unwrap();
        let path = dir.path().join("log.pem");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            NodeKeys::load(dir.path()),
            Err(KeyFileError::TooOpen { mode: 0o644, .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, "not a key").unwrap();
        assert!(matches!(
            NodeKeys::load(dir.path()),
            Err(KeyFileError::NotAKey { .. })
        ));
    }

    #[test]
    fn member_entry_has_public_parts_only() {
        let keys = NodeKeys::generate().unwrap();
        let entry = keys.member_entry(
            &OdsCode::parse("QHG").unwrap(),
            "NHS Bedfordshire, Luton and Milton Keynes ICB",
            &["/ip4/127.0.0.1/tcp/7000".to_owned()],
        );
        assert!(entry.contains(&keys.peer_id().to_base58()));
        assert!(entry.contains(&keys.record.kid().to_string()));
        assert!(!entry.contains(&hex::encode(keys.record.secret_bytes())));
        assert!(!entry.contains("PRIVATE"));
    }
}
