//! The router's behaviour through its HTTP interface, against fake engines and a fake node:
//! the handoff order, choice, retries, fallbacks, deadlines, engines killed mid-request and
//! mid-stream, and streaming.

mod support;

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;
use support::*;
use tokio::sync::Notify;

const COMPLETIONS: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";

fn completion(stream: bool) -> serde_json::Value {
    json!({"model": "m", "prompt": [1, 2, 3], "max_tokens": 16, "temperature": 0,
           "stream": stream})
}

fn events(texts: &[&str]) -> Vec<String> {
    texts
        .iter()
        .map(|text| format!("data: {text}\n\n"))
        .collect()
}

#[tokio::test]
async fn decode_starts_only_once_the_node_holds_the_prefilled_blocks() {
    within(async {
        let node = FakeNode::start(3).await;
        let keys = keys("a", 4);
        let prefill = prefill_engine(&node, keys.clone()).await;
        let decode = decode_engine(&node, keys.clone(), "decoded").await;
        let router = router(&[&prefill.url], &[&decode.url], &node.url, &[]).await;

        let answer = send(&router, COMPLETIONS, completion(false)).await;

        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.json()["held_at_arrival"], true, "{}", answer.text());
        assert_eq!(answer.json()["choices"][0]["text"], "decoded");
        assert_eq!(answer.header("x-pegaflow-handoff"), "confirmed");
        assert_eq!(answer.header("x-pegaflow-prefill"), prefill.url);
        assert_eq!(answer.header("x-pegaflow-decode"), decode.url);
        assert!(node.lookups() >= 3);
        let asked = &prefill.received()[0];
        assert_eq!(asked.path, COMPLETIONS);
        assert_eq!(asked.body["max_tokens"], 1);
        assert_eq!(asked.body["stream"], false);
        assert_eq!(asked.body["kv_transfer_params"]["pegaflow_handoff"], true);
        assert_eq!(decode.received()[0].body, completion(false));

        let page = metrics(&router).await;
        assert_eq!(value(&page, "pegaflow_router_handoff_seconds_count"), 1.0);
        assert_eq!(value(&page, "pegaflow_router_prefill_seconds_count"), 1.0);
        for reason in ["prefill_failed", "no_params", "unconfirmed", "node_error"] {
            let series = format!(r#"pegaflow_router_fallbacks_total{{reason="{reason}"}}"#);
            assert_eq!(value(&page, &series), 0.0);
        }
        let ok = r#"pegaflow_router_requests_total{endpoint="completions",outcome="ok"}"#;
        assert_eq!(value(&page, ok), 1.0);
    })
    .await;
}

#[tokio::test]
async fn chat_completions_take_the_same_path() {
    within(async {
        let node = FakeNode::start(1).await;
        let keys = keys("b", 2);
        let prefill = prefill_engine(&node, keys.clone()).await;
        let decode = decode_engine(&node, keys, "chat").await;
        let router = router(&[&prefill.url], &[&decode.url], &node.url, &[]).await;
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                          "max_completion_tokens": 8});

        let answer = send(&router, CHAT, body.clone()).await;

        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.json()["held_at_arrival"], true);
        let asked = &prefill.received()[0];
        assert_eq!(asked.path, CHAT);
        assert_eq!(asked.body["max_tokens"], 1);
        assert!(asked.body.get("max_completion_tokens").is_none());
        assert_eq!(decode.received()[0].path, CHAT);
        assert_eq!(decode.received()[0].body, body);
    })
    .await;
}

