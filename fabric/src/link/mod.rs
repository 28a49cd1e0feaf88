//! The page link between two nodes: one TCP connection per peer pair and direction, carrying
//! [`crate::frame`]s after a [`crate::handshake`].

pub mod client;
pub mod server;
pub mod sink;
