//! An engine's KV layout: checked against its namespace at `register`, then turned into the
//! per-layer copy lists of each save and load.
//!
//! A stored page holds one block of every layer, layer by layer and segment by segment, so a
//! load can finish layer `L` before layer `L + 1` and an engine can start on it.

use pegaflow_gpu_dma::CopyOp;

use crate::protocol::{ErrorCode, ProtoError, RegisterRequest};

/// A validated layout: where each block of each layer lives in the engine's region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineLayout {
    pub num_blocks: u32,
    pub segment_bytes: u64,
    /// Per layer, `(offset, block_stride)` of each segment.
    pub layers: Vec<Vec<(u64, u64)>>,
}

/// Segments per layer and the per-segment byte count a namespace implies.
struct Expected {
    segments: usize,
    segment_bytes: u64,
}

fn dtype_bytes(dtype: &str) -> Option<u64> {
    match dtype {
        "bf16" | "fp16" => Some(2),
        "fp32" => Some(4),
        "fp8_e4m3" | "fp8_e5m2" => Some(1),
        _ => None,
    }
}

fn mismatch(message: String) -> ProtoError {
    ProtoError::new(ErrorCode::LayoutMismatch, message)
}

fn expected(req: &RegisterRequest) -> Result<Expected, ProtoError> {
    let ns = &req.namespace;
    let dtype = dtype_bytes(&ns.dtype).ok_or_else(|| {
        mismatch(format!(
            "field `namespace.dtype`: unknown dtype {:?}; expected bf16, fp16, fp32, fp8_e4m3 or fp8_e5m2",
            ns.dtype
        ))
    })?;
    let per_head = u64::from(ns.block_size) * u64::from(ns.head_dim) * dtype;
    let heads = u64::from(ns.num_kv_heads);
    match ns.layout.as_str() {
        "vllm_lbnhc" | "vllm_lbhnc" => Ok(Expected {
            segments: 1,
            segment_bytes: per_head * heads * 2,
        }),
        "kv_split" => Ok(Expected {
            segments: 2,
            segment_bytes: per_head * heads,
        }),
        "mla" if ns.num_kv_heads == 1 => Ok(Expected {
            segments: 1,
            segment_bytes: per_head,
        }),
        "mla" => Err(mismatch(format!(
            "field `namespace.num_kv_heads`: mla stores one latent per token, so it must be 1, not {}",
            ns.num_kv_heads
        ))),
        other => Err(mismatch(format!(
            "field `namespace.layout`: unknown layout {other:?}; expected vllm_lbnhc, vllm_lbhnc, kv_split or mla"
        ))),
    }
}

impl EngineLayout {
    /// Checks a `register` request's layout against its namespace and region size.
    pub fn validate(req: &RegisterRequest, max_page_bytes: u64) -> Result<Self, ProtoError> {
        let ns = &req.namespace;
        let want = expected(req)?;
        if ns.block_size == 0 || ns.num_layers == 0 || ns.head_dim == 0 || ns.num_kv_heads == 0 {
            return Err(mismatch(
                "fields `namespace.block_size`, `num_layers`, `num_kv_heads`, `head_dim` must be > 0".into(),
            ));
        }
        if req.layers.len() != ns.num_layers as usize {
            return Err(mismatch(format!(
                "field `layers`: {} layers given, namespace has num_layers {}",
                req.layers.len(),
                ns.num_layers
            )));
        }
        if req.segment_bytes != want.segment_bytes {
            return Err(mismatch(format!(
                "field `segment_bytes`: {} given, namespace ({} layout, block_size {}, {} kv heads, head_dim {}, {}) implies {}",
                req.segment_bytes, ns.layout, ns.block_size, ns.num_kv_heads, ns.head_dim, ns.dtype, want.segment_bytes
            )));
        }
        if req.num_blocks == 0 {
            return Err(ProtoError::new(
                ErrorCode::BadField,
                "field `num_blocks`: must be > 0",
            ));
        }
        for (l, segments) in req.layers.iter().enumerate() {
            if segments.len() != want.segments {
                return Err(mismatch(format!(
                    "field `layers[{l}]`: {} segments given, layout {} has {}",
                    segments.len(),
                    ns.layout,
                    want.segments
                )));
            }
            for (s, &(offset, stride)) in segments.iter().enumerate() {
                let end = u64::from(req.num_blocks - 1)
                    .checked_mul(stride)
                    .and_then(|v| v.checked_add(offset))
                    .and_then(|v| v.checked_add(req.segment_bytes));
                if end.is_none_or(|end| end > req.region.bytes) {
                    return Err(ProtoError::new(
                        ErrorCode::RegionUnavailable,
                        format!(
                            "field `layers[{l}][{s}]`: offset {offset} + {} blocks x stride {stride} runs past the region's {} bytes",
                            req.num_blocks, req.region.bytes
                        ),
                    ));
                }
                if stride < req.segment_bytes {
                    return Err(mismatch(format!(
                        "field `layers[{l}][{s}]`: block_stride {stride} is smaller than segment_bytes {}",
                        req.segment_bytes
                    )));
                }
            }
        }
        let layout = Self {
            num_blocks: req.num_blocks,
            segment_bytes: req.segment_bytes,
            layers: req.layers.clone(),
        };
        if layout.page_bytes() > max_page_bytes {
            return Err(ProtoError::new(
                ErrorCode::PageTooLarge,
                format!(
                    "one block is {} bytes over all layers, above pool.max_page_size {}",
                    layout.page_bytes(),
                    max_page_bytes
                ),
            ));
        }
        Ok(layout)
    }

    /// Bytes of one stored block: every layer, every segment.
    pub fn page_bytes(&self) -> u64 {
        self.layers.iter().map(|s| s.len() as u64).sum::<u64>() * self.segment_bytes
    }

    /// Checks every block id against the region.
    pub fn check_blocks(&self, block_ids: &[u32]) -> Result<(), ProtoError> {
        match block_ids.iter().position(|&b| b >= self.num_blocks) {
            Some(i) => Err(ProtoError::new(
                ErrorCode::OutOfRange,
                format!(
                    "field `block_ids[{i}]`: block id {} is not below num_blocks {}",
                    block_ids[i], self.num_blocks
                ),
            )),
            None => Ok(()),
        }
    }

    /// Per layer, the copies moving `blocks` (`(block_id, page offset in the arena)`).
    pub fn plan(&self, blocks: &[(u32, u64)]) -> Vec<Vec<CopyOp>> {
        let mut page_offset = 0;
        self.layers
            .iter()
            .map(|segments| {
                let ops = segments
                    .iter()
                    .enumerate()
                    .flat_map(|(s, &(offset, stride))| {
                        let within_page = page_offset + s as u64 * self.segment_bytes;
                        blocks.iter().map(move |&(block, page)| CopyOp {
                            region_offset: offset + u64::from(block) * stride,
                            arena_offset: page + within_page,
                            len: self.segment_bytes,
                        })
                    })
                    .collect();
                page_offset += segments.len() as u64 * self.segment_bytes;
                ops
            })
            .collect()
    }
}
