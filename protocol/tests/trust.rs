//! Trust root and trust list rules.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use careweave_protocol::keys::KeyPair;
use careweave_protocol::trust::{
    self, KeyLookupError, KeyUse, ListDocument, MemberStatus, Revocation, RootDocument,
    SignatureStatus, TrustError,
};
use common::{DAY, Net, Node, T0, key};

fn rotated_root(
    net: &Net,
    old_signers: &[usize],
    new_keys: &[KeyPair],
    new_signers: &[usize],
) -> Vec<u8> {
    let mut root = net.root.clone();
    root.version = 2;
    root.issued = T0 - DAY;
    root.root_keys = new_keys.iter().map(KeyPair::public_key).collect();
    let mut doc = RootDocument::unsigned(&root).unwrap();
    for i in old_signers {
        doc.sign(&net.root_keys[*i]).unwrap();
    }
    for i in new_signers {
        doc.sign(&new_keys[*i]).unwrap();
    }
    doc.encode()
}

fn new_root_keys() -> Vec<KeyPair> {
    (1..=3).map(|i| key(&format!("root-v2/{i}"))).collect()
}

#[test]
fn first_root_needs_its_own_threshold() {
    let net = Net::new();
    assert_eq!(net.accepted_root().root().version, 1);
    let mut doc = RootDocument::unsigned(&net.root).unwrap();
    doc.sign(&net.root_keys[0]).unwrap();
    assert!(matches!(
        trust::accept_first_root(&doc.encode(), T0),
        Err(TrustError::ThresholdNotMet {
            valid: 1,
            threshold: 2,
            ..
        })
    ));
}

#[test]
fn expired_root_fails_closed() {
    let net = Net::new();
    let err = trust::accept_first_root(&net.root_bytes(), net.root.expires + 1).unwrap_err();
    assert!(matches!(err, TrustError::Expired { what: "root", .. }));
}

#[test]
fn root_rotation_needs_old_and_new_thresholds() {
    let net = Net::new();
    let held = net.accepted_root();
    let new_keys = new_root_keys();
    let good = rotated_root(&net, &[0, 2], &new_keys, &[1, 2]);
    let next = trust::accept_next_root(&held, &good, T0).unwrap();
    assert_eq!(next.root().version, 2);

    let only_new = rotated_root(&net, &[], &new_keys, &[0, 1, 2]);
    assert!(matches!(
        trust::accept_next_root(&held, &only_new, T0),
        Err(TrustError::ThresholdNotMet {
            which: "previous root keys",
            ..
        })
    ));
    let only_old = rotated_root(&net, &[0, 1, 2], &new_keys, &[0]);
    assert!(matches!(
        trust::accept_next_root(&held, &only_old, T0),
        Err(TrustError::ThresholdNotMet {
            which: "new root keys",
            ..
        })
    ));
}

#[test]
fn root_versions_advance_by_exactly_one() {
    let net = Net::new();
    let held = net.accepted_root();
    let new_keys = new_root_keys();
    let v2 = rotated_root(&net, &[0, 1], &new_keys, &[0, 1]);
    // Version 3 straight after 1 is refused, as is 1 again.
    let mut v3 = net.root.clone();
    v3.version = 3;
    let mut doc = RootDocument::unsigned(&v3).unwrap();
    for k in &net.root_keys {
        doc.sign(k).unwrap();
    }
    assert_eq!(
        trust::accept_next_root(&held, &doc.encode(), T0).unwrap_err(),
        TrustError::RootVersionNotNext {
            held: 1,
            offered: 3
        }
    );
    assert!(matches!(
        trust::accept_next_root(&held, &net.root_bytes(), T0),
        Err(TrustError::RootVersionNotNext {
            held: 1,
            offered: 1
        })
    ));
    // A chain of one step.
    let chained = trust::accept_root_chain(&held, [v2.as_slice()], T0).unwrap();
    assert_eq!(chained.root().version, 2);
}

