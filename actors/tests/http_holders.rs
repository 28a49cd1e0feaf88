//! `POST /api/holders` through the real node's HTTP server, without the fabric (the fabric's
//! peers are covered in tests/fabric.rs).

mod support;

use serde_json::{json, Value};
use support::{node, post, three_blocks_saved};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_reports_the_exact_leading_blocks_this_node_holds() {
    let (node, _dir) = node(16).await;
    let (namespace, tokens, _keys, _region) =
        three_blocks_saved(&node, "http-holders", 16 * 4 + 5).await;
    let asked_before = node.context().metrics.lookup_blocks_total.get();
    let name = pegaflow_fabric::local_host_name();
    let ask = |tokens: &[u32], block_size: u32| {
        json!({"namespace": hex::encode(namespace), "block_size": block_size, "tokens": tokens})
            .to_string()
    };

    for (tokens, block_size, hits) in [
        (&tokens[..], 16, 3),
        (&tokens[..16 * 2 + 15], 16, 2),
        (&tokens[16..], 16, 0),
        (&tokens[..], 32, 0),
        (&[][..], 16, 0),
    ] {
        let (status, body) = post(node.http_addr(), "/api/holders", &ask(tokens, block_size)).await;
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(
            answer,
            json!({"holders": [{"node": name, "hits": hits}]}),
            "{} tokens, block size {block_size}",
            tokens.len()
        );
    }
    assert_eq!(
        node.context().metrics.lookup_blocks_total.get(),
        asked_before,
        "the router's questions are not engine lookups"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_body_is_a_400_naming_the_field() {
    let (node, _dir) = node(16).await;
    let namespace = "00".repeat(32);
    for (body, field) in [
        (
            json!({"namespace": "abc", "block_size": 16, "tokens": []}),
            "field `namespace`",
        ),
        (
            json!({"namespace": namespace, "block_size": 0, "tokens": [1]}),
            "field `block_size`",
        ),
        (
            json!({"namespace": namespace, "block_size": 16, "tokens": [1, -1]}),
            "tokens[1]",
        ),
        (json!({"namespace": namespace, "tokens": [1]}), "block_size"),
        (
            json!({"namespace": namespace, "block_size": 16, "tokens": [], "keys": []}),
            "keys",
        ),
    ] {
        let (status, text) = post(node.http_addr(), "/api/holders", &body.to_string()).await;
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains(field), "{body}: {text}");
    }
    let (status, _) = post(node.http_addr(), "/api/holders", "not json").await;
    assert_eq!(status, 400);
    node.shutdown().await;
}
