//! Opening a node from its configuration: keys, store, audit log and the
//! trust files the config names.

use careweave_protocol::trust::TrustError;

use crate::config::LoadedConfig;
use crate::keys::{KeyFileError, NodeKeys};
use crate::node::{Node, NodeError};
use crate::store::{Store, StoreError};

/// Why a node could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("keys: {0}")]
    Keys(#[from] KeyFileError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("cannot read trust file {path}: {source}")]
    TrustFile {
        path: String,
        source: std::io::Error,
    },
}

/// Opens the node described by `loaded`. A root named in `[trust] root` is
/// installed when none is held; a list named in `[trust] list` is installed
/// when it is newer than the one held.
pub fn open_node(loaded: &LoadedConfig, now: u64) -> Result<Node, OpenError> {
    let keys = NodeKeys::load(&loaded.keys_dir())?;
    let store = Store::open(
        &loaded.store_dir(),
        loaded.config.store.cache_mb * 1024 * 1024,
    )?;
    let node = Node::new(loaded.config.clone(), keys, store, now)?;
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| OpenError::TrustFile {
            path: path.display().to_string(),
            source,
        })
    };
    if let Some(root) = &loaded.config.trust.root {
        let bytes = read(&loaded.resolve(root))?;
        match node.trust() {
            None => {
                node.install_root(&bytes, now)?;
            }
            // A rotated root dropped into the same file: take it if it is
            // the next version; the one already held is fine as it is.
            Some(_) => match node.install_root(&bytes, now) {
                Ok(_) | Err(NodeError::Trust(TrustError::RootVersionNotNext { .. })) => {}
                Err(e) => return Err(e.into()),
            },
        }
    }
    if let Some(list) = &loaded.config.trust.list
        && node.trust().is_some()
    {
        match node.install_list(&read(&loaded.resolve(list))?, now) {
            Ok(_)
            | Err(NodeError::Trust(TrustError::AlreadyHeld { .. } | TrustError::NotNewer { .. })) =>
                {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(node)
}
