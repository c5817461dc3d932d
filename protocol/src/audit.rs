//! Audit log proofs: an RFC 6962 / RFC 9162 Merkle tree over audit entries,
//! inclusion and consistency proofs, and checkpoints signed by a node's log key.
//!
//! Everything here is a pure function over hashes, so an auditor can check a
//! node's proofs without the node.
//!
//! ```
//! use careweave_protocol::audit::{leaf_hash, root, inclusion_proof, verify_inclusion};
//!
//! let leaves: Vec<_> = (0u8..7).map(|i| leaf_hash(&[i])).collect();
//! let tree_root = root(&leaves);
//! let proof = inclusion_proof(&leaves, 3)?;
//! verify_inclusion(&leaves[3], 3, 7, &proof, &tree_root)?;
//! # Ok::<(), careweave_protocol::audit::ProofError>(())
//! ```

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cbor::{self, CborError, Limits};
use crate::cose::{Claims, CoseError, ProtectedHeader, Sign1};
use crate::keys::{KeyPair, PublicKey};
use crate::ods::OdsCode;
use crate::trust::{AcceptedList, KeyLookupError, KeyUse};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// Content type of a signed checkpoint.
pub const CHECKPOINT_CONTENT_TYPE: &str = "application/careweave-checkpoint+cbor";
/// Longest proof accepted (a tree of 2^64 leaves needs at most 64 hashes,
/// a consistency proof one more).
pub const MAX_PROOF_LEN: usize = 65;

/// Why a proof could not be made or did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("leaf index {index} is outside a tree of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("old tree size {old} is larger than new size {new}")]
    SizesOutOfOrder { old: u64, new: u64 },
    #[error("proof has the wrong number of hashes")]
    WrongLength,
    #[error("proof does not lead to the expected root")]
    RootMismatch,
}

/// Hash of a leaf: `SHA-256(0x00 || entry)`.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(entry);
    h.finalize().into()
}

/// Hash of an interior node: `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two strictly less than `n` (for `n >= 2`).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// The Merkle tree hash of a list of leaf hashes. The empty tree's hash is
/// `SHA-256("")`.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves {
        [] => Sha256::digest(b"").into(),
        [only] => *only,
        _ => {
            let (left, right) = leaves.split_at(split(leaves.len()));
            node_hash(&root(left), &root(right))
        }
    }
}

/// The audit path for leaf `index` (RFC 9162 §2.1.3.1).
pub fn inclusion_proof(leaves: &[Hash], index: u64) -> Result<Vec<Hash>, ProofError> {
    let size = leaves.len() as u64;
    let m = usize::try_from(index)
        .ok()
        .filter(|m| *m < leaves.len())
        .ok_or(ProofError::IndexOutOfRange { index, size })?;
    let mut proof = Vec::new();
    path(m, leaves, &mut proof);
    Ok(proof)
}

fn path(m: usize, leaves: &[Hash], out: &mut Vec<Hash>) {
    if leaves.len() <= 1 {
        return;
    }
    let k = split(leaves.len());
    let (left, right) = leaves.split_at(k);
    if m < k {
        path(m, left, out);
        out.push(root(right));
    } else {
        path(m - k, right, out);
        out.push(root(left));
    }
}

/// The consistency proof between the first `old_size` leaves and all of
/// them (RFC 9162 §2.1.4.1).
pub fn consistency_proof(leaves: &[Hash], old_size: u64) -> Result<Vec<Hash>, ProofError> {
    let new = leaves.len() as u64;
    if old_size > new {
        return Err(ProofError::SizesOutOfOrder { old: old_size, new });
    }
    let mut proof = Vec::new();
    if old_size == 0 || old_size == new {
        return Ok(proof);
    }
    let m = usize::try_from(old_size).map_err(|_| ProofError::WrongLength)?;
    subproof(m, leaves, true, &mut proof);
    Ok(proof)
}

fn subproof(m: usize, leaves: &[Hash], complete: bool, out: &mut Vec<Hash>) {
    let n = leaves.len();
    if m == n {
        if !complete {
            out.push(root(leaves));
        }
        return;
    }
    let k = split(n);
    let (left, right) = leaves.split_at(k);
    if m <= k {
        subproof(m, left, complete, out);
        out.push(root(right));
    } else {
        subproof(m - k, right, false, out);
        out.push(root(left));
    }
}

/// Checks that `leaf` is at `index` in the tree of `size` leaves with `root`
/// (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    expected_root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    if proof.len() > MAX_PROOF_LEN {
        return Err(ProofError::WrongLength);
    }
    let mut f = index;
    let mut s = size - 1;
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return Err(ProofError::WrongLength);
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(ProofError::WrongLength);
    }
    if &r != expected_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Checks that the tree of `new_size` with `new_root` extends the tree of
