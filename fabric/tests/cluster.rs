//! Several fabric instances in one process on loopback: gossip, links, failures.

mod common;

use std::time::Duration;

use common::{key, options, page, start, start_with, wait_for, wait_for_a_holder, FAILURE};
use pegaflow_fabric::{LinkError, MemberChange};
use tokio::time::Instant;

const PAGE: usize = 256 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_key_is_visible_everywhere_and_fetched_byte_exact() {
    let a = start("a", &[]).await;
    let b = start("b", &[a.gossip]).await;
    let c = start("c", &[a.gossip]).await;
    let joined = wait_for(FAILURE * 4, || c.fabric.cluster().members().len() == 2).await;
    assert!(joined.is_some(), "c sees a and b");

    for i in 0..4 {
        a.source.insert(key(i), page(i, PAGE));
    }
    let keys: Vec<_> = (0..6).map(key).collect();
    a.fabric.cluster().publish_keys(&keys[..4], &[]);
    let seen = wait_for(FAILURE, || {
        [&b, &c].iter().all(|n| {
            n.fabric
                .cluster()
                .candidates(&keys)
                .first()
                .is_some_and(|c| c.claimed == 4)
        })
    })
    .await;
    let seen = seen.expect("the digest reaches every node within the failure-detection window");
    eprintln!("digest visible on b and c after {seen:?}");

    let outcome = c
        .fabric
        .fetch_prefix(&keys, PAGE as u64, Instant::now() + Duration::from_secs(5))
        .await;
    assert!(
        outcome.report.failures.is_empty(),
        "{:?}",
        outcome.report.failures
    );
    assert_eq!(
        outcome.pages.len(),
        4,
        "the held prefix, not the unheld tail"
    );
    for (i, p) in outcome.pages.iter().enumerate() {
        assert_eq!(p.key, key(i as u64));
        assert_eq!(p.data, page(i as u64, PAGE), "page {i} byte-exact");
    }
    assert_eq!(a.source.active_leases(), 0, "serving leases are released");

    // Eviction on a clears the claim.
    a.fabric.cluster().publish_keys(&[], &keys[..4]);
    assert!(
        wait_for(FAILURE, || c.fabric.cluster().candidates(&keys).is_empty())
            .await
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn false_positive_and_corrupt_holder_fall_through_to_the_next() {
    let a = start("a", &[]).await;
    let b = start("b", &[a.gossip]).await;
    let c = start("c", &[a.gossip]).await;
    let keys: Vec<_> = (0..3).map(key).collect();
    // a claims the keys but holds nothing (a false positive, as far as c can tell); b serves a
    // corrupt first page; only... nobody has good pages yet, so c must get nothing.
    a.fabric.cluster().publish_keys(&keys, &[]);
    b.source
        .insert_with_crc(keys[0], page(0, PAGE), 0xdead_beef);
    b.fabric.cluster().publish_keys(&keys[..1], &[]);
    assert!(
        wait_for(FAILURE * 2, || c.fabric.cluster().candidates(&keys).len()
            == 2)
        .await
        .is_some()
    );
    let outcome = c
        .fabric
        .fetch_prefix(&keys, PAGE as u64, Instant::now() + Duration::from_secs(5))
        .await;
    assert!(
        outcome.pages.is_empty(),
        "a corrupt page is never handed out"
    );
    assert_eq!(outcome.report.false_positives, 1);
    assert_eq!(outcome.report.failures.len(), 1);
    assert!(
        outcome.report.failures[0]
            .1
            .to_string()
            .contains("checksum"),
        "{}",
        outcome.report.failures[0].1
    );

    // Now b holds the first key intact: a's false claim falls through to b.
    b.source.insert(keys[0], page(0, PAGE));
    let outcome = c
        .fabric
        .fetch_prefix(&keys, PAGE as u64, Instant::now() + Duration::from_secs(5))
        .await;
    assert_eq!(outcome.pages.len(), 1);
    assert_eq!(outcome.pages[0].data, page(0, PAGE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_holder_mid_fetch_fails_fast_and_it_leaves() {
    let a = start("a", &[]).await;
    // A small link budget: one page per chunk request, four in flight.
    let mut options = common::options("c", "secret", &[a.gossip]);
    options.link.max_inflight_bytes = 4 * PAGE as u32;
    let c = common::start_with(options).await;
    let keys: Vec<_> = (0..64).map(key).collect();
    for (i, k) in keys.iter().enumerate() {
        a.source.insert(*k, page(i as u64, PAGE));
    }
    a.fabric.cluster().publish_keys(&keys, &[]);
    wait_for_a_holder(&c, &keys).await;
    let mut changes = c.fabric.cluster().subscribe();
    // A slow pool on a: each chunk lease takes 150 ms, so the fetch is mid-way when a dies.
    a.source.set_delay(Duration::from_millis(150));
    let link = a.fabric.link_addr();
    let (client, _) = c.fabric.links().get(link).await.expect("link to a");
    let deadline = Instant::now() + Duration::from_secs(10);
    let fetch =
        tokio::spawn(async move { client.fetch(&keys, PAGE as u64, deadline).collect().await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let killed = Instant::now();
    drop(a.fabric);
    let (pages, error) = fetch.await.expect("fetch task");
    let failed_after = killed.elapsed();
    assert!(matches!(error, Some(LinkError::Closed { .. })), "{error:?}");
    assert!(
        (1..64).contains(&pages.len()),
        "cut short mid-way: {} pages",
        pages.len()
    );
    for (i, p) in pages.iter().enumerate() {
        assert_eq!(p.data, page(i as u64, PAGE), "delivered pages are intact");
    }
    assert!(
        failed_after < Duration::from_secs(1),
        "failed after {failed_after:?}, not at the deadline"
    );
    eprintln!(
        "fetch failed {failed_after:?} after the kill, {} pages delivered",
        pages.len()
    );

    let gone = wait_for(FAILURE * 3, || c.fabric.cluster().members().is_empty()).await;
    let gone = gone.expect("a leaves the membership");
    eprintln!("a left c's membership {gone:?} after the kill");
    assert!(
        c.fabric
            .cluster()
            .candidates(&(0..64).map(key).collect::<Vec<_>>())
            .is_empty(),
        "and the ranking"
    );
    let left = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(change) = changes.next().await {
            if let MemberChange::Left(id) = change {
                return Some(id);
            }
        }
        None
    })
    .await;
    assert_eq!(
        left.ok().flatten().map(|id| id.to_string()),
        Some("a".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_refused() {
    let a = start("a", &[]).await;
    a.source.insert(key(1), page(1, PAGE));
    let evil = common::start_with(common::options("evil", "not-the-secret", &[])).await;
    let err = match evil.fabric.links().get(a.fabric.link_addr()).await {
        Ok(_) => panic!("a link with the wrong secret must be refused"),
        Err(e) => e,
    };
    assert!(matches!(err, LinkError::Handshake { .. }), "{err}");
    assert!(err.to_string().contains("secret"), "{err}");
    assert_eq!(a.source.active_leases(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialing_a_holder_that_never_handshakes_ends_at_the_fetch_deadline() {
    // The holder's advertised link accepts connections (the kernel's backlog) but nobody ever
    // answers the handshake, as with a frozen process: the fetch must end at its own deadline,
    // not at the link's longer connect and handshake timeouts.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = start("a", &[]).await;
    let mut held = options("b", "secret", &[a.gossip]);
    held.link_advertise = Some(silent.local_addr().expect("addr"));
    assert!(held.link.handshake_timeout > Duration::from_millis(300));
    let b = start_with(held).await;
    let keys: Vec<_> = (0..2).map(key).collect();
    b.fabric.cluster().publish_keys(&keys, &[]);
    wait_for_a_holder(&a, &keys).await;
    let outcome = a
        .fabric
        .fetch_prefix(
            &keys,
            PAGE as u64,
            Instant::now() + Duration::from_millis(300),
        )
        .await;
    assert!(outcome.pages.is_empty());
    let failures: Vec<_> = outcome
        .report
        .failures
        .iter()
        .map(|(node, e)| (node.to_string(), e))
        .collect();
    assert!(
        matches!(failures[..], [(ref node, LinkError::Deadline { pages: 0 })] if node == "b"),
        "{failures:?}"
    );
}
