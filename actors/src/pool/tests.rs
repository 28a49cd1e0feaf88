//! Pool state rules: LRU eviction skips leases, reservations never leak, owners' leases end
//! with their session.

use std::sync::Arc;

use super::*;
use crate::metrics::Metrics;

const PAGE: u64 = 4096;

fn pool(pages: u64) -> PoolState {
    PoolState::new(
        pages * PAGE,
        PAGE,
        Arc::new(Metrics::new().expect("metrics")),
        None,
    )
}

fn key(i: u8) -> BlockKey {
    [i; 32]
}

fn load(pool: &mut PoolState, keys: &[BlockKey], page_bytes: u64) -> LoadGrant {
    match pool.acquire_load(keys, page_bytes) {
        LoadPlan::Ready(grant) => grant,
        LoadPlan::Promote(..) => panic!("no SSD tier: nothing to promote"),
    }
}

fn save(pool: &mut PoolState, keys: &[BlockKey]) -> Vec<SaveSlot> {
    let reservation = pool.reserve_save(keys, PAGE);
    let written = reservation
        .slots
        .iter()
        .filter(|s| matches!(s, SaveSlot::Write(_)))
        .count();
    pool.commit_save(reservation.lease, &vec![0; written]);
    reservation.slots
}

#[test]
fn full_pool_evicts_least_recently_used() {
    let mut pool = pool(3);
    save(&mut pool, &[key(1), key(2), key(3)]);
    assert_eq!(pool.lookup(&[key(1)], None).hits, 1);
    let slots = save(&mut pool, &[key(4)]);
    assert!(matches!(slots[0], SaveSlot::Write(_)));
    assert_eq!(pool.lookup(&[key(2)], None).hits, 0, "LRU page evicted");
    assert_eq!(
        pool.lookup(&[key(1)], None).hits,
        1,
        "recently used page kept"
    );
    assert_eq!(pool.stats().evictions, 1);
}

#[test]
fn leased_pages_survive_pressure_and_saves_drop_instead_of_failing() {
    let mut pool = pool(2);
    save(&mut pool, &[key(1), key(2)]);
    let leased = pool.lookup(&[key(1), key(2)], Some(7));
    assert_eq!(leased.hits, 2);
    let slots = save(&mut pool, &[key(3)]);
    assert_eq!(slots, vec![SaveSlot::Dropped]);
    assert_eq!(pool.lookup(&[key(1), key(2)], None).hits, 2);
    assert_eq!(pool.release(7, leased.lease.expect("lease")), Some(2));
    assert!(matches!(save(&mut pool, &[key(3)])[0], SaveSlot::Write(_)));
}

#[test]
fn release_checks_the_owner_and_release_owner_frees_everything() {
    let mut pool = pool(4);
    save(&mut pool, &[key(1), key(2)]);
    let lease = pool
        .lookup(&[key(1), key(2)], Some(1))
        .lease
        .expect("lease");
    assert_eq!(
        pool.release(2, lease),
        None,
        "another session cannot release it"
    );
    pool.lookup(&[key(1)], Some(1));
    assert_eq!(pool.stats().leased_pages, 2);
    pool.release_owner(1);
    assert_eq!(pool.stats().leased_pages, 0);
    assert_eq!(pool.stats().leased_bytes, 0);
}

#[test]
fn aborted_save_returns_its_extents() {
    let mut pool = pool(2);
    let reservation = pool.reserve_save(&[key(1), key(2)], PAGE);
    assert_eq!(pool.stats().used_bytes, 2 * PAGE);
    assert_eq!(pool.stats().writing_pages, 2);
    pool.end_transfer(reservation.lease);
    let stats = pool.stats();
    assert_eq!(
        (stats.used_bytes, stats.leased_bytes, stats.pages),
        (0, 0, 0)
    );
    assert_eq!(pool.lookup(&[key(1)], None).hits, 0);
}

#[test]
fn duplicate_and_in_flight_keys_are_present_not_rewritten() {
    let mut pool = pool(4);
    let first = pool.reserve_save(&[key(1), key(1)], PAGE);
    assert!(matches!(first.slots[0], SaveSlot::Write(_)));
    assert_eq!(first.slots[1], SaveSlot::Present);
    let second = pool.reserve_save(&[key(1)], PAGE);
    assert_eq!(second.slots, vec![SaveSlot::Present]);
    assert_eq!(pool.commit_save(first.lease, &[9]), 1);
    assert_eq!(pool.index.get(&key(1)).map(|e| e.crc32c), Some(9));
}

#[test]
fn load_pins_only_the_leading_pages_of_the_right_size() {
    let mut pool = pool(4);
    save(&mut pool, &[key(1), key(2), key(4)]);
    let grant = load(&mut pool, &[key(1), key(2), key(3), key(4)], PAGE);
    assert_eq!(grant.pages.len(), 2);
    assert_eq!(pool.stats().leased_pages, 2);
    pool.end_transfer(grant.lease);
    assert_eq!(pool.stats().leased_pages, 0);
    assert!(
        load(&mut pool, &[key(1)], PAGE * 2).pages.is_empty(),
        "size mismatch is a miss"
    );
}
