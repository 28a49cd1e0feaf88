//! Prefix-aware choice of the prefill engine through the router's HTTP interface, against fake
//! engines that serve vLLM's `/tokenize` and a fake node that serves `/api/holders`: the engine
//! whose node holds the longest prefix wins, a holder too busy loses to the least loaded, and
//! whatever fails, the choice falls back to load and the request is answered.

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{json, Value};
use support::*;
use tokio::task::JoinHandle;

const COMPLETIONS: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";

/// The token ids every fake engine's `/tokenize` answers.
fn tokens() -> Vec<u32> {
    (100..140).collect()
}

fn text_completion(prompt: &str) -> Value {
    json!({"model": "m", "prompt": prompt, "max_tokens": 8, "temperature": 0})
}

/// A prefill engine that "saves" `keys` to `node` and reports them, answers `/tokenize` with
/// [`tokens`], and hangs on the prefill of `hang_on` (a prompt it is busy with).
async fn engine(node: &FakeNode, keys: Vec<String>, hang_on: Option<&'static str>) -> FakeEngine {
    let node = node.clone();
    FakeEngine::start(move |received| {
        if received.path == "/tokenize" {
            return Reply::Json(
                200,
                json!({"count": 40, "max_model_len": 4096, "tokens": tokens()}),
            );
        }
        if hang_on.is_some_and(|prompt| received.body["prompt"] == prompt) {
            return Reply::Hang;
        }
        node.save(&keys);
        Reply::Json(200, prefill_answer(&keys))
    })
    .await
}

/// The bodies `engine` received on `/tokenize`.
fn tokenized(engine: &FakeEngine) -> Vec<Value> {
    engine
        .received()
        .into_iter()
        .filter(|received| received.path == "/tokenize")
        .map(|received| received.body)
        .collect()
}

/// Prefill requests `engine` received.
fn prefills(engine: &FakeEngine) -> usize {
    engine
        .received()
        .iter()
        .filter(|received| received.path != "/tokenize")
        .count()
}

fn holders(list: &[(&str, u32)]) -> NodeReply {
    let holders: Vec<Value> = list
        .iter()
        .map(|(node, hits)| json!({"node": node, "hits": hits}))
        .collect();
    NodeReply::Json(200, json!({ "holders": holders }))
}

