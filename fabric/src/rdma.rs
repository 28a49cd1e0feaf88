//! One-sided RDMA reads of a peer's pool arena (feature `rdma`).
//!
//! The holder registers its whole pinned arena once ([`RdmaDevice::register`]) with remote-read
//! access and tells peers its address and rkey ([`RemoteArena`]); a fetching node registers its
//! own arena as the local target, connects one reliable-connection queue pair per peer
//! ([`RdmaEndpoint`], the [`EndpointInfo`] of both sides exchanged over the authenticated TCP
//! link), and reads pages straight from the holder's memory into its own, no CPU on the holder
//! involved. The holder still leases the pages (over the TCP link) for the duration of the
//! reads, and the reader still checks each page's crc32c before committing it.
//!
//! sideway loads libibverbs at run time: without the library or without an RDMA device,
//! [`RdmaDevice::open`] fails with [`RdmaError::NoDevice`] and the node keeps using TCP.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{
    ExtendedCompletionQueue, GenericCompletionQueue, WorkCompletionStatus,
};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, Mtu};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    ExtendedQueuePair, PostSendGuard, QueuePair, QueuePairAttribute, QueuePairState,
    SendOperationFlags, SetScatterGatherEntry, WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;

/// The HCA port used (ports are numbered from 1).
const PORT: u8 = 1;
/// GID index 0: the port's default (RoCE v1/IB) address.
const GID_INDEX: u8 = 0;
/// Reads in flight per endpoint: enough to cover the round trip at 200 Gb/s with 64 KiB pages.
const MAX_OUTSTANDING: u32 = 128;

#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// No usable RDMA device (or libibverbs is not installed): use the TCP link.
    #[error("no RDMA device available: {0}")]
    NoDevice(String),
    /// A verbs call failed.
    #[error("rdma {op}: {reason}")]
    Verbs { op: &'static str, reason: String },
    /// A read completed with an error status (peer gone, bad rkey, out of bounds).
    #[error("rdma read {wr_id} failed with status {status}")]
    Read { wr_id: u64, status: u32 },
    /// A read asked for bytes outside a registered region.
    #[error("rdma read of {len} bytes at {offset} is outside the {region}-byte region")]
    OutOfBounds { offset: u64, len: u64, region: u64 },
    #[error("rdma reads did not complete within {0:?}")]
    Timeout(Duration),
}

fn verbs(op: &'static str) -> impl Fn(String) -> RdmaError {
    move |reason| RdmaError::Verbs { op, reason }
}

/// An opened RDMA device and its protection domain.
pub struct RdmaDevice {
    context: Arc<DeviceContext>,
    pd: Arc<ProtectionDomain>,
}

impl RdmaDevice {
    /// Opens the device called `name`, or the first one.
    pub fn open(name: Option<&str>) -> Result<RdmaDevice, RdmaError> {
        let list =
            DeviceList::new().map_err(|e| RdmaError::NoDevice(format!("libibverbs: {e}")))?;
        let device = match name {
            Some(name) => list.iter().find(|d| d.name() == name),
            None => list.iter().next(),
        };
        let device = device.ok_or_else(|| {
            RdmaError::NoDevice(match name {
                Some(name) => format!("device {name} not found among {} devices", list.len()),
                None => "the device list is empty".to_owned(),
            })
        })?;
        let context = device
            .open()
            .map_err(|e| RdmaError::NoDevice(format!("open {}: {e}", device.name())))?;
        let pd = context
            .alloc_pd()
            .map_err(|e| verbs("alloc_pd")(e.to_string()))?;
        tracing::info!(device = device.name(), "rdma device opened");
        Ok(RdmaDevice { context, pd })
    }

    /// Registers `len` bytes at `base` (the pool arena) once, readable by peers and writable
    /// by local reads.
    ///
    /// # Safety
    /// `base..base + len` must stay mapped for as long as the returned region lives, and the
    /// caller must only let peers read pages it has leased to them (the arena's lease contract).
    pub unsafe fn register(&self, base: *mut u8, len: usize) -> Result<RegisteredArena, RdmaError> {
        let access = AccessFlags::LocalWrite | AccessFlags::RemoteRead;
        // SAFETY: forwarded to the caller (see above).
        let mr = unsafe { self.pd.reg_mr(base as usize, len, access) }
            .map_err(|e| verbs("reg_mr")(e.to_string()))?;
        Ok(RegisteredArena {
            mr,
            base: base as u64,
            len: len as u64,
        })
    }

    /// A queue pair and completion queue, ready to be connected to one peer.
    pub fn endpoint(&self) -> Result<RdmaEndpoint, RdmaError> {
        let cq = self
            .context
            .create_cq_builder()
            .setup_cqe(MAX_OUTSTANDING * 2)
            .build_ex()
            .map_err(|e| verbs("create_cq")(e.to_string()))?;
        let handle = GenericCompletionQueue::from(Arc::clone(&cq));
        let mut qp = self
            .pd
            .create_qp_builder()
            .setup_send_cq(handle.clone())
            .setup_recv_cq(handle)
            .setup_max_send_wr(MAX_OUTSTANDING)
            .setup_max_recv_wr(1)
            .setup_send_ops_flags(SendOperationFlags::Read)
            .build_ex()
            .map_err(|e| verbs("create_qp")(e.to_string()))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(PORT)
            .setup_access_flags(AccessFlags::LocalWrite | AccessFlags::RemoteRead);
        qp.modify(&attr)
            .map_err(|e| verbs("qp init")(e.to_string()))?;
        let gid = self
            .context
            .query_gid(PORT, GID_INDEX.into())
            .map_err(|e| verbs("query_gid")(e.to_string()))?;
        let lid = self
            .context
            .query_port(PORT)
            .map_err(|e| verbs("query_port")(e.to_string()))?
            .lid();
        let local = EndpointInfo {
            qp_number: qp.qp_number(),
            psn: rand::random::<u32>() & 0x00ff_ffff,
            gid: gid.raw,
            lid,
        };
        Ok(RdmaEndpoint { qp, cq, local })
    }
}