#[test]
fn rotated_root_for_another_network_is_refused() {
    let net = Net::new();
    let held = net.accepted_root();
    let mut other = net.root.clone();
    other.version = 2;
    other.network = "elsewhere".into();
    let mut doc = RootDocument::unsigned(&other).unwrap();
    for k in &net.root_keys {
        doc.sign(k).unwrap();
    }
    assert!(matches!(
        trust::accept_next_root(&held, &doc.encode(), T0),
        Err(TrustError::WrongNetwork { .. })
    ));
}

#[test]
fn root_contents_are_checked() {
    let net = Net::new();
    let mut bad = net.root.clone();
    bad.root_threshold = 4;
    assert!(matches!(
        RootDocument::unsigned(&bad),
        Err(TrustError::Invalid(_))
    ));
    let mut bad = net.root.clone();
    bad.list_threshold = 0;
    assert!(matches!(
        RootDocument::unsigned(&bad),
        Err(TrustError::Invalid(_))
    ));
    let mut bad = net.root.clone();
    bad.list_keys.push(bad.list_keys[0]);
    assert!(matches!(
        RootDocument::unsigned(&bad),
        Err(TrustError::Invalid(_))
    ));
    let mut bad = net.root.clone();
    bad.policy.max_list_validity_secs = 15 * DAY;
    assert!(matches!(
        RootDocument::unsigned(&bad),
        Err(TrustError::Invalid(_))
    ));
}

#[test]
fn list_needs_a_threshold_of_list_keys() {
    let net = Net::new();
    let root = net.accepted_root();
    let one = net.sign_list(&net.list(1, None), &[2]);
    assert!(matches!(
        trust::accept_list(&root, None, &one, T0),
        Err(TrustError::ThresholdNotMet {
            valid: 1,
            threshold: 2,
            ..
        })
    ));
    let two = net.sign_list(&net.list(1, None), &[0, 2]);
    trust::accept_list(&root, None, &two, T0).unwrap();
}

#[test]
fn list_signing_refuses_keys_the_root_does_not_authorise() {
    let net = Net::new();
    let mut doc = ListDocument::unsigned(&net.list(1, None)).unwrap();
    let err = doc.sign(&net.root_keys[0], &net.root).unwrap_err();
    assert!(matches!(err, TrustError::SignerNotAuthorised { .. }));
    doc.sign(&net.list_keys[0], &net.root).unwrap();
    // Signing twice with one key is refused.
    assert!(doc.sign(&net.list_keys[0], &net.root).is_err());
}

#[test]
fn signatures_by_unauthorised_keys_do_not_count() {
    let net = Net::new();
    let root = net.accepted_root();
    // One list key and one root key (a root key is not a list key).
    let mut doc = ListDocument::unsigned(&net.list(1, None)).unwrap();
    doc.sign(&net.list_keys[0], &net.root).unwrap();
    let mut sign = doc.cose().clone();
    sign.add_signature(&net.root_keys[0]).unwrap();
    let report = trust::signature_report(&sign, &root.root().list_keys);
    assert_eq!(report[0].1, SignatureStatus::Valid);
    assert_eq!(report[1].1, SignatureStatus::NotAuthorised);
    // A document carrying a signature by a key not authorised for it is refused.
    assert_eq!(
        trust::accept_list(&root, None, &sign.encode(), T0).unwrap_err(),
        TrustError::SignerNotAuthorised {
            kid: net.root_keys[0].kid()
        }
    );
}

#[test]
fn forged_signature_is_reported_invalid() {
    let net = Net::new();
    let root = net.accepted_root();
    let bytes = net.sign_list(&net.list(1, None), &[0, 1]);
    let (doc, _) = ListDocument::decode(&bytes).unwrap();
    let mut sign = doc.cose().clone();
    sign.signers[1].signature[10] ^= 0x40;
    let report = trust::signature_report(&sign, &root.root().list_keys);
    assert_eq!(report[1].1, SignatureStatus::Invalid);
    assert_eq!(
        trust::accept_list(&root, None, &sign.encode(), T0).unwrap_err(),
        TrustError::BadSignature {
            kid: net.list_keys[1].kid()
        }
    );
    // A second copy of a valid signature is not counted twice.
    let mut dup = doc.cose().clone();
    dup.signers.truncate(1);
    dup.signers.push(dup.signers[0].clone());
    let report = trust::signature_report(&dup, &root.root().list_keys);
    assert_eq!(report[1].1, SignatureStatus::Duplicate);
    assert!(matches!(
        trust::accept_list(&root, None, &dup.encode(), T0),
        Err(TrustError::DuplicateSignature { .. })
    ));
}