/// The `pegaflow_router_prefix_choices_total` of each outcome: prefix, load, unknown, failed.
fn choices(page: &str) -> [f64; 4] {
    ["prefix", "load", "unknown", "failed"].map(|outcome| {
        let series = format!(r#"pegaflow_router_prefix_choices_total{{outcome="{outcome}"}}"#);
        value(page, &series)
    })
}

/// Sends a request in the background: it stays in flight on an engine that hangs.
fn send_in_background(router: &str, body: Value) -> JoinHandle<Answer> {
    let router = router.to_string();
    tokio::spawn(async move { send(&router, COMPLETIONS, body).await })
}

async fn wait_for_prefills(engine: &FakeEngine, count: usize) {
    while prefills(engine) < count {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn the_prefill_engine_whose_node_holds_more_blocks_wins_once_a_handoff_was_seen() {
    within(async {
        let node = FakeNode::start(1).await;
        let first = engine(&node, keys("a", 2), None).await;
        let second = engine(&node, keys("b", 2), None).await;
        let decode = decode_engine(&node, Vec::new(), "ok").await;
        node.answer_holders(holders(&[("n-first", 1), ("n-second", 2), ("n-other", 9)]));
        let prefill = [
            format!("n-first={}", first.url),
            format!("n-second={}", second.url),
        ];
        let prefill: Vec<&str> = prefill.iter().map(String::as_str).collect();
        let router = router(&prefill, &[&decode.url], &node.url, &[]).await;

        // No handoff seen yet: the namespace and block size are unknown, so load decides.
        let answer = send(&router, COMPLETIONS, text_completion("hello")).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.header("x-pegaflow-prefill"), first.url);
        assert!(node.holders_asked().is_empty());
        assert!(tokenized(&first).is_empty() && tokenized(&second).is_empty());
        assert_eq!(choices(&metrics(&router).await), [0.0, 0.0, 1.0, 0.0]);

        let answer = send(&router, COMPLETIONS, text_completion("hello")).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.header("x-pegaflow-prefill"), second.url);
        assert_eq!(answer.header("x-pegaflow-handoff"), "confirmed");
        assert_eq!(
            tokenized(&first),
            [json!({"model": "m", "prompt": "hello"})]
        );
        assert_eq!(
            node.holders_asked(),
            [json!({"namespace": NAMESPACE, "block_size": BLOCK_SIZE, "tokens": tokens()})]
        );

        let messages = json!([{"role": "user", "content": "hi"}]);
        let chat = json!({"model": "m", "messages": messages, "max_completion_tokens": 8});
        let answer = send(&router, CHAT, chat).await;
        assert_eq!(answer.header("x-pegaflow-prefill"), second.url);
        assert_eq!(
            tokenized(&first)[1],
            json!({"model": "m", "messages": messages})
        );

        // Token ids in the body need no tokenizing.
        let ids = json!({"model": "m", "prompt": [7, 8, 9], "max_tokens": 8});
        let answer = send(&router, COMPLETIONS, ids).await;
        assert_eq!(answer.header("x-pegaflow-prefill"), second.url);
        assert_eq!(tokenized(&first).len() + tokenized(&second).len(), 2);
        assert_eq!(node.holders_asked()[2]["tokens"], json!([7, 8, 9]));

        let page = metrics(&router).await;
        assert_eq!(choices(&page), [3.0, 0.0, 1.0, 0.0]);
        assert_eq!(
            value(&page, "pegaflow_router_prefix_cached_blocks_sum"),
            6.0
        );
        assert_eq!(
            value(&page, "pegaflow_router_prefix_cached_blocks_count"),
            3.0
        );
    })
    .await;
}

#[tokio::test]
async fn a_holder_too_busy_loses_to_the_least_loaded_engine() {
    within(async {
        let node = FakeNode::start(1).await;
        let idle = engine(&node, keys("c", 1), None).await;
        let busy = engine(&node, keys("d", 1), Some("busy")).await;
        let decode = decode_engine(&node, Vec::new(), "ok").await;
        node.answer_holders(holders(&[("n-busy", 3)]));
        let prefill = [idle.url.clone(), format!("n-busy={}", busy.url)];
        let prefill: Vec<&str> = prefill.iter().map(String::as_str).collect();
        let flags = ["--prefix-load-gap", "1"];
        let router = router(&prefill, &[&decode.url], &node.url, &flags).await;
        let warm = send(&router, COMPLETIONS, text_completion("warm")).await;
        assert_eq!(warm.header("x-pegaflow-prefill"), idle.url);

        // The holder wins while it has at most one more request in flight than the idle one.
        let first = send_in_background(&router, text_completion("busy"));
        wait_for_prefills(&busy, 1).await;
        let second = send_in_background(&router, text_completion("busy"));
        wait_for_prefills(&busy, 2).await;

        let answer = send(&router, COMPLETIONS, text_completion("next")).await;

        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.header("x-pegaflow-prefill"), idle.url);
        let page = metrics(&router).await;
        let in_flight = format!(
            r#"pegaflow_router_backend_in_flight{{backend="{}",role="prefill"}}"#,
            busy.url
        );
        assert_eq!(value(&page, &in_flight), 2.0);
        assert_eq!(choices(&page), [2.0, 1.0, 1.0, 0.0]);
        assert_eq!(
            value(&page, "pegaflow_router_prefix_cached_blocks_sum"),
            6.0
        );
        first.abort();
        second.abort();
    })
    .await;
}

