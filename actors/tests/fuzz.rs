//! Property-based fuzzing of what untrusted clients control: the frame reader, the request
//! decoder and `register`'s layout validation. Random and mutated inputs must never panic, and
//! every answer must keep the protocol's promises (docs/protocol.md).
//!
//! CI runs the default 256 cases per property within `cargo test`. The long run (docs/protocol.md,
//! "Fuzzing") sets `PROPTEST_CASES`, e.g. a million cases per property in release mode:
//! `PROPTEST_CASES=1000000 cargo test --release -p pegaflow-actors --test fuzz`.

use pegaflow_actors::keys::NamespaceFields;
use pegaflow_actors::layout::EngineLayout;
use pegaflow_actors::protocol::{
    decode_request, read_frame, ErrorCode, FrameError, RegionSpec, RegisterRequest,
};
use proptest::prelude::*;
use rmpv::Value;

/// The golden request frames (payloads without their length prefix) the mutations start from.
fn golden_requests() -> Vec<Vec<u8>> {
    let raw = include_str!("../../connector/tests/golden/frames.json");
    let frames: Vec<serde_json::Value> = serde_json::from_str(raw).expect("frames.json parses");
    frames
        .iter()
        .filter(|f| f["name"].as_str().is_some_and(|n| n.ends_with("_request")))
        .map(|f| hex::decode(f["frame"].as_str().expect("hex")).expect("hex")[4..].to_vec())
        .collect()
}

fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, value).expect("encode");
    out
}

/// Any msgpack value, nested a little, with the field names and op names of the protocol
/// among the strings so decoding goes deep.
fn any_value() -> impl Strategy<Value = Value> {
    let words = prop::sample::select(vec![
        "hello",
        "register",
        "lookup",
        "save",
        "load",
        "release",
        "stats",
        "shm",
        "cuda_ipc",
        "bf16",
        "vllm_lbnhc",
        "kv_split",
        "mla",
        "",
    ]);
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u64..300).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        words.prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        prop::collection::vec(any::<u8>(), 0..80).prop_map(Value::Binary),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((field_name(), inner), 0..6).prop_map(|pairs| {
                Value::Map(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
            }),
        ]
    })
}

/// The names of every request field, and a few that are none.
fn field_name() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "client",
        "namespace",
        "region",
        "num_blocks",
        "segment_bytes",
        "layers",
        "engine_events",
        "load_progress",
        "keys",
        "lease",
        "engine",
        "block_ids",
        "persist",
        "after_events",
        "answer_when_queued",
        "model",
        "dtype",
        "layout",
        "block_size",
        "num_layers",
        "num_kv_heads",
        "head_dim",
        "tp_rank",
        "tp_size",
        "pp_stage",
        "shm",
        "bytes",
        "offset",
        "device",
        "cuda_ipc",
        "x",
        "",
    ])
}

/// A request map: a valid `v` most of the time, an `id` of any type, an `op` of any type
/// (mostly a real one), and random fields.
fn request_map() -> impl Strategy<Value = (Option<u64>, Vec<(String, Value)>)> {
    let v = prop_oneof![4 => Just(Value::from(1u64)), 1 => any_value()];
    let id = prop_oneof![3 => any::<u64>().prop_map(Some), 1 => Just(None)];
    let op = prop_oneof![
        4 => prop::sample::select(vec!["hello", "register", "lookup", "save", "load", "release", "stats"])
            .prop_map(Value::from),
        1 => any_value(),
    ];
    let fields = prop::collection::vec((field_name(), any_value()), 0..8);
    (v, id, op, fields).prop_map(|(v, id, op, fields)| {
        let mut map = vec![("v".to_owned(), v), ("op".to_owned(), op)];
        if let Some(id) = id {
            map.push(("id".to_owned(), Value::from(id)));
        }
        for (name, value) in fields {
            if !map.iter().any(|(k, _)| k == name) {
                map.push((name.to_owned(), value));
            }
        }
        (id, map)
    })
}

