//! The allocator figures a node binary reports, with jemalloc installed as
//! this test binary's allocator the way `careweave-node` installs it.
#![cfg(unix)]

use careweave_node::allocator;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[test]
fn jemalloc_figures_follow_what_is_allocated_and_freed() {
    assert!(allocator::stats().is_none(), "nothing registered yet");
    allocator::jemalloc::start().expect("background thread starts");
    let before = allocator::stats().expect("registered");
    assert!(before.allocated <= before.active && before.active <= before.resident);

    let held = vec![7u8; 64 << 20];
    let during = allocator::stats().expect("registered");
    assert!(
        during.allocated >= before.allocated + (64 << 20),
        "64 MiB more allocated: {before:?} then {during:?}"
    );
    assert!(during.resident >= 64 << 20, "{during:?}");

    drop(std::hint::black_box(held));
    let after = allocator::stats().expect("registered");
    assert!(
        after.allocated < during.allocated - (32 << 20),
        "freed: {during:?} then {after:?}"
    );
}
