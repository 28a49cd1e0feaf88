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
    /// The layout's segments are token-major (`[token, ...]`), so an engine whose tokens are not
    /// adjacent in memory (SGLang's `page_first` host pool) may describe the same page bytes
    /// token by token: `segments * block_size` runs of `segment_bytes / block_size`, listed
    /// in page order.
    token_major: bool,
}

impl Expected {
    /// Segments per layer implied by the request's `segment_bytes`: the layout's own
    /// segmentation or, for token-major layouts, one run per token.
    fn segments_for(&self, segment_bytes: u64, block_size: u32) -> Option<usize> {
        if segment_bytes == self.segment_bytes {
            return Some(self.segments);
        }
        let tokens = u64::from(block_size);
        let per_token = self.token_major
            && tokens > 1
            && segment_bytes.checked_mul(tokens) == Some(self.segment_bytes);
        per_token.then(|| self.segments * block_size as usize)
    }
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
    // The fields come from the client: a product that overflows must be refused, not wrapped
    // (2^31 for each once wrapped to a 0-byte page).
    let overflow = || {
        mismatch(format!(
            "fields `namespace.block_size` ({}), `namespace.num_kv_heads` ({}), \
             `namespace.head_dim` ({}): one block's bytes overflow 64 bits",
            ns.block_size, ns.num_kv_heads, ns.head_dim
        ))
    };
    let per_head = u64::from(ns.block_size)
        .checked_mul(u64::from(ns.head_dim))
        .and_then(|bytes| bytes.checked_mul(dtype))
        .ok_or_else(overflow)?;
    let all_heads = per_head
        .checked_mul(u64::from(ns.num_kv_heads))
        .ok_or_else(overflow)?;
    match ns.layout.as_str() {
        "vllm_lbnhc" | "vllm_lbhnc" => Ok(Expected {
            segments: 1,
            segment_bytes: all_heads.checked_mul(2).ok_or_else(overflow)?,
            token_major: ns.layout == "vllm_lbnhc",
        }),
        "kv_split" => Ok(Expected {
            segments: 2,
            segment_bytes: all_heads,
            token_major: true,
        }),
        "mla" if ns.num_kv_heads == 1 => Ok(Expected {
            segments: 1,
            segment_bytes: per_head,
            token_major: true,
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
        let Some(segments_per_layer) = want.segments_for(req.segment_bytes, ns.block_size) else {
            let per_token = if want.token_major && ns.block_size > 1 {
                format!(
                    " (or {} per token)",
                    want.segment_bytes / u64::from(ns.block_size)
                )
            } else {
                String::new()
            };
            return Err(mismatch(format!(
                "field `segment_bytes`: {} given, namespace ({} layout, block_size {}, {} kv heads, head_dim {}, {}) implies {}{per_token}",
                req.segment_bytes, ns.layout, ns.block_size, ns.num_kv_heads, ns.head_dim, ns.dtype, want.segment_bytes
            )));
        };
        if req.num_blocks == 0 {
            return Err(ProtoError::new(
                ErrorCode::BadField,
                "field `num_blocks`: must be > 0",
            ));
        }
        for (l, segments) in req.layers.iter().enumerate() {
            if segments.len() != segments_per_layer {
                return Err(mismatch(format!(
                    "field `layers[{l}]`: {} segments given, layout {} with segment_bytes {} has {}",
                    segments.len(),
                    ns.layout,
                    req.segment_bytes,
                    segments_per_layer
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
        // Checked here once, so `page_bytes` cannot overflow for a layout that was accepted.
        let segments = (req.layers.len() as u64).checked_mul(segments_per_layer as u64);
        match segments.and_then(|n| n.checked_mul(req.segment_bytes)) {
            Some(page_bytes) if page_bytes <= max_page_bytes => Ok(layout),
            page_bytes => Err(ProtoError::new(
                ErrorCode::PageTooLarge,
                format!(
                    "one block is {} bytes over all layers, above pool.max_page_size {}",
                    page_bytes.map_or_else(|| "more than 2^64".to_owned(), |b| b.to_string()),
                    max_page_bytes
                ),
            )),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::NamespaceFields;
    use crate::protocol::RegionSpec;

    const BLOCK: u32 = 4;
    const HEADS: u32 = 2;
    const DIM: u32 = 8;
    const NUM_BLOCKS: u32 = 3;

    /// A two-layer bf16 engine whose region holds every segment described.
    fn request(layout: &str, segment_bytes: u64, layers: Vec<Vec<(u64, u64)>>) -> RegisterRequest {
        RegisterRequest {
            namespace: NamespaceFields {
                model: "m".into(),
                dtype: "bf16".into(),
                layout: layout.into(),
                block_size: BLOCK,
                num_layers: 2,
                num_kv_heads: HEADS,
                head_dim: DIM,
                tp_rank: 0,
                tp_size: 1,
                pp_stage: 0,
            },
            region: RegionSpec {
                shm: Some("r".into()),
                bytes: 1 << 20,
                ..RegionSpec::default()
            },
            num_blocks: NUM_BLOCKS,
            segment_bytes,
            layers,
            engine_events: Vec::new(),
            load_progress: None,
        }
    }

    /// SGLang's `page_first` host pool, `[2, tokens, layers, heads, dim]`: per layer, every
    /// token's K row, then every token's V row.
    fn per_token_layers() -> (u64, Vec<Vec<(u64, u64)>>) {
        let row = u64::from(HEADS * DIM) * 2;
        let token_stride = 2 * row; // two layers per token
        let block_stride = u64::from(BLOCK) * token_stride;
        let plane = u64::from(NUM_BLOCKS) * block_stride;
        let layers = (0..2u64)
            .map(|l| {
                (0..2u64)
                    .flat_map(|kv| {
                        (0..u64::from(BLOCK))
                            .map(move |t| (kv * plane + t * token_stride + l * row, block_stride))
                    })
                    .collect()
            })
            .collect();
        (row, layers)
    }

    #[test]
    fn kv_split_accepts_one_run_per_token_in_page_order() {
        let (row, layers) = per_token_layers();
        let layout = EngineLayout::validate(&request("kv_split", row, layers), u64::MAX).unwrap();
        // Same page as the two-segment form: 2 layers x (K + V) x block x row.
        assert_eq!(layout.page_bytes(), 2 * 2 * u64::from(BLOCK) * row);
        let plan = layout.plan(&[(1, 0)]);
        // Layer 1's first run is token 0's K row; the page holds layer 0 first.
        let first = &plan[1][0];
        assert_eq!(first.arena_offset, 2 * u64::from(BLOCK) * row);
        assert_eq!(first.region_offset, 2 * u64::from(BLOCK) * row + row); // block 1, layer 1
        assert_eq!(first.len, row);
    }

    #[test]
    fn per_token_runs_must_cover_the_block() {
        let (row, mut layers) = per_token_layers();
        layers[1].pop();
        let err = EngineLayout::validate(&request("kv_split", row, layers), u64::MAX).unwrap_err();
        assert_eq!(err.code, ErrorCode::LayoutMismatch);
        assert!(err.message.contains("layers[1]"), "{}", err.message);
    }

    #[test]
    fn head_major_layouts_have_no_per_token_form() {
        let row = u64::from(HEADS * DIM) * 2 * 2; // one token's K|V row
        let layers = vec![vec![(0, 64 * row)], vec![(32 * row, 64 * row)]];
        let err =
            EngineLayout::validate(&request("vllm_lbhnc", row, layers), u64::MAX).unwrap_err();
        assert_eq!(err.code, ErrorCode::LayoutMismatch);
        assert!(
            err.message.contains("field `segment_bytes`"),
            "{}",
            err.message
        );
    }

    /// 2^31 for block size, heads and head dim once wrapped to a 0-byte page and was accepted.
    #[test]
    fn namespace_sizes_that_overflow_are_refused_naming_the_fields() {
        for layout in ["vllm_lbnhc", "kv_split"] {
            let mut req = request(layout, 0, vec![vec![(0, 1)], vec![(0, 1)]]);
            req.namespace.block_size = 1 << 31;
            req.namespace.num_kv_heads = 1 << 31;
            req.namespace.head_dim = 1 << 31;
            let err = EngineLayout::validate(&req, u64::MAX).unwrap_err();
            assert_eq!(err.code, ErrorCode::LayoutMismatch, "{layout}");
            for field in [
                "`namespace.block_size`",
                "`namespace.num_kv_heads`",
                "overflow",
            ] {
                assert!(err.message.contains(field), "{layout}: {}", err.message);
            }
        }
    }

    /// A page of more than 2^64 bytes is too large, not wrapped below `pool.max_page_size`.
    #[test]
    fn page_bytes_that_overflow_are_too_large() {
        let mut req = request("vllm_lbnhc", 0, Vec::new());
        req.namespace.block_size = 1 << 20;
        req.namespace.head_dim = 1 << 20;
        req.namespace.num_kv_heads = 1 << 16;
        req.namespace.num_layers = 64;
        let segment_bytes = (1u64 << 20) * (1 << 20) * 2 * (1 << 16) * 2; // 2^58; 64 layers: 2^64
        req.segment_bytes = segment_bytes;
        req.region.bytes = u64::MAX;
        req.num_blocks = 1;
        req.layers = vec![vec![(0, segment_bytes)]; 64];
        let err = EngineLayout::validate(&req, u64::MAX).unwrap_err();
        assert_eq!(err.code, ErrorCode::PageTooLarge, "{}", err.message);
        assert!(err.message.contains("more than 2^64"), "{}", err.message);
    }
}