/// Every error code the node may send; a decoding error is one of the protocol's own.
fn assert_decode_error(code: ErrorCode, message: &str) {
    assert!(
        matches!(
            code,
            ErrorCode::BadFrame
                | ErrorCode::UnsupportedVersion
                | ErrorCode::UnknownOp
                | ErrorCode::BadField
        ),
        "{code:?}: {message}"
    );
    assert!(!message.is_empty(), "{code:?} without a message");
}

proptest! {
    /// Arbitrary bytes: an answer, never a panic.
    #[test]
    fn arbitrary_payloads_are_answered(payload in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Err(rejected) = decode_request(&payload) {
            assert_decode_error(rejected.error.code, &rejected.error.message);
        }
    }

    /// Golden frames with bytes flipped, inserted, removed or cut: an answer, never a panic.
    #[test]
    fn mutated_golden_frames_are_answered(
        pick in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
    ) {
        let frames = golden_requests();
        let mut payload = pick.get(&frames).clone();
        for (at, byte, kind) in edits {
            let i = at.index(payload.len().max(1));
            match kind {
                0 if !payload.is_empty() => payload[i] ^= byte.max(1),
                1 => payload.insert(i.min(payload.len()), byte),
                2 if !payload.is_empty() => { payload.remove(i); }
                _ => payload.truncate(i),
            }
        }
        if let Err(rejected) = decode_request(&payload) {
            assert_decode_error(rejected.error.code, &rejected.error.message);
        }
    }

    /// Structured requests with wrong types anywhere: the `id` is echoed whenever it was a
    /// readable unsigned integer, whatever else is wrong (docs/protocol.md: nil only when the
    /// id itself is unreadable).
    #[test]
    fn a_readable_id_is_always_echoed((id, map) in request_map()) {
        let value = Value::Map(map.into_iter().map(|(k, v)| (k.into(), v)).collect());
        let payload = encode(&value);
        match decode_request(&payload) {
            Ok((got, _)) => prop_assert_eq!(Some(got), id),
            Err(rejected) => {
                assert_decode_error(rejected.error.code, &rejected.error.message);
                prop_assert_eq!(rejected.id, id, "{}", rejected.error.message);
            }
        }
    }

    /// The frame reader never hands out more than the limit, whatever the stream says.
    #[test]
    fn frames_never_exceed_the_limit(
        stream in prop::collection::vec(any::<u8>(), 0..64),
        prefix in any::<u32>(),
        limit in 0u64..64,
    ) {
        let mut bytes = prefix.to_le_bytes().to_vec();
        bytes.extend_from_slice(&stream);
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let mut reader = bytes.as_slice();
        match runtime.block_on(read_frame(&mut reader, limit)) {
            Ok(Some(payload)) => {
                prop_assert!(payload.len() as u64 <= limit);
                prop_assert_eq!(payload.len() as u64, u64::from(prefix));
            }
            Ok(None) => prop_assert!(false, "a 4-byte prefix is not a clean end"),
            Err(FrameError::TooLarge { len, .. }) => prop_assert!(len > limit),
            Err(FrameError::Truncated) => prop_assert!(u64::from(prefix) > stream.len() as u64),
            Err(FrameError::Io(e)) => prop_assert!(false, "{e}"),
        }
    }

    /// A well-formed packed layout is accepted; with one field then set to anything, validation
    /// still answers without panicking, and whatever it accepts stays inside the region.
    #[test]
    fn well_formed_layouts_pass_and_any_change_stays_safe(
        block_size in 1u32..32,
        num_kv_heads in 1u32..4,
        head_dim in 1u32..16,
        num_layers in 1usize..4,
        num_blocks in 1u32..8,
        spare in 0u64..4096,
        field in 0usize..6,
        value in any::<u64>(),
    ) {
        let segment_bytes = u64::from(block_size * num_kv_heads * head_dim) * 2 * 2;
        let plane = u64::from(num_blocks) * segment_bytes;
        let mut req = RegisterRequest {
            namespace: NamespaceFields {
                model: "fuzz".into(),
                dtype: "bf16".into(),
                layout: "vllm_lbnhc".into(),
                block_size,
                num_layers: num_layers as u32,
                num_kv_heads,
                head_dim,
                tp_rank: 0,
                tp_size: 1,
                pp_stage: 0,
            },
            region: RegionSpec {
                shm: Some("r".into()),
                bytes: plane * num_layers as u64 + spare,
                ..RegionSpec::default()
            },
            num_blocks,
            segment_bytes,
            layers: (0..num_layers as u64).map(|l| vec![(l * plane, segment_bytes)]).collect(),
            engine_events: Vec::new(),
            load_progress: None,
        };
        prop_assert!(EngineLayout::validate(&req, u64::MAX).is_ok());
        let narrow = value as u32;
        match field {
            0 => req.namespace.block_size = narrow,
            1 => req.namespace.head_dim = narrow,
            2 => req.num_blocks = narrow,
            3 => req.segment_bytes = value,
            4 => req.region.bytes = value,
            _ => req.layers[0][0] = (value, req.layers[0][0].1),
        }
        if let Ok(accepted) = EngineLayout::validate(&req, u64::MAX) {
            let page = accepted.page_bytes();
            for ops in accepted.plan(&[(req.num_blocks - 1, 0)]) {
                for op in ops {
                    prop_assert!(op.region_offset + op.len <= req.region.bytes, "{op:?}");
                    prop_assert!(op.arena_offset + op.len <= page, "{op:?}");
                }
            }
        }
    }

    /// Any `register` layout: validation answers without panicking (no overflow, however large
    /// the fields), and a layout it accepts fits the page limit and copies only inside the
    /// declared region.
    #[test]
    fn accepted_layouts_stay_inside_their_region(
        layout in prop::sample::select(vec!["vllm_lbnhc", "vllm_lbhnc", "kv_split", "mla", "x"]),
        dtype in prop::sample::select(vec!["bf16", "fp32", "fp8_e4m3", "int3"]),
        block_size in prop_oneof![1u32..64, any::<u32>()],
        num_kv_heads in prop_oneof![1u32..8, any::<u32>()],
        head_dim in prop_oneof![1u32..64, any::<u32>()],
        num_blocks in prop_oneof![1u32..16, any::<u32>()],
        segment_bytes in prop_oneof![1u64..1 << 16, any::<u64>()],
        region_bytes in prop_oneof![1u64..1 << 24, any::<u64>()],
        layers in prop::collection::vec(
            prop::collection::vec((prop_oneof![0u64..1 << 20, any::<u64>()], prop_oneof![1u64..1 << 16, any::<u64>()]), 1..3),
            1..4,
        ),
        max_page in prop_oneof![1u64..1 << 20, any::<u64>()],
    ) {
        let req = RegisterRequest {
            namespace: NamespaceFields {
                model: "fuzz".into(),
                dtype: dtype.into(),
                layout: layout.into(),
                block_size,
                num_layers: layers.len() as u32,
                num_kv_heads,
                head_dim,
                tp_rank: 0,
                tp_size: 1,
                pp_stage: 0,
            },
            region: RegionSpec { shm: Some("r".into()), bytes: region_bytes, ..RegionSpec::default() },
            num_blocks,
            segment_bytes,
            layers,
            engine_events: Vec::new(),
            load_progress: None,
        };
        if let Ok(accepted) = EngineLayout::validate(&req, max_page) {
            prop_assert!(accepted.page_bytes() <= max_page);
            let last = num_blocks - 1;
            for ops in accepted.plan(&[(0, 0), (last, accepted.page_bytes())]) {
                for op in ops {
                    prop_assert!(op.region_offset + op.len <= region_bytes, "{op:?}");
                    prop_assert!(op.arena_offset + op.len <= 2 * accepted.page_bytes(), "{op:?}");
                }
            }
        }
    }
}