/// `old_size` with `old_root`: the log only grew (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::SizesOutOfOrder {
            old: old_size,
            new: new_size,
        });
    }
    if proof.len() > MAX_PROOF_LEN {
        return Err(ProofError::WrongLength);
    }
    if old_size == new_size {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength);
        }
        return if old_root == new_root {
            Ok(())
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    if old_size == 0 {
        // Every tree extends the empty tree.
        return if proof.is_empty() {
            Ok(())
        } else {
            Err(ProofError::WrongLength)
        };
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let mut f = old_size - 1;
    let mut s = new_size - 1;
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let mut items = path.iter();
    let first = items.next().ok_or(ProofError::WrongLength)?;
    let mut fr = *first;
    let mut sr = *first;
    for c in items {
        if s == 0 {
            return Err(ProofError::WrongLength);
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(ProofError::WrongLength);
    }
    if &fr != old_root || &sr != new_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// The right edge of a Merkle tree: the roots of its perfect subtrees,
/// largest first. Appending and computing the root need only these, so a
/// log can grow without rereading its entries.
///
/// ```
/// use careweave_protocol::audit::{CompactRange, leaf_hash, root};
///
/// let leaves: Vec<_> = (0u8..11).map(|i| leaf_hash(&[i])).collect();
/// let mut range = CompactRange::default();
/// for leaf in &leaves {
///     range.append(*leaf);
/// }
/// assert_eq!(range.root(), root(&leaves));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactRange {
    size: u64,
    /// (height, hash) of each perfect subtree, left to right.
    peaks: Vec<(u32, Hash)>,
}

impl CompactRange {
    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Adds one leaf hash.
    pub fn append(&mut self, leaf: Hash) {
        let mut node = (0u32, leaf);
        while let Some(&(height, left)) = self.peaks.last() {
            if height != node.0 {
                break;
            }
            self.peaks.pop();
            node = (height + 1, node_hash(&left, &node.1));
        }
        self.peaks.push(node);
        self.size += 1;
    }

    /// The peaks' hashes, largest subtree first: with the size, all that
    /// is needed to carry on appending later.
    pub fn peak_hashes(&self) -> Vec<Hash> {
        self.peaks.iter().map(|(_, hash)| *hash).collect()
    }

    /// Rebuilds a range from its size and [`CompactRange::peak_hashes`].
    /// `None` when the number of hashes does not fit the size (one peak per
    /// set bit of the size).
    pub fn from_peaks(size: u64, hashes: &[Hash]) -> Option<Self> {
        let heights: Vec<u32> = (0..u64::BITS)
            .rev()
            .filter(|bit| size & (1 << bit) != 0)
            .collect();
        if heights.len() != hashes.len() {
            return None;
        }
        Some(Self {
            size,
            peaks: heights.into_iter().zip(hashes.iter().copied()).collect(),
        })
    }

    /// The tree hash of all leaves so far (RFC 6962).
    pub fn root(&self) -> Hash {
        let mut peaks = self.peaks.iter().rev();
        match peaks.next() {
            None => Sha256::digest(b"").into(),
            Some((_, last)) => peaks.fold(*last, |right, (_, left)| node_hash(left, &right)),
        }
    }
}

/// A signed statement of the log's size and root at a moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Names the log: `careweave/<network>/<ODS>/audit`.
    pub origin: String,
    pub size: u64,
    #[serde(with = "serde_bytes")]
    pub root: [u8; 32],
}

/// Why a checkpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint envelope: {0}")]
    Envelope(#[from] CoseError),
    #[error("checkpoint contents: {0}")]
    Contents(#[from] CborError),
    #[error("checkpoint header: {0}")]
    Header(String),
    #[error("checkpoint key: {0}")]
    Key(#[from] KeyLookupError),
    #[error("checkpoint signature does not verify")]
    BadSignature,
}

/// A checkpoint whose signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    pub checkpoint: Checkpoint,
    /// The node that signed it.
    pub issuer: OdsCode,
    pub signed_at: u64,
}

/// Signs a checkpoint with a node's log key.
pub fn sign_checkpoint(
    checkpoint: &Checkpoint,
    issuer: &OdsCode,
    now: u64,
    log_key: &KeyPair,
) -> Result<Vec<u8>, CheckpointError> {
    let mut header = ProtectedHeader::new(log_key.kid(), CHECKPOINT_CONTENT_TYPE);
    header.claims = Claims {
        iss: Some(issuer.to_string()),
        iat: Some(now),
        ..Claims::default()
    };
    Ok(Sign1::sign(
        &header,
        &cbor::encode(checkpoint)?,
        b"",
        log_key,
    )?)
}

/// Verifies a checkpoint with a log key the auditor already holds.
pub fn verify_checkpoint(
    bytes: &[u8],
    log_key: &PublicKey,
) -> Result<SignedCheckpoint, CheckpointError> {
    let sign1 = Sign1::decode(bytes, Limits::HEADER.max_bytes)?;
    let header = &sign1.header;
    if header.content_type != CHECKPOINT_CONTENT_TYPE {
        return Err(CheckpointError::Header("wrong content type".into()));
    }
    if header.kid != log_key.kid() {
        return Err(CheckpointError::Header(format!(
            "signed by key {}, not the given log key",
            header.kid
        )));
    }
    sign1
        .verify_signature(log_key, b"")
        .map_err(|_| CheckpointError::BadSignature)?;
    let issuer = header
        .claims
        .iss
        .as_deref()
        .ok_or_else(|| CheckpointError::Header("iss is missing".into()))
        .and_then(|s| OdsCode::parse(s).map_err(|e| CheckpointError::Header(e.to_string())))?;
    let signed_at = header
        .claims
        .iat
        .ok_or_else(|| CheckpointError::Header("iat is missing".into()))?;
    let checkpoint: Checkpoint = cbor::decode(&sign1.payload, Limits::HEADER)?;
    Ok(SignedCheckpoint {
        checkpoint,
        issuer,
        signed_at,
    })
}

/// Verifies a checkpoint with the log key the trust list gives its issuer.
pub fn verify_checkpoint_with_list(
    bytes: &[u8],
    trust: &AcceptedList,
) -> Result<SignedCheckpoint, CheckpointError> {
    let sign1 = Sign1::decode(bytes, Limits::HEADER.max_bytes)?;
    let (member, key) = trust
        .key(&sign1.header.kid)
        .ok_or(KeyLookupError::UnknownKid {
            kid: sign1.header.kid,
        })?;
    if key.key_use != KeyUse::Log {
        return Err(KeyLookupError::WrongUse {
            kid: key.kid,
            wanted: KeyUse::Log,
            actual: key.key_use,
        }
        .into());
    }
    let verified = verify_checkpoint(bytes, &key.public)?;
    if verified.issuer != member.ods {
        return Err(CheckpointError::Header(
            "iss is not the organisation that holds the log key".into(),
        ));
    }
    Ok(verified)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(&(i as u64).to_be_bytes()))
            .collect()
    }

    #[test]
    fn empty_and_single_roots() {
        assert_eq!(
            hex::encode(root(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let one = leaves(1);
        assert_eq!(root(&one), one[0]);
    }

    #[test]
    fn rfc6962_reference_roots() {
        // The test vectors of the Certificate Transparency reference code:
        // leaves "", 00, 10, 2021, 3031, 40414243, 5051525354555657,
        // 606162636465666768696a6b6c6d6e6f.
        let inputs: [&[u8]; 8] = [
            b"",
            &[0x00],
            &[0x10],
            &[0x20, 0x21],
            &[0x30, 0x31],
            &[0x40, 0x41, 0x42, 0x43],
            &[0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57],
            &[
                0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d,
                0x6e, 0x6f,
            ],
        ];
        let hashes: Vec<Hash> = inputs.iter().map(|i| leaf_hash(i)).collect();
        assert_eq!(
            hex::encode(root(&hashes[..1])),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
        assert_eq!(
            hex::encode(root(&hashes)),
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"
        );
        assert_eq!(
            hex::encode(root(&hashes[..3])),
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77"
        );
    }

    #[test]
    fn every_inclusion_proof_verifies_up_to_64_leaves() {
        for n in 1..=64 {
            let l = leaves(n);
            let r = root(&l);
            for i in 0..n {
                let proof = inclusion_proof(&l, i as u64).unwrap();
                verify_inclusion(&l[i], i as u64, n as u64, &proof, &r).unwrap();
                // The wrong leaf, index or size fails.
                let other = leaf_hash(b"not in the log");
                assert!(verify_inclusion(&other, i as u64, n as u64, &proof, &r).is_err());
                if n > 1 {
                    let j = (i + 1) % n;
                    assert!(verify_inclusion(&l[i], j as u64, n as u64, &proof, &r).is_err());
                }
                // The same proof against a bigger tree's root fails.
                let bigger = leaves(n + 1);
                assert!(
                    verify_inclusion(&l[i], i as u64, n as u64 + 1, &proof, &root(&bigger))
                        .is_err(),
                    "n={n} i={i}"
                );
            }
        }
    }

    #[test]
    fn every_consistency_proof_verifies_up_to_64_leaves() {
        for n in 1..=64 {
            let l = leaves(n);
            let new_root = root(&l);
            for m in 0..=n {
                let old_root = root(&l[..m]);
                let proof = consistency_proof(&l, m as u64).unwrap();
                verify_consistency(m as u64, n as u64, &old_root, &new_root, &proof).unwrap();
                if m > 0 && m < n {
                    let forged = leaf_hash(b"rewritten");
                    assert_eq!(
                        verify_consistency(m as u64, n as u64, &forged, &new_root, &proof),
                        Err(ProofError::RootMismatch)
                    );
                    assert!(
                        verify_consistency(m as u64, n as u64, &old_root, &forged, &proof).is_err()
                    );
                }
            }
        }
    }

    #[test]
    fn rewritten_history_is_detected() {
        let l = leaves(10);
        let old_root = root(&l[..6]);
        let mut rewritten = l.clone();
        rewritten[2] = leaf_hash(b"changed entry");
        let proof = consistency_proof(&rewritten, 6).unwrap();
        assert!(verify_consistency(6, 10, &old_root, &root(&rewritten), &proof).is_err());
    }

    #[test]
    fn out_of_range_requests_are_errors() {
        let l = leaves(4);
        assert!(matches!(
            inclusion_proof(&l, 4),
            Err(ProofError::IndexOutOfRange { .. })
        ));
        assert!(matches!(
            consistency_proof(&l, 5),
            Err(ProofError::SizesOutOfOrder { .. })
        ));
        assert!(verify_consistency(5, 4, &[0; 32], &[0; 32], &[]).is_err());
        assert!(verify_inclusion(&l[0], 0, 4, &vec![[0; 32]; 70], &root(&l)).is_err());
    }

    #[test]
    fn checkpoint_signs_and_verifies() {
        let key = KeyPair::from_secret_bytes(&[8; 32]);
        let ods = OdsCode::parse("QE1").unwrap();
        let cp = Checkpoint {
            origin: "careweave/test/QE1/audit".into(),
            size: 10,
            root: root(&leaves(10)),
        };
        let bytes = sign_checkpoint(&cp, &ods, 1_800_000_000, &key).unwrap();
        let v = verify_checkpoint(&bytes, &key.public_key()).unwrap();
        assert_eq!(v.checkpoint, cp);
        assert_eq!(v.issuer, ods);
        let other = KeyPair::from_secret_bytes(&[9; 32]);
        assert!(verify_checkpoint(&bytes, &other.public_key()).is_err());
        let mut tampered = bytes.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(
            verify_checkpoint(&tampered, &key.public_key()),
            Err(CheckpointError::BadSignature)
        );
    }

    #[test]
    fn every_single_bit_flip_in_a_checkpoint_is_refused() {
        let key = KeyPair::from_secret_bytes(&[8; 32]);
        let cp = Checkpoint {
            origin: "careweave/test/QE1/audit".into(),
            size: 3,
            root: root(&leaves(3)),
        };
        let bytes = sign_checkpoint(&cp, &OdsCode::parse("QE1").unwrap(), 1, &key).unwrap();
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                verify_checkpoint(&flipped, &key.public_key()).is_err(),
                "bit {bit}"
            );
        }
    }

    #[test]
    fn compact_range_matches_the_full_tree() {
        let l = leaves(300);
        let mut range = CompactRange::default();
        assert_eq!(range.root(), root(&[]));
        for (i, leaf) in l.iter().enumerate() {
            range.append(*leaf);
            assert_eq!(range.size(), i as u64 + 1);
            assert_eq!(range.root(), root(&l[..=i]), "size {}", i + 1);
        }
    }

    #[test]
    fn a_range_rebuilt_from_its_peaks_carries_on_the_same() {
        let l = leaves(77);
        for cut in [0usize, 1, 2, 31, 64, 76] {
            let mut range = CompactRange::default();
            l[..cut].iter().for_each(|leaf| range.append(*leaf));
            let mut rebuilt = CompactRange::from_peaks(range.size(), &range.peak_hashes()).unwrap();
            l[cut..].iter().for_each(|leaf| rebuilt.append(*leaf));
            assert_eq!(rebuilt.root(), root(&l), "cut at {cut}");
        }
        // 6 has two set bits, so one hash is not enough.
        assert!(CompactRange::from_peaks(6, &[[0; 32]]).is_none());
    }

    proptest! {
        #[test]
        fn proofs_verify_for_random_sizes(n in 1usize..300, seed in any::<u64>()) {
            let l = leaves(n);
            let r = root(&l);
            let i = (seed % n as u64) as usize;
            let proof = inclusion_proof(&l, i as u64).unwrap();
            prop_assert!(verify_inclusion(&l[i], i as u64, n as u64, &proof, &r).is_ok());
            let m = (seed.rotate_left(17) % (n as u64 + 1)) as usize;
            let cproof = consistency_proof(&l, m as u64).unwrap();
            prop_assert!(verify_consistency(m as u64, n as u64, &root(&l[..m]), &r, &cproof).is_ok());
        }
    }
}
