//! The golden frames shared with the Python suite: Rust must decode every frame and encode the
//! decoded value back to exactly the same bytes.

use serde::Deserialize;

use super::*;

#[derive(Deserialize)]
struct Golden {
    name: String,
    frame: String,
}

fn golden() -> Vec<(String, Vec<u8>)> {
    let raw = include_str!("../../../connector/tests/golden/frames.json");
    let entries: Vec<Golden> = serde_json::from_str(raw).expect("frames.json parses");
    entries
        .into_iter()
        .map(|g| {
            let frame = hex::decode(&g.frame).expect("hex frame");
            let len = u32::from_le_bytes(frame[..4].try_into().expect("prefix")) as usize;
            assert_eq!(len, frame.len() - 4, "{}: length prefix", g.name);
            (g.name, frame[4..].to_vec())
        })
        .collect()
}

fn reencode_reply<T>(payload: &[u8], wrap: fn(T) -> ReplyBody) -> Vec<u8>
where
    T: serde::de::DeserializeOwned,
{
    let (id, body) = decode_reply::<T>(payload).expect("reply decodes");
    encode_reply(id, &body.map(wrap))
}

#[test]
fn every_golden_frame_round_trips_byte_exact() {
    let frames = golden();
    assert!(frames.len() >= 15);
    for (name, payload) in frames {
        let reencoded = if name.ends_with("_request") {
            let (id, request) =
                decode_request(&payload).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            encode_request(id, &request).expect("encodes")
        } else if name.starts_with("error_reply") {
            let (id, body) = decode_reply::<HelloReply>(&payload).expect("error reply decodes");
            assert!(body.is_err(), "{name} is an error");
            encode_reply(id, &body.map(ReplyBody::Hello))
        } else if name.starts_with("hello") {
            reencode_reply(&payload, ReplyBody::Hello)
        } else if name.starts_with("register") {
            reencode_reply(&payload, ReplyBody::Register)
        } else if name.starts_with("lookup") {
            reencode_reply(&payload, ReplyBody::Lookup)
        } else if name.starts_with("save") {
            reencode_reply(&payload, ReplyBody::Save)
        } else if name.starts_with("load") {
            reencode_reply(&payload, ReplyBody::Load)
        } else if name.starts_with("release") {
            reencode_reply(&payload, ReplyBody::Release)
        } else {
            panic!("golden frame {name} has no check");
        };
        assert_eq!(hex::encode(&reencoded), hex::encode(&payload), "{name}");
    }
}

