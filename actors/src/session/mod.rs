//! `SessionActor`: one per connector connection.
//!
//! A reader task turns the socket into `Frame` messages, in order; replies are written to the
//! socket's write half as they are ready, by whichever task finished the op. Ops that change the session
//! (`hello`, `register`, `release`) run inside the actor, in order; `save` and `load` are
//! validated in order and then run as their own tasks, so a long load never holds back a
//! lookup. When the connection ends, the session returns every lease and region it held.

mod ops;
mod responder;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

use crate::context::NodeContext;
use crate::keys::BlockKey;
use crate::layout::EngineLayout;
use crate::limits::{Held, SessionLimits};
use crate::pool::OwnerId;
use crate::protocol::{
    decode_request, encode_frame, encode_reply, read_frame, ErrorCode, FrameError, ProtoError,
    Request,
};
use crate::transfer::{RegionId, TransferMsg};
use crate::transfers::TransferHandle;
use responder::{ReplySink, Responder};

/// An engine registered on this session.
pub struct Engine {
    pub layout: EngineLayout,
    /// The transfer actor of the engine's GPU, which opened its region.
    pub transfer: Arc<TransferHandle>,
    pub region: RegionId,
    pub namespace: BlockKey,
    /// How many `engine_events` the engine registered: a save's `after_events` index them.
    pub engine_events: u32,
    /// What the engine counts against the limits (node and session regions, session bytes);
    /// given back when the session and the engine's last job let go of it.
    pub held: Vec<Held>,
}

/// Messages a session handles.
pub enum SessionMsg {
    /// One frame payload read from the socket.
    Frame { payload: Vec<u8>, arrived: Instant },
    /// The peer closed the connection or it broke.
    Closed,
}

/// What a session is started with.
pub struct SessionArgs {
    pub id: OwnerId,
    pub stream: UnixStream,
    pub ctx: Arc<NodeContext>,
}

/// A session's state: its engines and the channel to its writer.
pub struct SessionState {
    id: OwnerId,
    ctx: Arc<NodeContext>,
    replies: ReplySink,
    engines: HashMap<u32, Arc<Engine>>,
    next_engine: u32,
    reader: JoinHandle<()>,
    limits: SessionLimits,
    /// This connection's place under `limits.max_sessions`.
    _connection: Held,
}

/// The session actor.
pub struct SessionActor;

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SessionMsg>,
        args: SessionArgs,
    ) -> Result<SessionState, ActorProcessingErr> {
        let connection = match args.ctx.limits.sessions.take(1) {
            Ok(held) => held,
            Err(error) => return Err(refuse_connection(args.stream, args.id, error).await),
        };
        let (read_half, write_half) = args.stream.into_split();
        let replies = ReplySink::new(write_half);
        let reader = tokio::spawn(read_frames(
            read_half,
            myself,
            replies.clone(),
            args.ctx.max_frame_bytes,
            args.id,
        ));
        args.ctx.metrics.sessions.inc();
        tracing::info!(session = args.id, "session opened");
        let limits = args.ctx.limits.session();
        Ok(SessionState {
            id: args.id,
            ctx: args.ctx,
            replies,
            engines: HashMap::new(),
            next_engine: 1,
            reader,
            limits,
            _connection: connection,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        message: SessionMsg,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SessionMsg::Frame { payload, arrived } => handle_frame(state, &payload, arrived).await,
            SessionMsg::Closed => myself.stop(Some("connection closed".into())),
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SessionMsg>,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        state.reader.abort();
        // The engines' limit shares go back before the regions close, so once the node shows
        // the regions closed (stats) their room under the limits is free too.
        state.engines.clear();
        release_session(&state.ctx, state.id);
        tracing::info!(session = state.id, "session closed");
        Ok(())
    }
}

/// Answers a connection over `limits.max_sessions` with the error, then closes it.
async fn refuse_connection(
    mut stream: UnixStream,
    id: OwnerId,
    error: ProtoError,
) -> ActorProcessingErr {
    tracing::warn!(session = id, message = %error.message, "connection refused");
    if let Ok(frame) = encode_frame(&encode_reply(None, &Err(error.clone()))) {
        let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, &frame).await;
    }
    error.message.into()
}

/// Returns everything a session held: its lookup leases and its engines' regions. Also called
/// by the node when a session actor fails, so a crash leaks nothing.
pub fn release_session(ctx: &NodeContext, id: OwnerId) {
    // A failed send means the pool or transfer actor is already gone (shutdown): nothing to return.
    ctx.pools.release_owner(id);
    for transfer in ctx.transfers.all() {
        if let Ok(actor) = transfer.actor() {
            let _ = actor.cast(TransferMsg::CloseOwner { owner: id });
        }
    }
    ctx.metrics.sessions.dec();
}

async fn handle_frame(state: &mut SessionState, payload: &[u8], arrived: Instant) {
    let (id, request) = match decode_request(payload) {
        Ok(decoded) => decoded,
        Err(rejected) => {
            let responder = Responder::new(rejected.id, "invalid", arrived, state);
            responder.send(Err(rejected.error)).await;
            return;
        }
    };
    let responder = Responder::new(Some(id), request.op(), arrived, state);
    if let Err(error) = state.ctx.check_open() {
        return responder.send(Err(error)).await;
    }
    match request {
        Request::Hello(req) => responder.send(ops::hello::handle(&state.ctx, &req)).await,
        Request::Register(req) => {
            responder
                .send(ops::register::handle(state, req).await)
                .await
        }
        Request::Lookup(req) => responder.send(ops::lookup::handle(state, req).await).await,
        Request::Save(req) => match ops::prepare_blocks(state, req) {
            Ok((job, running)) => drop(tokio::spawn(async move {
                responder.send_when(ops::save::run(job)).await;
                drop(running);
            })),
            Err(error) => responder.send(Err(error)).await,
        },
        Request::Load(req) => match ops::prepare_blocks(state, req) {
            Ok((job, running)) => drop(tokio::spawn(async move {
                responder.send_when(ops::load::run(job)).await;
                drop(running);
            })),
            Err(error) => responder.send(Err(error)).await,
        },
        Request::Release(req) => responder.send(ops::release::handle(state, req).await).await,
        Request::Stats(_) => responder.send(ops::stats::handle(&state.ctx).await).await,
    }
}

async fn read_frames(
    mut reader: tokio::net::unix::OwnedReadHalf,
    session: ActorRef<SessionMsg>,
    replies: ReplySink,
    max_frame: u64,
    id: OwnerId,
) {
    loop {
        match read_frame(&mut reader, max_frame).await {
            Ok(Some(payload)) => {
                let frame = SessionMsg::Frame {
                    payload,
                    arrived: Instant::now(),
                };
                if session.cast(frame).is_err() {
                    return;
                }
            }
            Ok(None) => break,
            Err(FrameError::TooLarge { len, limit }) => {
                tracing::warn!(
                    session = id,
                    len,
                    limit,
                    "frame too large; closing connection"
                );
                let error = ProtoError::new(
                    ErrorCode::FrameTooLarge,
                    format!("frame of {len} bytes exceeds socket.max_frame of {limit} bytes; closing the connection"),
                );
                if let Ok(frame) = encode_frame(&encode_reply(None, &Err(error))) {
                    replies.write(&frame).await;
                }
                break;
            }
            Err(error) => {
                tracing::info!(session = id, %error, "connection ended");
                break;
            }
        }
    }
    let _ = session.cast(SessionMsg::Closed);
}
