//! `register`: validates an engine's layout against its namespace and opens its region.

use std::sync::Arc;

use pegaflow_gpu_dma::RegionSource;

use crate::context::ask;
use crate::layout::EngineLayout;
use crate::protocol::{ErrorCode, ProtoError, RegisterReply, RegisterRequest, ReplyBody};
use crate::session::{Engine, SessionState};
use crate::transfer::TransferMsg;

/// Registers the engine on this session; the region stays open until the session ends.
pub async fn handle(
    state: &mut SessionState,
    req: RegisterRequest,
) -> Result<ReplyBody, ProtoError> {
    let layout = EngineLayout::validate(&req, state.ctx.max_page_bytes)?;
    let source = RegionSource::SharedMemory {
        name: req.region.shm.clone(),
        bytes: req.region.bytes,
    };
    let owner = state.id;
    let region = ask(&state.ctx.transfer, "transfer", |reply| TransferMsg::Open {
        owner,
        source,
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
            region,
            namespace,
        }),
    );
    tracing::info!(session = state.id, engine, model = %req.namespace.model, page_bytes, "engine registered");
    Ok(ReplyBody::Register(RegisterReply {
        engine,
        namespace: namespace.to_vec(),
        page_bytes,
    }))
}