#[tokio::test]
async fn a_refused_prefill_is_retried_on_the_next_one() {
    within(async {
        let node = FakeNode::start(1).await;
        let keys = keys("c", 2);
        let dead = dead_url().await;
        let prefill = prefill_engine(&node, keys.clone()).await;
        let decode = decode_engine(&node, keys, "ok").await;
        let router = router(&[&dead, &prefill.url], &[&decode.url], &node.url, &[]).await;

        let answer = send(&router, COMPLETIONS, completion(false)).await;

        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.header("x-pegaflow-prefill"), prefill.url);
        assert_eq!(answer.header("x-pegaflow-handoff"), "confirmed");
        let page = metrics(&router).await;
        assert_eq!(
            value(&page, r#"pegaflow_router_retries_total{role="prefill"}"#),
            1.0
        );
        let failures =
            format!(r#"pegaflow_router_backend_failures_total{{backend="{dead}",role="prefill"}}"#);
        assert_eq!(value(&page, &failures), 1.0);

        // The dead engine now cools down: the next request goes to the live one first.
        let answer = send(&router, COMPLETIONS, completion(false)).await;
        assert_eq!(answer.header("x-pegaflow-prefill"), prefill.url);
        assert_eq!(value(&metrics(&router).await, &failures), 1.0);
    })
    .await;
}

#[tokio::test]
async fn a_prefill_killed_mid_request_falls_back_to_decode_side_prefill() {
    within(async {
        let node = FakeNode::start(1).await;
        let prefill = FakeEngine::start(|_| Reply::Die).await;
        let decode = decode_engine(&node, keys("d", 2), "computed on decode").await;
        let router = router(&[&prefill.url], &[&decode.url], &node.url, &[]).await;

        let answer = send(&router, COMPLETIONS, completion(false)).await;

        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.json()["choices"][0]["text"], "computed on decode");
        assert_eq!(answer.header("x-pegaflow-handoff"), "prefill_failed");
        assert_eq!(answer.header("x-pegaflow-prefill"), "");
        assert_eq!(
            prefill.received().len(),
            1,
            "the prefill engine got the request"
        );
        assert_eq!(decode.received()[0].body, completion(false));
        let page = metrics(&router).await;
        assert_eq!(
            value(
                &page,
                r#"pegaflow_router_fallbacks_total{reason="prefill_failed"}"#
            ),
            1.0
        );
    })
    .await;
}

#[tokio::test]
async fn a_hung_prefill_times_out_and_is_retried() {
    within(async {
        let node = FakeNode::start(1).await;
        let keys = keys("e", 2);
        let hung = FakeEngine::start(|_| Reply::Hang).await;
        let prefill = prefill_engine(&node, keys.clone()).await;
        let decode = decode_engine(&node, keys, "ok").await;
        let flags = ["--prefill-timeout-s", "0.2"];
        let router = router(
            &[&hung.url, &prefill.url],
            &[&decode.url],
            &node.url,
            &flags,
        )
        .await;

        let answer = send(&router, COMPLETIONS, completion(false)).await;

        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(hung.received().len(), 1);
        assert_eq!(answer.header("x-pegaflow-prefill"), prefill.url);
        assert_eq!(answer.header("x-pegaflow-handoff"), "confirmed");
        assert_eq!(answer.json()["held_at_arrival"], true);
    })
    .await;
}

#[tokio::test]
async fn a_prefill_answer_without_a_handoff_decodes_without_asking_the_node() {
    within(async {
        let node = FakeNode::start(1).await;
        let prefill =
            FakeEngine::start(|_| Reply::Json(200, json!({"kv_transfer_params": null}))).await;
        let decode = decode_engine(&node, keys("f", 1), "ok").await;
        let router = router(&[&prefill.url], &[&decode.url], &node.url, &[]).await;

        let answer = send(&router, COMPLETIONS, completion(false)).await;

        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.header("x-pegaflow-handoff"), "no_params");
        assert_eq!(node.lookups(), 0);
        let page = metrics(&router).await;
        assert_eq!(
            value(
                &page,
                r#"pegaflow_router_fallbacks_total{reason="no_params"}"#
            ),
            1.0
        );
    })
    .await;
}

#[tokio::test]
async fn a_prompt_shorter_than_a_block_has_nothing_to_wait_for() {
    within(async {
        let node = FakeNode::start(usize::MAX).await;
        let prefill = prefill_engine(&node, Vec::new()).await;
        let decode = decode_engine(&node, Vec::new(), "ok").await;
        let router = router(&[&prefill.url], &[&decode.url], &node.url, &[]).await;

        let answer = send(&router, COMPLETIONS, completion(false)).await;

        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.header("x-pegaflow-handoff"), "confirmed");
        assert_eq!(node.lookups(), 0, "no keys, nothing to ask the node");
    })
    .await;
}

