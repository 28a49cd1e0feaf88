//! `register`: validates an engine's layout against its namespace and opens its region.

use std::sync::Arc;

use pegaflow_gpu_dma::{ProgressBoard, RegionSource, EVENT_RING_SLOTS};

use crate::context::ask;
use crate::layout::EngineLayout;
use crate::protocol::bin::Bin;
use crate::protocol::{
    ErrorCode, ProtoError, RegionSpec, RegisterReply, RegisterRequest, ReplyBody,
};
use crate::session::{Engine, SessionState};
use crate::transfer::TransferMsg;

/// Turns the wire's region description (and a GPU engine's event handles) into what the copy
/// engine opens.
fn region_source(spec: &RegionSpec, engine_events: &[Bin]) -> Result<RegionSource, ProtoError> {
    let bad = |message: String| ProtoError::new(ErrorCode::BadField, message);
    match (&spec.shm, &spec.cuda_ipc) {
        (Some(_), None) if !engine_events.is_empty() => Err(bad(
            "field `engine_events`: only GPU engines (`region.cuda_ipc`) have events".into(),
        )),
        (Some(name), None) => Ok(RegionSource::SharedMemory {
            name: name.clone(),
            bytes: spec.bytes,
        }),
        (None, Some(handle)) => {
            let handle: [u8; 64] = handle.as_slice().try_into().map_err(|_| {
                bad(format!(
                    "field `region.cuda_ipc`: {} bytes given; a cudaIpcMemHandle_t is 64 bytes",
                    handle.len()
                ))
            })?;
            let engine_events = engine_events
                .iter()
                .enumerate()
                .map(|(i, Bin(event))| {
                    event.as_slice().try_into().map_err(|_| {
                        bad(format!(
                            "field `engine_events[{i}]`: {} bytes given; a cudaIpcEventHandle_t \
                             is 64 bytes",
                            event.len()
                        ))
                    })
                })
                .collect::<Result<_, _>>()?;
            Ok(RegionSource::CudaIpc {
                handle,
                offset: spec.offset,
                bytes: spec.bytes,
                engine_events,
            })
        }
        _ => Err(bad(
            "field `region`: give exactly one of `shm` (shared memory) or `cuda_ipc` (GPU)".into(),
        )),
    }
}

/// Maps a GPU engine's load progress board, one word per slot of the node's event ring.
fn progress_board(
    source: &RegionSource,
    name: Option<&str>,
) -> Result<Option<Arc<ProgressBoard>>, ProtoError> {
    let Some(name) = name else { return Ok(None) };
    if !matches!(source, RegionSource::CudaIpc { .. }) {
        return Err(ProtoError::new(
            ErrorCode::BadField,
            "field `load_progress`: only GPU engines (`region.cuda_ipc`) have layer events",
        ));
    }
    ProgressBoard::open(name, EVENT_RING_SLOTS)
        .map(|board| Some(Arc::new(board)))
        .map_err(|e| {
            ProtoError::new(
                ErrorCode::RegionUnavailable,
                format!("field `load_progress`: {e}"),
            )
        })
}

/// Registers the engine on this session; the region stays open until the session ends.
pub async fn handle(
    state: &mut SessionState,
    req: RegisterRequest,
) -> Result<ReplyBody, ProtoError> {
    let layout = EngineLayout::validate(&req, state.ctx.max_page_bytes)?;
    let source = region_source(&req.region, &req.engine_events)?;
    let progress = progress_board(&source, req.load_progress.as_deref())?;
    // Taken before the region is opened, so a refused engine never costs the node a file.
    let held = vec![
        state.limits.regions.take(1)?,
        state.limits.region_bytes.take(req.region.bytes)?,
        state.ctx.limits.regions.take(1)?,
    ];
    let owner = state.id;
    let cuda_ipc = matches!(source, RegionSource::CudaIpc { .. });
    let transfer = state
        .ctx
        .transfers
        .route(req.region.gpu.as_deref(), cuda_ipc)?;
    let opened = ask(&transfer.actor()?, "transfer", |reply| TransferMsg::Open {
        owner,
        source,
        progress,
        reply,
    })
    .await?
    .map_err(|e| ProtoError::new(ErrorCode::RegionUnavailable, format!("field `region`: {e}")))?;
    let namespace = req.namespace.digest();
    let page_bytes = layout.page_bytes();
    let engine = state.next_engine;
    state.next_engine += 1;
    state.engines.insert(
        engine,
        Arc::new(Engine {
            layout,
            transfer: transfer.clone(),
            region: opened.id,
            namespace,
            engine_events: req.engine_events.len() as u32,
            held,
        }),
    );
    tracing::info!(session = state.id, engine, model = %req.namespace.model, page_bytes, device = %transfer.device, "engine registered");
    Ok(ReplyBody::Register(RegisterReply {
        engine,
        namespace: namespace.to_vec(),
        page_bytes,
        layer_events: opened
            .event_handles
            .iter()
            .map(|handle| Bin(handle.to_vec()))
            .collect(),
    }))
}
