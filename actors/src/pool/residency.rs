//! Which keys are in pool memory, told to whoever serves them to peers (the fabric's digest).
//!
//! The pool reports every page that enters memory (a committed save, a promotion from SSD) and
//! every page that leaves it (eviction, whether or not it spilled to SSD): peers fetch from
//! memory only, so a key on SSD alone is not advertised.

use crate::keys::BlockKey;

/// Receives the pool's changes of resident keys. Called on the pool actor, so it must not block.
pub trait ResidencyFeed: Send + 'static {
    /// `added` entered memory, `removed` left it, since the last call.
    fn changed(&self, added: &[BlockKey], removed: &[BlockKey]);
}