#[tokio::test]
async fn blocks_never_confirmed_fall_back_at_the_handoff_deadline() {
    within(async {
        let node = FakeNode::start(usize::MAX).await;
        let keys = keys("g", 3);
        let prefill = prefill_engine(&node, keys.clone()).await;
        let decode = decode_engine(&node, keys, "ok").await;
        let flags = ["--handoff-timeout-s", "0.2"];
        let router = router(&[&prefill.url], &[&decode.url], &node.url, &flags).await;

        let answer = send(&router, COMPLETIONS, completion(false)).await;

        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.header("x-pegaflow-handoff"), "unconfirmed");
        assert_eq!(answer.json()["held_at_arrival"], false);
        assert!(node.lookups() > 1, "the router polled");
        let page = metrics(&router).await;
        assert_eq!(
            value(
                &page,
                r#"pegaflow_router_fallbacks_total{reason="unconfirmed"}"#
            ),
            1.0
        );
        assert_eq!(value(&page, "pegaflow_router_handoff_seconds_count"), 0.0);
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_node_is_a_node_error_fallback() {
    within(async {
        let node = FakeNode::start(1).await;
        let keys = keys("h", 2);
        let prefill = prefill_engine(&node, keys.clone()).await;
        let decode = decode_engine(&node, keys, "ok").await;
        let dead_node = dead_url().await;
        let flags = ["--handoff-timeout-s", "0.2"];
        let router = router(&[&prefill.url], &[&decode.url], &dead_node, &flags).await;

        let answer = send(&router, COMPLETIONS, completion(false)).await;

        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.header("x-pegaflow-handoff"), "node_error");
    })
    .await;
}

#[tokio::test]
async fn a_prefill_4xx_is_not_retried_and_the_decode_engine_answers() {
    within(async {
        let node = FakeNode::start(1).await;
        let refusing = FakeEngine::start(|_| {
            Reply::Json(400, json!({"error": {"message": "prompt too long"}}))
        })
        .await;
        let spare = prefill_engine(&node, keys("i", 1)).await;
        let decode = FakeEngine::start(|_| {
            Reply::Json(
                400,
                json!({"error": {"message": "prompt too long (decode)"}}),
            )
        })
        .await;
        let router = router(&[&refusing.url, &spare.url], &[&decode.url], &node.url, &[]).await;

        let answer = send(&router, COMPLETIONS, completion(false)).await;

        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            answer.json()["error"]["message"],
            "prompt too long (decode)"
        );
        assert_eq!(answer.header("x-pegaflow-handoff"), "prefill_rejected");
        assert!(spare.received().is_empty(), "a 4xx is not retried");
        let page = metrics(&router).await;
        let rejected =
            r#"pegaflow_router_requests_total{endpoint="completions",outcome="rejected"}"#;
        assert_eq!(value(&page, rejected), 1.0);
        assert_eq!(
            value(&page, r#"pegaflow_router_retries_total{role="prefill"}"#),
            0.0
        );
    })
    .await;
}

#[tokio::test]
async fn a_decode_killed_mid_request_or_failing_is_retried_on_another() {
    within(async {
        let node = FakeNode::start(1).await;
        let keys = keys("j", 2);
        let prefill = prefill_engine(&node, keys.clone()).await;
        let killed = FakeEngine::start(|_| Reply::Die).await;
        let failing = FakeEngine::start(|_| Reply::Json(503, json!({"error": "busy"}))).await;
        let healthy = decode_engine(&node, keys, "retried").await;
        let decode = [killed.url.as_str(), &failing.url, &healthy.url];
        let router = router(&[&prefill.url], &decode, &node.url, &[]).await;

        let answer = send(&router, COMPLETIONS, completion(false)).await;

        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.json()["choices"][0]["text"], "retried");
        assert_eq!(answer.header("x-pegaflow-decode"), healthy.url);
        assert_eq!((killed.received().len(), failing.received().len()), (1, 1));
        let page = metrics(&router).await;
        assert_eq!(
            value(&page, r#"pegaflow_router_retries_total{role="decode"}"#),
            2.0
        );
    })
    .await;
}

#[tokio::test]
async fn when_every_decode_fails_the_client_gets_a_502_naming_each() {
    within(async {
        let node = FakeNode::start(1).await;
        let prefill = prefill_engine(&node, keys("k", 1)).await;
        let killed = FakeEngine::start(|_| Reply::Die).await;
        let dead = dead_url().await;
        let router = router(&[&prefill.url], &[&killed.url, &dead], &node.url, &[]).await;

        let answer = send(&router, COMPLETIONS, completion(false)).await;

        assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
        let message = answer.json()["error"]["message"]
            .as_str()
            .expect("message")
            .to_string();
        assert!(
            message.contains(&killed.url) && message.contains(&dead),
            "{message}"
        );
        assert!(message.contains("cannot connect"), "{message}");
        let page = metrics(&router).await;
        let error = r#"pegaflow_router_requests_total{endpoint="completions",outcome="error"}"#;
        assert_eq!(value(&page, error), 1.0);
    })
    .await;
}

#[tokio::test]
async fn a_hung_decode_ends_at_the_request_deadline_with_a_504() {
    within(async {
        let node = FakeNode::start(1).await;
        let prefill = prefill_engine(&node, keys("l", 1)).await;
        let hung = FakeEngine::start(|_| Reply::Hang).await;
        let flags = ["--request-timeout-s", "0.5"];
        let router = router(&[&prefill.url], &[&hung.url], &node.url, &flags).await;

        let answer = send(&router, COMPLETIONS, completion(false)).await;

        assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
        let message = answer.json()["error"]["message"].to_string();
        assert!(message.contains("--request-timeout-s"), "{message}");
        let page = metrics(&router).await;
        let timeout = r#"pegaflow_router_requests_total{endpoint="completions",outcome="timeout"}"#;
        assert_eq!(value(&page, timeout), 1.0);
        let in_flight = format!(
            r#"pegaflow_router_backend_in_flight{{backend="{}",role="decode"}}"#,
            hung.url
        );
        assert_eq!(
            value(&page, &in_flight),
            0.0,
            "an abandoned attempt is not in flight"
        );
    })
    .await;
}

#[tokio::test]
async fn a_stream_passes_through_event_by_event() {
    within(async {
        let node = FakeNode::start(1).await;
        let prefill = prefill_engine(&node, keys("m", 1)).await;
        let decode =
            FakeEngine::start(|_| Reply::Events(events(&["{\"a\":1}", "{\"b\":2}", "[DONE]"])))
                .await;
        let router = router(&[&prefill.url], &[&decode.url], &node.url, &[]).await;

        let answer = send(&router, COMPLETIONS, completion(true)).await;

        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.header("content-type"), "text/event-stream");
        assert_eq!(answer.header("x-pegaflow-handoff"), "confirmed");
        assert_eq!(
            answer.text(),
            events(&["{\"a\":1}", "{\"b\":2}", "[DONE]"]).concat()
        );
        assert_eq!(prefill.received()[0].body["stream"], false);
        assert_eq!(decode.received()[0].body["stream"], true);
        let page = metrics(&router).await;
        let ok = r#"pegaflow_router_requests_total{endpoint="completions",outcome="ok"}"#;
        assert_eq!(value(&page, ok), 1.0);
    })
    .await;
}