#[test]
fn list_seq_must_rise_and_equivocation_is_caught() {
    let net = Net::new();
    let (root, held) = net.accepted();
    let same = net.sign_list(&net.list(1, None), &[0, 1]);
    assert_eq!(
        trust::accept_list(&root, Some(&held), &same, T0).unwrap_err(),
        TrustError::AlreadyHeld { seq: 1 }
    );
    let mut other = net.list(1, None);
    other.members.pop();
    let other = net.sign_list(&other, &[0, 1]);
    assert_eq!(
        trust::accept_list(&root, Some(&held), &other, T0).unwrap_err(),
        TrustError::Equivocation { seq: 1 }
    );
    // Same content signed by a different pair of keys is different bytes too.
    let resigned = net.sign_list(&net.list(1, None), &[1, 2]);
    assert_eq!(
        trust::accept_list(&root, Some(&held), &resigned, T0).unwrap_err(),
        TrustError::Equivocation { seq: 1 }
    );

    let two = net.sign_list(&net.list(2, Some(held.hash())), &[0, 1]);
    let held2 = trust::accept_list(&root, Some(&held), &two, T0).unwrap();
    assert_eq!(
        trust::accept_list(&root, Some(&held2), &same, T0).unwrap_err(),
        TrustError::NotNewer {
            held: 2,
            offered: 1
        }
    );
}

#[test]
fn prev_hash_chains_lists() {
    let net = Net::new();
    let (root, held) = net.accepted();
    let wrong = net.sign_list(&net.list(2, Some([7; 32])), &[0, 1]);
    assert_eq!(
        trust::accept_list(&root, Some(&held), &wrong, T0).unwrap_err(),
        TrustError::BrokenChain { seq: 2 }
    );
    // After a gap the chain cannot be followed; the threshold vouches.
    let gap = net.sign_list(&net.list(5, Some([7; 32])), &[0, 1]);
    assert_eq!(
        trust::accept_list(&root, Some(&held), &gap, T0)
            .unwrap()
            .list()
            .seq,
        5
    );
    // seq 1 carries no prev, later lists must.
    assert!(matches!(
        ListDocument::unsigned(&net.list(1, Some([0; 32]))),
        Err(TrustError::Invalid(_))
    ));
    assert!(matches!(
        ListDocument::unsigned(&net.list(3, None)),
        Err(TrustError::Invalid(_))
    ));
}

#[test]
fn expired_or_overlong_or_future_lists_are_refused() {
    let net = Net::new();
    let root = net.accepted_root();
    let list = net.list(1, None);
    let bytes = net.sign_list(&list, &[0, 1]);
    assert!(matches!(
        trust::accept_list(&root, None, &bytes, list.expires + 1),
        Err(TrustError::Expired { what: "list", .. })
    ));
    let mut long = net.list(1, None);
    long.expires = long.issued + 15 * DAY;
    let bytes = net.sign_list(&long, &[0, 1]);
    assert!(matches!(
        trust::accept_list(&root, None, &bytes, T0),
        Err(TrustError::ValidityTooLong { .. })
    ));
    let mut future = net.list(1, None);
    future.issued = T0 + 3600;
    let bytes = net.sign_list(&future, &[0, 1]);
    assert!(matches!(
        trust::accept_list(&root, None, &bytes, T0),
        Err(TrustError::NotYetIssued { .. })
    ));
}

#[test]
fn list_must_match_network_and_root_version() {
    let net = Net::new();
    let root = net.accepted_root();
    let mut list = net.list(1, None);
    list.root_version = 2;
    let bytes = net.sign_list(&list, &[0, 1]);
    assert_eq!(
        trust::accept_list(&root, None, &bytes, T0).unwrap_err(),
        TrustError::WrongRootVersion {
            expected: 1,
            found: 2
        }
    );
    let mut list = net.list(1, None);
    list.network = "another".into();
    let bytes = net.sign_list(&list, &[0, 1]);
    assert!(matches!(
        trust::accept_list(&root, None, &bytes, T0),
        Err(TrustError::WrongNetwork { .. })
    ));
}

