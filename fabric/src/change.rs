//! Membership changes as a stream others subscribe to (the link actor opens and closes links
//! on them; the dashboard lists peers).
//!
//! The stream is a notification, not the source of truth: a subscriber that falls more than
//! [`CHANGE_BUFFER`] changes behind skips the ones it missed (logged) and should re-read
//! [`crate::Cluster::members`].

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::member::{Member, NodeId};

/// Changes buffered per subscriber before the slowest one starts losing them.
pub(crate) const CHANGE_BUFFER: usize = 1024;

/// One change of the live membership (self excluded).
#[derive(Clone, Debug)]
pub enum MemberChange {
    /// A node became live (joined, came back, or restarted as a new generation).
    Joined(Arc<Member>),
    /// A live node changed what it advertises (load, capacity, address); digest updates alone
    /// are not reported, they are read through the ranking.
    Updated(Arc<Member>),
    /// A node was declared dead or left.
    Left(NodeId),
}

/// A subscription to [`MemberChange`]s.
pub struct ChangeStream {
    rx: broadcast::Receiver<MemberChange>,
}

impl ChangeStream {
    pub(crate) fn new(rx: broadcast::Receiver<MemberChange>) -> Self {
        ChangeStream { rx }
    }

    /// The next change; `None` once the cluster handle is gone.
    pub async fn next(&mut self) -> Option<MemberChange> {
        loop {
            match self.rx.recv().await {
                Ok(change) => return Some(change),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "membership subscriber lagged; re-read members()");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}