#[tokio::test]
async fn a_decode_that_dies_before_its_first_event_is_retried() {
    within(async {
        let node = FakeNode::start(1).await;
        let prefill = prefill_engine(&node, keys("n", 1)).await;
        let dying = FakeEngine::start(|_| Reply::EventsThenDie(Vec::new())).await;
        let healthy = FakeEngine::start(|_| Reply::Events(events(&["x", "[DONE]"]))).await;
        let router = router(&[&prefill.url], &[&dying.url, &healthy.url], &node.url, &[]).await;

        let answer = send(&router, CHAT, completion(true)).await;

        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.text(), events(&["x", "[DONE]"]).concat());
        assert_eq!(answer.header("x-pegaflow-decode"), healthy.url);
        assert_eq!(dying.received().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_decode_killed_mid_stream_ends_the_stream_with_an_error_event() {
    within(async {
        let node = FakeNode::start(1).await;
        let prefill = prefill_engine(&node, keys("o", 1)).await;
        let dying = FakeEngine::start(|_| {
            Reply::EventsThenDie(vec!["data: first\n\n".into(), "data: half an ev".into()])
        })
        .await;
        let spare = FakeEngine::start(|_| Reply::Events(events(&["[DONE]"]))).await;
        let router = router(&[&prefill.url], &[&dying.url, &spare.url], &node.url, &[]).await;

        let answer = send(&router, COMPLETIONS, completion(true)).await;

        assert_eq!(answer.status, StatusCode::OK);
        let text = answer.text();
        let mut events = text.split("\n\n");
        assert_eq!(events.next(), Some("data: first"));
        let error: serde_json::Value = serde_json::from_str(
            events
                .next()
                .expect("an error event")
                .trim_start_matches("data: "),
        )
        .expect("the error event is JSON");
        let message = error["error"]["message"].as_str().expect("message");
        assert!(
            message.contains(&dying.url) && message.contains("mid-stream"),
            "{message}"
        );
        assert_eq!(events.next(), Some("data: [DONE]"));
        assert!(
            !text.contains("half an ev"),
            "a partial event is never forwarded"
        );
        assert!(
            spare.received().is_empty(),
            "no retry once bytes were streamed"
        );
        let page = metrics(&router).await;
        let broken =
            r#"pegaflow_router_requests_total{endpoint="completions",outcome="stream_error"}"#;
        assert_eq!(value(&page, broken), 1.0);
    })
    .await;
}

#[tokio::test]
async fn the_next_request_goes_to_the_decode_engine_with_less_in_flight() {
    within(async {
        let node = FakeNode::start(1).await;
        let prefill = prefill_engine(&node, keys("p", 1)).await;
        let gate = Arc::new(Notify::new());
        let held = gate.clone();
        let busy = FakeEngine::start(move |_| Reply::Gated {
            first: events(&["first"]),
            gate: held.clone(),
            rest: events(&["[DONE]"]),
        })
        .await;
        let idle = FakeEngine::start(|_| Reply::Json(200, json!({"choices": []}))).await;
        let router = router(&[&prefill.url], &[&busy.url, &idle.url], &node.url, &[]).await;

        let streaming = request(
            &router,
            COMPLETIONS,
            Method::POST,
            completion(true).to_string(),
        )
        .await;
        assert_eq!(streaming.headers()["x-pegaflow-decode"], busy.url.as_str());
        let in_flight = format!(
            r#"pegaflow_router_backend_in_flight{{backend="{}",role="decode"}}"#,
            busy.url
        );
        assert_eq!(value(&metrics(&router).await, &in_flight), 1.0);

        let answer = send(&router, COMPLETIONS, completion(false)).await;
        assert_eq!(answer.header("x-pegaflow-decode"), idle.url);

        gate.notify_one();
        let rest = streaming
            .into_body()
            .collect()
            .await
            .expect("stream")
            .to_bytes();
        assert_eq!(rest, events(&["first", "[DONE]"]).concat());
        assert_eq!(value(&metrics(&router).await, &in_flight), 0.0);
    })
    .await;
}

#[tokio::test]
async fn a_body_that_is_not_a_json_object_is_a_400() {
    within(async {
        let node = FakeNode::start(1).await;
        let prefill = FakeEngine::start(|_| Reply::Hang).await;
        let router = router(&[&prefill.url], &[&prefill.url], &node.url, &[]).await;

        let answer = send(&router, COMPLETIONS, json!([1, 2])).await;

        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        assert_eq!(answer.json()["error"]["code"], 400);
        assert!(prefill.received().is_empty());
    })
    .await;
}

#[tokio::test]
async fn healthz_and_every_metric_are_served() {
    within(async {
        let node = FakeNode::start(1).await;
        let router = router(&[&node.url], &[&node.url], &node.url, &[]).await;
        let health = request(&router, "/healthz", Method::GET, String::new()).await;
        assert_eq!(health.status(), StatusCode::OK);
        let page = metrics(&router).await;
        for name in [
            "pegaflow_router_requests_total",
            "pegaflow_router_prefill_seconds",
            "pegaflow_router_handoff_seconds",
            "pegaflow_router_fallbacks_total",
            "pegaflow_router_retries_total",
            "pegaflow_router_backend_in_flight",
            "pegaflow_router_backend_failures_total",
            "pegaflow_router_prefix_choices_total",
            "pegaflow_router_prefix_cached_blocks",
        ] {
            assert!(
                page.contains(&format!("# TYPE {name} ")),
                "{name} missing:\n{page}"
            );
        }
    })
    .await;
}