#[test]
fn bad_requests_name_the_problem() {
    let encode = |value: rmpv::Value| {
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &value).expect("encode");
        buf
    };
    let map = |pairs: Vec<(&str, rmpv::Value)>| {
        rmpv::Value::Map(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    };
    let base = || vec![("v", 1.into()), ("id", 9.into())];

    let mut wrong_type = base();
    wrong_type.extend([
        ("op", "save".into()),
        ("engine", 1.into()),
        ("keys", rmpv::Value::Binary(vec![0; 32])),
        ("block_ids", rmpv::Value::Array(vec!["x".into()])),
    ]);
    let err = decode_request(&encode(map(wrong_type))).expect_err("wrong type");
    assert_eq!(err.id, Some(9));
    assert_eq!(err.error.code, ErrorCode::BadField);
    assert!(
        err.error.message.contains("block_ids[0]"),
        "{}",
        err.error.message
    );

    let mut missing = base();
    missing.push(("op", "load".into()));
    let err = decode_request(&encode(map(missing))).expect_err("missing");
    assert_eq!(err.error.code, ErrorCode::BadField);
    assert!(
        err.error.message.contains("engine"),
        "{}",
        err.error.message
    );

    let mut unknown = base();
    unknown.push(("op", "frobnicate".into()));
    let err = decode_request(&encode(map(unknown))).expect_err("unknown op");
    assert_eq!(err.error.code, ErrorCode::UnknownOp);
    assert!(err.error.message.contains("frobnicate"));

    let version = map(vec![
        ("v", 7.into()),
        ("id", 1.into()),
        ("op", "stats".into()),
    ]);
    let err = decode_request(&encode(version)).expect_err("version");
    assert_eq!(err.error.code, ErrorCode::UnsupportedVersion);

    let mut stats = base();
    stats.push(("op", "stats".into()));
    let whole = encode(map(stats));
    let err = decode_request(&whole[..whole.len() - 2]).expect_err("truncated");
    assert_eq!(err.error.code, ErrorCode::BadFrame);
    assert_eq!(err.id, None);

    let mut trailing = whole.clone();
    trailing.push(0xc0);
    let err = decode_request(&trailing).expect_err("trailing");
    assert_eq!(err.error.code, ErrorCode::BadFrame);

    let positional = rmpv::Value::Array(vec![1.into(), 9.into(), "stats".into()]);
    for not_a_map in [rmpv::Value::Array(vec![]), positional, 5.into()] {
        let err = decode_request(&encode(not_a_map)).expect_err("not a map");
        assert_eq!(err.error.code, ErrorCode::BadFrame);
        assert_eq!(err.id, None);
    }

    // The id is echoed when `v` or `op` is malformed but the id itself is readable.
    for (v, op) in [("1".into(), "stats".into()), (1.into(), 5.into())] {
        let frame = map(vec![("v", v), ("id", 41.into()), ("op", op)]);
        let err = decode_request(&encode(frame)).expect_err("malformed header");
        assert_eq!(err.id, Some(41), "{}", err.error.message);
        assert_eq!(err.error.code, ErrorCode::BadField);
    }

    // 0xc1 is no msgpack value: the frame is bad, whichever field it sits in.
    let mut reserved = encode(map(vec![
        ("v", 1.into()),
        ("id", 3.into()),
        ("op", "stats".into()),
    ]));
    let at = reserved.len() - "stats".len() - 1;
    reserved.truncate(at);
    reserved.push(0xc1);
    let err = decode_request(&reserved).expect_err("0xc1");
    assert_eq!(err.error.code, ErrorCode::BadFrame, "{}", err.error.message);
    assert!(err.error.message.contains("0xc1"), "{}", err.error.message);

    let mut keys_as_str = base();
    keys_as_str.extend([("op", "lookup".into()), ("keys", "x".repeat(32).into())]);
    let err = decode_request(&encode(map(keys_as_str))).expect_err("str keys");
    assert_eq!(err.error.code, ErrorCode::BadField);
    assert!(err.error.message.contains("keys"), "{}", err.error.message);
}

#[test]
fn gpu_event_fields_are_optional_and_omitted_when_empty() {
    let save = |after_events: Vec<u32>| {
        Request::Save(BlocksRequest {
            engine: 1,
            keys: vec![7; 32],
            block_ids: vec![2],
            persist: false,
            answer_when_queued: !after_events.is_empty(),
            after_events,
        })
    };
    let plain = encode_request(5, &save(Vec::new())).expect("encode");
    let value = rmpv::decode::read_value(&mut plain.as_slice()).expect("msgpack");
    let has_key = |value: &rmpv::Value, key: &str| {
        value
            .as_map()
            .expect("map")
            .iter()
            .any(|(k, _)| k.as_str() == Some(key))
    };
    assert!(!has_key(&value, "after_events"), "{value}");
    assert!(!has_key(&value, "answer_when_queued"), "{value}");
    assert_eq!(
        decode_request(&plain).expect("decode"),
        (5, save(Vec::new()))
    );

    let waiting = encode_request(6, &save(vec![0, 1])).expect("encode");
    let value = rmpv::decode::read_value(&mut waiting.as_slice()).expect("msgpack");
    assert!(has_key(&value, "after_events"), "{value}");
    assert!(has_key(&value, "answer_when_queued"), "{value}");
    assert_eq!(
        decode_request(&waiting).expect("decode"),
        (6, save(vec![0, 1]))
    );
}