#[test]
fn list_contents_are_checked() {
    let net = Net::new();
    let invalid = |list| matches!(ListDocument::unsigned(&list), Err(TrustError::Invalid(_)));
    let mut dup_ods = net.list(1, None);
    dup_ods.members[1].ods = dup_ods.members[0].ods.clone();
    assert!(invalid(dup_ods));
    let mut dup_peer = net.list(1, None);
    dup_peer.members[1].peers = dup_peer.members[0].peers.clone();
    assert!(invalid(dup_peer));
    let mut dup_key = net.list(1, None);
    let k = dup_key.members[0].keys[1].clone();
    dup_key.members[1].keys.push(k);
    assert!(invalid(dup_key));
    let mut bad_kid = net.list(1, None);
    bad_kid.members[0].keys[1].kid = bad_kid.members[0].keys[2].kid;
    assert!(invalid(bad_kid));
    let mut foreign_peer = net.list(1, None);
    foreign_peer.members[0].peers[0].peer_id = key("stranger").public_key().peer_id();
    assert!(invalid(foreign_peer));
    let mut no_roles = net.list(1, None);
    no_roles.members[0].roles.clear();
    assert!(invalid(no_roles));
    let mut empty_window = net.list(1, None);
    empty_window.members[0].valid_until = empty_window.members[0].valid_from;
    assert!(invalid(empty_window));
    let mut long_name = net.list(1, None);
    long_name.members[0].name = "x".repeat(600);
    assert!(invalid(long_name));
}

#[test]
fn weak_keys_in_a_list_are_refused_on_load() {
    let net = Net::new();
    let root = net.accepted_root();
    let bytes = net.sign_list(&net.list(1, None), &[0, 1]);
    // Replace QHG's message public key with a small-order point and re-sign.
    let (doc, _) = ListDocument::decode(&bytes).unwrap();
    let good_key = net.nodes[0].message.public_key();
    let mut payload = doc.cose().payload.clone();
    let pos = payload
        .windows(32)
        .position(|w| w == good_key.as_bytes())
        .unwrap();
    let mut weak = [0u8; 32];
    weak[0] = 1;
    payload[pos..pos + 32].copy_from_slice(&weak);
    let mut sign = careweave_protocol::cose::Sign::new(trust::LIST_CONTENT_TYPE, payload).unwrap();
    sign.add_signature(&net.list_keys[0]).unwrap();
    sign.add_signature(&net.list_keys[1]).unwrap();
    let err = trust::accept_list(&root, None, &sign.encode(), T0).unwrap_err();
    assert!(matches!(err, TrustError::Contents(_)), "{err}");
    assert!(err.to_string().contains("weak"), "{err}");
}

#[test]
fn look_ups_by_kid_peer_and_ods() {
    let net = Net::new();
    let (_, list) = net.accepted();
    let que = &net.nodes[1];
    let (member, key) = list.key(&que.message.kid()).unwrap();
    assert_eq!(member.ods, que.ods);
    assert_eq!(key.key_use, KeyUse::Message);
    assert_eq!(list.member_by_peer(&que.peer()).unwrap().ods, que.ods);
    assert_eq!(list.member_by_ods(&que.ods).unwrap().name, que.name);
    assert!(list.key(&key_kid("nobody")).is_none());
    assert_eq!(list.allowed_peers(T0).len(), 3);
    list.current_key(&que.message.kid(), KeyUse::Message, T0)
        .unwrap();
}

fn key_kid(name: &str) -> careweave_protocol::KeyId {
    key(name).kid()
}

