//! Decoding never allocates more than its limits allow, whatever the input.
//!
//! A capped global allocator fails any allocation past the budget, which
//! aborts this test binary, so a decoder that over-allocates fails the test.
//! Everything runs in one test so no other thread shares the budget.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::alloc::System;

use cap::Cap;
use careweave_protocol::cbor::{self, ALLOCATION_PER_ITEM, Limits, Value};
use careweave_protocol::cose::Sign1;
use careweave_protocol::message::{FetchResponse, LocateResponse};
use careweave_protocol::trust::TrustList;

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// The budget a decode of `input` may use under `limits`.
fn budget(limits: Limits) -> usize {
    limits.max_bytes + limits.max_items * ALLOCATION_PER_ITEM
}

/// Runs `decode` with the allocator capped at what is in use now plus the budget.
fn within_budget<T>(limits: Limits, decode: impl FnOnce() -> T) -> T {
    let in_use = ALLOCATOR.allocated();
    ALLOCATOR.set_limit(in_use + budget(limits)).unwrap();
    let out = decode();
    ALLOCATOR.set_limit(usize::MAX).unwrap();
    out
}

fn head(major: u8, n: u64) -> Vec<u8> {
    let mut out = vec![];
    match n {
        0..=23 => out.push(major << 5 | n as u8),
        24..=0xff => out.extend([major << 5 | 24, n as u8]),
        0x100..=0xffff => {
            out.push(major << 5 | 25);
            out.extend((n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(major << 5 | 26);
            out.extend((n as u32).to_be_bytes());
        }
        _ => {
            out.push(major << 5 | 27);
            out.extend(n.to_be_bytes());
        }
    }
    out
}

/// Inputs shaped to make a decoder allocate as much as possible per byte.
fn hostile_inputs(limits: Limits) -> Vec<Vec<u8>> {
    let n = limits.max_items as u64 - 1;
    let mut out = vec![];
    // An array of as many one-byte items as allowed.
    let mut zeros = head(4, n);
    zeros.resize(zeros.len() + n as usize, 0);
    out.push(zeros);
    // An array of empty byte strings and of empty arrays.
    for item in [0x40u8, 0x80, 0xa0, 0x60] {
        let mut v = head(4, n);
        v.resize(v.len() + n as usize, item);
        out.push(v);
    }
    // A map with as many distinct integer keys as allowed.
    let pairs = n / 2;
    let mut map = head(5, pairs);
    for k in 0..pairs {
        map.extend(head(0, k));
        map.push(0xf6);
    }
    out.push(map);
    // Nested arrays as deep as allowed, each holding a big byte string.
    let mut nested = vec![];
    for _ in 0..limits.max_depth - 1 {
        nested.extend(head(4, 2));
        nested.extend(head(2, 1024));
        nested.extend(vec![0xab; 1024]);
    }
    nested.push(0x80);
    out.push(nested);
    // Lengths far beyond the input.
    out.push([head(2, u64::from(u32::MAX)), vec![0; 16]].concat());
    out.push([head(4, u64::MAX), vec![0; 16]].concat());
    out.push([head(5, u64::MAX / 4), vec![0; 16]].concat());
    out
}

#[test]
fn decoding_stays_within_its_memory_budget() {
    // The cap works: a reservation past the budget fails.
    let mut probe: Vec<u8> = Vec::new();
    within_budget(Limits::HEADER, || {
        assert!(probe.try_reserve(budget(Limits::HEADER) + 1).is_err());
    });

    for limits in [Limits::MESSAGE, Limits::TRUST, Limits::HEADER] {
        for input in hostile_inputs(limits) {
            within_budget(limits, || {
                let _ = cbor::decode::<Value>(&input, limits);
                let _ = cbor::decode::<LocateResponse>(&input, limits);
                let _ = cbor::decode::<FetchResponse>(&input, limits);
                let _ = cbor::decode::<TrustList>(&input, limits);
            });
            // The same bytes inside a COSE_Sign1 envelope.
            let mut envelope = vec![0xd2];
            envelope.extend(head(4, 4));
            envelope.extend(head(2, 0));
            envelope.push(0xa0);
            envelope.extend(head(2, input.len() as u64));
            envelope.extend(&input);
            envelope.extend(head(2, 64));
            envelope.extend([0u8; 64]);
            within_budget(Limits::MESSAGE, || {
                let _ = Sign1::decode(&envelope, Limits::MESSAGE.max_bytes);
            });
            // The payload embedded as an array item rather than a byte string.
            let mut raw = vec![0xd2];
            raw.extend(head(4, 4));
            raw.extend(&input);
            within_budget(Limits::MESSAGE, || {
                let _ = Sign1::decode(&raw, Limits::MESSAGE.max_bytes);
            });
        }
    }
}