/// This node's arena, registered once.
pub struct RegisteredArena {
    mr: Arc<MemoryRegion>,
    base: u64,
    len: u64,
}

impl RegisteredArena {
    /// What a peer needs to read from it.
    pub fn remote(&self) -> RemoteArena {
        RemoteArena {
            addr: self.base,
            rkey: self.mr.rkey(),
            len: self.len,
        }
    }
}

/// A peer's registered arena, as it advertised it over the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct RemoteArena {
    pub addr: u64,
    pub rkey: u32,
    pub len: u64,
}

/// One side of a queue-pair connection, exchanged over the TCP link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct EndpointInfo {
    pub qp_number: u32,
    pub psn: u32,
    pub gid: [u8; 16],
    pub lid: u16,
}

/// One page to read: `len` bytes at `remote_offset` in the peer's arena into `local_offset`
/// in ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRead {
    pub remote_offset: u64,
    pub local_offset: u64,
    pub len: u32,
}

/// A reliable-connection queue pair to one peer.
pub struct RdmaEndpoint {
    qp: ExtendedQueuePair,
    cq: Arc<ExtendedCompletionQueue>,
    local: EndpointInfo,
}

impl RdmaEndpoint {
    /// What the peer needs to connect back.
    pub fn local(&self) -> EndpointInfo {
        self.local
    }

    /// Moves the queue pair to ready-to-send against the peer's endpoint.
    pub fn connect(&mut self, remote: &EndpointInfo) -> Result<(), RdmaError> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(Mtu::Mtu4096)
            .setup_dest_qp_num(remote.qp_number)
            .setup_rq_psn(remote.psn)
            .setup_max_dest_read_atomic(16)
            .setup_min_rnr_timer(12);
        let mut av = AddressHandleAttribute::new();
        av.setup_dest_lid(remote.lid)
            .setup_port(PORT)
            .setup_service_level(0)
            .setup_grh_src_gid_index(GID_INDEX)
            .setup_grh_dest_gid(&Gid { raw: remote.gid })
            .setup_grh_hop_limit(64);
        attr.setup_address_vector(&av);
        self.qp
            .modify(&attr)
            .map_err(|e| verbs("qp rtr")(e.to_string()))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.local.psn)
            .setup_timeout(14)
            .setup_retry_cnt(7)
            .setup_rnr_retry(7)
            .setup_max_read_atomic(16);
        self.qp
            .modify(&attr)
            .map_err(|e| verbs("qp rts")(e.to_string()))
    }

    /// Reads every page of `reads` from `remote` into `local`, at most [`MAX_OUTSTANDING`] in
    /// flight, and waits (spinning on the completion queue) until all completed or `timeout`.
    pub fn read_pages(
        &mut self,
        reads: &[PageRead],
        remote: &RemoteArena,
        local: &RegisteredArena,
        timeout: Duration,
    ) -> Result<(), RdmaError> {
        for r in reads {
            check_span(r.remote_offset, r.len as u64, remote.len)?;
            check_span(r.local_offset, r.len as u64, local.len)?;
        }
        let deadline = Instant::now() + timeout;
        let (mut posted, mut completed) = (0usize, 0usize);
        while completed < reads.len() {
            while posted < reads.len() && posted - completed < MAX_OUTSTANDING as usize {
                let r = reads[posted];
                let mut guard = self.qp.start_post_send();
                let wr = guard
                    .construct_wr(posted as u64, WorkRequestFlags::Signaled)
                    .setup_read(remote.rkey, remote.addr + r.remote_offset);
                // SAFETY: the local span was bounds-checked against the registered region,
                // which the caller keeps alive and whose pages it holds write leases on.
                unsafe { wr.setup_sge(local.mr.lkey(), local.base + r.local_offset, r.len) };
                guard
                    .post()
                    .map_err(|e| verbs("post read")(e.to_string()))?;
                posted += 1;
            }
            if let Ok(mut poller) = self.cq.start_poll() {
                for wc in &mut poller {
                    if wc.status() != WorkCompletionStatus::Success as u32 {
                        return Err(RdmaError::Read {
                            wr_id: wc.wr_id(),
                            status: wc.status(),
                        });
                    }
                    completed += 1;
                }
            }
            if Instant::now() > deadline {
                return Err(RdmaError::Timeout(timeout));
            }
            std::hint::spin_loop();
        }
        Ok(())
    }
}

fn check_span(offset: u64, len: u64, region: u64) -> Result<(), RdmaError> {
    match offset.checked_add(len) {
        Some(end) if end <= region => Ok(()),
        _ => Err(RdmaError::OutOfBounds {
            offset,
            len,
            region,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_device_open_fails_cleanly() {
        match RdmaDevice::open(None) {
            // A machine with an RDMA NIC: nothing to check here.
            Ok(_) => {}
            Err(e) => {
                assert!(matches!(e, RdmaError::NoDevice(_)), "{e}");
                assert!(e.to_string().starts_with("no RDMA device available"), "{e}");
            }
        }
        let err = RdmaDevice::open(Some("no-such-hca"))
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("no RDMA device")));
    }

    #[test]
    fn spans_are_checked() {
        assert!(check_span(0, 10, 10).is_ok());
        assert!(check_span(5, 10, 10).is_err());
        assert!(check_span(u64::MAX, 2, 10).is_err());
    }
}