#[test]
fn current_key_checks_use_validity_revocation_and_status() {
    let net = Net::new();
    let root = net.accepted_root();
    let qhg = &net.nodes[0];
    let mut list = net.list(1, None);
    list.revoked.push(Revocation {
        kid: qhg.log.kid(),
        ods: qhg.ods.clone(),
        revoked_at: T0 - DAY,
        reason: "rotated".into(),
        compromised_since: None,
    });
    list.members[1].status = MemberStatus::Suspended;
    list.members[2].keys[1].valid_until = T0 - 1;
    let accepted = trust::accept_list(&root, None, &net.sign_list(&list, &[0, 1]), T0).unwrap();

    assert!(matches!(
        accepted.current_key(&qhg.record.kid(), KeyUse::Message, T0),
        Err(KeyLookupError::WrongUse { .. })
    ));
    assert!(matches!(
        accepted.current_key(&qhg.log.kid(), KeyUse::Log, T0),
        Err(KeyLookupError::Revoked { .. })
    ));
    assert!(matches!(
        accepted.current_key(&net.nodes[1].message.kid(), KeyUse::Message, T0),
        Err(KeyLookupError::MemberNotActive { .. })
    ));
    assert!(matches!(
        accepted.current_key(&net.nodes[2].message.kid(), KeyUse::Message, T0),
        Err(KeyLookupError::OutsideValidity { .. })
    ));
    assert!(matches!(
        accepted.current_key(&key_kid("nobody"), KeyUse::Message, T0),
        Err(KeyLookupError::UnknownKid { .. })
    ));
    // A suspended member's PeerId leaves the allow-list.
    assert_eq!(accepted.allowed_peers(T0).len(), 2);
    assert!(!accepted.allowed_peers(T0).contains(&net.nodes[1].peer()));
}

#[test]
fn retired_record_keys_keep_old_records_compromised_ones_do_not() {
    let net = Net::new();
    let root = net.accepted_root();
    let qhg = &net.nodes[0];
    let que = &net.nodes[1];
    let mut list = net.list(1, None);
    list.revoked.push(Revocation {
        kid: qhg.record.kid(),
        ods: qhg.ods.clone(),
        revoked_at: T0 - DAY,
        reason: "routine rotation".into(),
        compromised_since: None,
    });
    list.revoked.push(Revocation {
        kid: que.record.kid(),
        ods: que.ods.clone(),
        revoked_at: T0 - DAY,
        reason: "key found on a shared drive".into(),
        compromised_since: Some(T0 - 10 * DAY),
    });
    let accepted = trust::accept_list(&root, None, &net.sign_list(&list, &[0, 1]), T0).unwrap();
    accepted
        .record_key_at(&qhg.record.kid(), T0 - 2 * DAY)
        .unwrap();
    assert!(accepted.record_key_at(&qhg.record.kid(), T0).is_err());
    assert!(
        accepted
            .record_key_at(&que.record.kid(), T0 - 20 * DAY)
            .is_err()
    );
}

#[test]
fn every_single_bit_flip_in_a_list_is_refused() {
    let net = Net::new();
    let root = net.accepted_root();
    let bytes = net.sign_list(&net.list(1, None), &[0, 1]);
    for bit in 0..bytes.len() * 8 {
        let mut flipped = bytes.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert!(
            trust::accept_list(&root, None, &flipped, T0).is_err(),
            "bit {bit} flipped was accepted"
        );
    }
}

#[test]
fn every_single_bit_flip_in_a_root_is_refused() {
    let net = Net::new();
    let bytes = net.root_bytes();
    for bit in 0..bytes.len() * 8 {
        let mut flipped = bytes.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert!(
            trust::accept_first_root(&flipped, T0).is_err(),
            "bit {bit} flipped was accepted"
        );
    }
}

#[test]
fn a_successor_icb_can_carry_predecessors() {
    let net = Net::new();
    let root = net.accepted_root();
    let successor = Node::new("S1Y5D", "NHS Central East ICB");
    let mut member = successor.member();
    member.predecessors = vec![net.nodes[0].ods.clone(), net.nodes[1].ods.clone()];
    let mut list = net.list(1, None);
    list.members.push(member);
    let accepted = trust::accept_list(&root, None, &net.sign_list(&list, &[0, 1]), T0).unwrap();
    let m = accepted.member_by_ods(&successor.ods).unwrap();
    assert_eq!(m.predecessors.len(), 2);
    assert_eq!(m.ods.as_str().len(), 5);
}