#[tokio::test]
async fn a_failing_or_hanging_node_falls_back_to_load_and_is_counted() {
    within(async {
        let node = FakeNode::start(1).await;
        let first = engine(&node, keys("e", 1), None).await;
        let second = engine(&node, keys("f", 1), None).await;
        let decode = decode_engine(&node, Vec::new(), "ok").await;
        let prefill = [first.url.clone(), format!("n-second={}", second.url)];
        let prefill: Vec<&str> = prefill.iter().map(String::as_str).collect();
        // Were the budget not kept, a hanging node would cost the request its deadline (504).
        let flags = ["--prefix-timeout-s", "0.2", "--request-timeout-s", "5"];
        let router = router(&prefill, &[&decode.url], &node.url, &flags).await;
        send(&router, COMPLETIONS, text_completion("learn")).await;

        for reply in [
            NodeReply::Json(500, json!({"error": "down"})),
            NodeReply::Json(200, json!({"holders": "not a list"})),
            NodeReply::Hang,
        ] {
            node.answer_holders(reply);
            let answer = send(&router, COMPLETIONS, text_completion("p")).await;
            assert_eq!(answer.status, StatusCode::OK);
            assert_eq!(answer.header("x-pegaflow-prefill"), first.url);
            assert_eq!(answer.header("x-pegaflow-handoff"), "confirmed");
        }

        let page = metrics(&router).await;
        assert_eq!(choices(&page), [0.0, 0.0, 1.0, 3.0]);
        assert_eq!(node.holders_asked().len(), 3);
        assert_eq!(
            value(&page, "pegaflow_router_prefix_cached_blocks_count"),
            0.0
        );
    })
    .await;
}

#[tokio::test]
async fn a_failing_or_hanging_tokenizer_falls_back_to_load_and_is_counted() {
    within(async {
        let node = FakeNode::start(1).await;
        let hangs = |received: &Received| match received.path.as_str() {
            "/tokenize" => Reply::Hang,
            _ => Reply::Json(200, prefill_answer(&[])),
        };
        let fails = |received: &Received| match received.path.as_str() {
            "/tokenize" => Reply::Die,
            _ => Reply::Json(200, prefill_answer(&[])),
        };
        let decode = decode_engine(&node, Vec::new(), "ok").await;
        for script in [hangs, fails] {
            let first = FakeEngine::start(script).await;
            let second = FakeEngine::start(script).await;
            let prefill = [format!("n-first={}", first.url), second.url.clone()];
            let prefill: Vec<&str> = prefill.iter().map(String::as_str).collect();
            let flags = ["--prefix-timeout-s", "0.2", "--request-timeout-s", "5"];
            let router = router(&prefill, &[&decode.url], &node.url, &flags).await;
            send(&router, COMPLETIONS, text_completion("learn")).await;

            let answer = send(&router, COMPLETIONS, text_completion("p")).await;

            assert_eq!(answer.status, StatusCode::OK);
            assert_eq!(answer.header("x-pegaflow-prefill"), first.url);
            assert_eq!(tokenized(&first).len(), 1, "tokenized on the least loaded");
            assert!(node.holders_asked().is_empty());
            assert_eq!(choices(&metrics(&router).await), [0.0, 0.0, 1.0, 1.0]);
        }
    })
    .await;
}

