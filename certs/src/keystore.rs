//! Root and list signing keys, stored only encrypted with a passphrase
//! (PKCS#8 `ENCRYPTED PRIVATE KEY`, PBES2), mode 0600, never overwritten.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use careweave_protocol::KeyPair;
use ed25519_dalek::SigningKey;
use pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};

/// The environment variable a passphrase may come from, for automation.
pub const PASSPHRASE_ENV: &str = "CAREWEAVE_PASSPHRASE";
/// Shortest passphrase accepted.
pub const MIN_PASSPHRASE: usize = 12;

/// Problems with signing key files.
#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    #[error("key file {0} already exists; careweave-certs never overwrites keys")]
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
    #[error(
        "key file {0} could not be decrypted: wrong passphrase, or not an encrypted Ed25519 key"
    )]
    Decrypt(PathBuf),
    #[error("could not encrypt the key: {0}")]
    Encrypt(String),
    #[error("the passphrase is shorter than {MIN_PASSPHRASE} characters")]
    WeakPassphrase,
    #[error("no passphrase: set {PASSPHRASE_ENV} or run on a terminal to be asked")]
    NoPassphrase,
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
}

/// Where passphrases come from.
#[derive(Debug, Clone)]
pub enum Passphrase {
    /// From an environment variable.
    Env(String),
    /// Asked on the terminal.
    Prompt,
}

impl Passphrase {
    /// The environment variable if set, else the terminal.
    pub fn from_env_or_prompt() -> Self {
        match std::env::var(PASSPHRASE_ENV) {
            Ok(p) => Passphrase::Env(p),
            Err(_) => Passphrase::Prompt,
        }
    }

    /// Reads the passphrase, asking with `prompt` on the terminal if needed;
    /// `confirm` asks twice (for new keys).
    pub fn read(&self, prompt: &str, confirm: bool) -> Result<String, KeystoreError> {
        let value = match self {
            Passphrase::Env(p) => p.clone(),
            Passphrase::Prompt => {
                let first =
                    rpassword::prompt_password(prompt).map_err(|_| KeystoreError::NoPassphrase)?;
                if confirm {
                    let second = rpassword::prompt_password("Again: ")
                        .map_err(|_| KeystoreError::NoPassphrase)?;
                    if first != second {
                        return Err(KeystoreError::NoPassphrase);
                    }
                }
                first
            }
        };
        if value.chars().count() < MIN_PASSPHRASE {
            return Err(KeystoreError::WeakPassphrase);
        }
        Ok(value)
    }
}

/// A fresh key from the operating system's RNG.
pub fn generate() -> Result<KeyPair, KeystoreError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| KeystoreError::Random(e.to_string()))?;
    Ok(KeyPair::from_secret_bytes(&secret))
}

/// Writes a key encrypted under the passphrase, refusing to overwrite.
pub fn write(path: &Path, key: &KeyPair, passphrase: &str) -> Result<(), KeystoreError> {
    let pem = SigningKey::from_bytes(&key.secret_bytes())
        .to_pkcs8_encrypted_pem(passphrase, LineEnding::LF)
        .map_err(|e| KeystoreError::Encrypt(e.to_string()))?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => KeystoreError::Exists(path.to_path_buf()),
            _ => KeystoreError::Write {
                path: path.to_path_buf(),
                source,
            },
        })?;
    file.write_all(pem.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| KeystoreError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// Reads and decrypts a key.
pub fn read(path: &Path, passphrase: &str) -> Result<KeyPair, KeystoreError> {
    let pem = std::fs::read_to_string(path).map_err(|source| KeystoreError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let key = SigningKey::from_pkcs8_encrypted_pem(&pem, passphrase)
        .map_err(|_| KeystoreError::Decrypt(path.to_path_buf()))?;
    Ok(KeyPair::from_secret_bytes(&key.to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stored_encrypted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        let key = generate().unwrap();
        write(&path, &key, "correct horse battery").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            read(&path, "correct horse battery").unwrap().kid(),
            key.kid()
        );
        assert!(matches!(
            read(&path, "wrong horse battery"),
            Err(KeystoreError::Decrypt(_))
        ));
        assert!(matches!(
            write(&path, &key, "correct horse battery"),
            Err(KeystoreError::Exists(_))
        ));
    }

    #[test]
    fn short_passphrases_are_refused() {
        assert!(matches!(
            Passphrase::Env("short".into()).read("", false),
            Err(KeystoreError::WeakPassphrase)
        ));
    }
}
