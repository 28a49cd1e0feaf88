//! `POST /api/lookup` through the real node's HTTP server.

mod support;

use support::{node, post, three_blocks_saved};

fn keys_json(keys: &[[u8; 32]]) -> String {
    let hex: Vec<String> = keys.iter().map(hex::encode).collect();
    serde_json::json!({ "keys": hex }).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_counts_the_leading_keys_held_without_touching_lookup_metrics() {
    let (node, _dir) = node(16).await;
    let (_namespace, _tokens, keys, _region) =
        three_blocks_saved(&node, "http-lookup", 16 * 4).await;
    let asked_before = node.context().metrics.lookup_blocks_total.get();

    let (status, body) = post(node.http_addr(), "/api/lookup", &keys_json(&keys)).await;
    assert_eq!((status, body.as_str()), (200, r#"{"hits":3}"#));
    let (status, body) = post(node.http_addr(), "/api/lookup", &keys_json(&keys[3..])).await;
    assert_eq!((status, body.as_str()), (200, r#"{"hits":0}"#));
    let (status, body) = post(node.http_addr(), "/api/lookup", &keys_json(&[])).await;
    assert_eq!((status, body.as_str()), (200, r#"{"hits":0}"#));
    assert_eq!(
        node.context().metrics.lookup_blocks_total.get(),
        asked_before
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_body_is_a_400_naming_the_field() {
    let (node, _dir) = node(16).await;
    let bad_key = format!(r#"{{"keys": ["{}", "12"]}}"#, "00".repeat(32));
    let (status, body) = post(node.http_addr(), "/api/lookup", &bad_key).await;
    assert_eq!(status, 400);
    assert!(body.starts_with("field `keys[1]`:"), "{body}");
    let (status, body) = post(node.http_addr(), "/api/lookup", r#"{"keys": [1]}"#).await;
    assert_eq!(status, 400);
    assert!(body.contains("keys[0]"), "{body}");
    let (status, _) = post(node.http_addr(), "/api/lookup", "not json").await;
    assert_eq!(status, 400);
    node.shutdown().await;
}
