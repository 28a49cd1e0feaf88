//! A small async client of the socket protocol, for Rust tests, benchmarks and the scenario
//! harness. The Python package is the engines' client; this one speaks the same frames.

use std::path::Path;

use serde::de::DeserializeOwned;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::keys::{join_keys, BlockKey};
use crate::protocol::{
    decode_reply, encode_frame, encode_request, read_frame, BlocksRequest, FrameError, HelloReply,
    HelloRequest, LoadReply, LookupReply, LookupRequest, ProtoError, RegisterReply,
    RegisterRequest, ReleaseReply, ReleaseRequest, Request, SaveReply, StatsReply, StatsRequest,
};

/// Largest reply the client accepts.
const MAX_REPLY: u64 = 64 << 20;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("node replied {0}")]
    Node(ProtoError),
    #[error("malformed reply: {0}")]
    Protocol(String),
}

/// One connection; requests may be pipelined with [`Client::send`] and [`Client::recv`].
pub struct Client {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    next_id: u64,
}

impl Client {
    /// Connects and says `hello`.
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        let (reader, writer) = UnixStream::connect(path).await?.into_split();
        let mut client = Self {
            reader,
            writer,
            next_id: 1,
        };
        let _: HelloReply = client
            .call(Request::Hello(HelloRequest {
                client: concat!("pegaflow-rs/", env!("CARGO_PKG_VERSION")).into(),
                version: Some(env!("CARGO_PKG_VERSION").into()),
            }))
            .await?;
        Ok(client)
    }

    /// Sends a request without waiting; returns its id.
    pub async fn send(&mut self, request: &Request) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let payload =
            encode_request(id, request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.writer.write_all(&encode_frame(&payload)?).await?;
        Ok(id)
    }

    /// Reads the next reply as `T`, whichever request it answers.
    pub async fn recv<T: DeserializeOwned>(
        &mut self,
    ) -> Result<(Option<u64>, Result<T, ProtoError>), ClientError> {
        let payload = read_frame(&mut self.reader, MAX_REPLY)
            .await?
            .ok_or_else(|| ClientError::Protocol("connection closed".into()))?;
        decode_reply(&payload).map_err(|e| ClientError::Protocol(e.message))
    }

    /// Sends one request and waits for its reply (no other request may be in flight).
    pub async fn call<T: DeserializeOwned>(&mut self, request: Request) -> Result<T, ClientError> {
        let id = self.send(&request).await?;
        let (reply_id, body) = self.recv::<T>().await?;
        if reply_id != Some(id) {
            return Err(ClientError::Protocol(format!(
                "reply id {reply_id:?} does not answer request {id}"
            )));
        }
        body.map_err(ClientError::Node)
    }

    /// `register`.
    pub async fn register(&mut self, req: RegisterRequest) -> Result<RegisterReply, ClientError> {
        self.call(Request::Register(req)).await
    }

    /// `lookup`.
    pub async fn lookup(
        &mut self,
        keys: &[BlockKey],
        lease: bool,
    ) -> Result<LookupReply, ClientError> {
        self.call(Request::Lookup(LookupRequest {
            keys: join_keys(keys),
            lease,
        }))
        .await
    }

    /// `save`.
    pub async fn save(
        &mut self,
        engine: u32,
        keys: &[BlockKey],
        block_ids: &[u32],
    ) -> Result<SaveReply, ClientError> {
        self.call(Request::Save(blocks(engine, keys, block_ids)))
            .await
    }

    /// `load`.
    pub async fn load(
        &mut self,
        engine: u32,
        keys: &[BlockKey],
        block_ids: &[u32],
    ) -> Result<LoadReply, ClientError> {
        self.call(Request::Load(blocks(engine, keys, block_ids)))
            .await
    }

    /// `release`.
    pub async fn release(&mut self, lease: u64) -> Result<ReleaseReply, ClientError> {
        self.call(Request::Release(ReleaseRequest { lease })).await
    }

    /// `stats`.
    pub async fn stats(&mut self) -> Result<StatsReply, ClientError> {
        self.call(Request::Stats(StatsRequest {})).await
    }
}

fn blocks(engine: u32, keys: &[BlockKey], block_ids: &[u32]) -> BlocksRequest {
    BlocksRequest {
        engine,
        keys: join_keys(keys),
        block_ids: block_ids.to_vec(),
        persist: false,
        after_events: Vec::new(),
        answer_when_queued: false,
    }
}