#[tokio::test]
async fn without_a_block_size_in_the_handoff_the_choice_stays_by_load() {
    within(async {
        let node = FakeNode::start(1).await;
        let older = |received: &Received| match received.path.as_str() {
            "/tokenize" => Reply::Json(200, json!({"tokens": [1, 2]})),
            _ => Reply::Json(
                200,
                json!({"kv_transfer_params": {"pegaflow_handoff": {
                "ranks": [{"namespace": NAMESPACE, "keys": []}]}}}),
            ),
        };
        let first = FakeEngine::start(older).await;
        let second = FakeEngine::start(older).await;
        let decode = decode_engine(&node, Vec::new(), "ok").await;
        let prefill = [first.url.clone(), format!("n-second={}", second.url)];
        let prefill: Vec<&str> = prefill.iter().map(String::as_str).collect();
        let router = router(&prefill, &[&decode.url], &node.url, &[]).await;

        for _ in 0..2 {
            let answer = send(&router, COMPLETIONS, text_completion("p")).await;
            assert_eq!(answer.header("x-pegaflow-handoff"), "confirmed");
            assert_eq!(answer.header("x-pegaflow-prefill"), first.url);
        }

        assert_eq!(choices(&metrics(&router).await), [0.0, 0.0, 2.0, 0.0]);
        assert!(tokenized(&first).is_empty() && node.holders_asked().is_empty());
    })
    .await;
}

#[tokio::test]
async fn nodes_subscribed_by_events_are_chosen_from_their_events_alone() {
    within(async {
        let node = FakeNode::start(1).await;
        // The node's HTTP answer would fail the choice: only the events can decide it.
        node.answer_holders(NodeReply::Json(500, json!({"error": "not to be asked"})));
        let first = engine(&node, keys("a", 2), None).await;
        let second = engine(&node, keys("b", 2), None).await;
        let decode = decode_engine(&node, Vec::new(), "ok").await;
        let (first_node, second_node) =
            (FakePublisher::start().await, FakePublisher::start().await);
        let prefill = [
            format!("n-first={}", first.url),
            format!("n-second={}", second.url),
        ];
        let prefill: Vec<&str> = prefill.iter().map(String::as_str).collect();
        let events = [
            format!("n-first={}", first_node.endpoints),
            format!("n-second={}", second_node.endpoints),
        ];
        let flags = ["--node-events", &events[0], "--node-events", &events[1]];
        let router = router(&prefill, &[&decode.url], &node.url, &flags).await;
        // A first request teaches the router the namespace and block size (by load).
        let prompt: Vec<u32> = (0..3 * BLOCK_SIZE).collect();
        let ids = json!({"model": "m", "prompt": prompt, "max_tokens": 8});
        assert_eq!(
            send(&router, COMPLETIONS, ids.clone()).await.status,
            StatusCode::OK
        );

        // The second node holds two blocks of the prompt, one in memory and one on SSD.
        let blocks = chain_keys(&prompt);
        second_node.publish(vec![event("BlockStored", "CPU", &blocks[..2])]);
        second_node.publish(vec![
            event("BlockRemoved", "CPU", &blocks[1..2]),
            event("BlockStored", "STORAGE", &blocks[1..2]),
        ]);
        // Until the router's subscriptions have caught up (replay included) it asks the node,
        // fails and goes by load; then the events decide alone.
        loop {
            let answer = send(&router, COMPLETIONS, ids.clone()).await;
            if answer.header("x-pegaflow-prefill") == second.url {
                break;
            }
        }
        let asked = node.holders_asked().len();
        let before = choices(&metrics(&router).await);
        let answer = send(&router, COMPLETIONS, ids.clone()).await;
        assert_eq!(answer.header("x-pegaflow-prefill"), second.url);
        assert_eq!(
            node.holders_asked().len(),
            asked,
            "decided from events alone"
        );
        assert_eq!(choices(&metrics(&router).await)[0], before[0] + 1.0);

        // The blocks move: evicted from the second node, stored on the first.
        second_node.publish(vec![event("BlockRemoved", "CPU", &blocks[..1])]);
        second_node.publish(vec![event("BlockRemoved", "STORAGE", &blocks[1..2])]);
        first_node.publish(vec![event("BlockStored", "CPU", &blocks)]);
        loop {
            let answer = send(&router, COMPLETIONS, ids.clone()).await;
            if answer.header("x-pegaflow-prefill") == first.url {
                break;
            }
        }
        assert_eq!(node.holders_asked().len(), asked, "still from events alone");
    })
    .await;
}
