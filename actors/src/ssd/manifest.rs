//! The manifest: a small file naming the sealed segments, rewritten atomically (temporary file,
//! `fdatasync`, rename, directory sync) whenever a segment is sealed or dropped.
//!
//! A restarting node reads it to know which segments were sealed (their footers are trusted)
//! and which was still open (scanned record by record). A segment file the manifest does not
//! name is the one that was open when the node stopped; one it names but that is gone was
//! being dropped and is forgotten.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::segment::SegmentId;

const FILE: &str = "MANIFEST";
const TMP_FILE: &str = "MANIFEST.tmp";
const VERSION: u32 = 1;

/// A sealed segment as the manifest records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSegment {
    /// Length of the file, footer included.
    pub bytes: u64,
    pub records: u64,
}

/// The manifest's content.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    version: u32,
    /// Sealed segments by id.
    pub sealed: BTreeMap<SegmentId, SealedSegment>,
}

impl Manifest {
    /// Reads `dir`'s manifest; a directory without one (a new tier) gives an empty manifest.
    pub fn load(dir: &Path) -> io::Result<Manifest> {
        match std::fs::read(dir.join(FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|error| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {error}", dir.join(FILE).display()),
                )
            }),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Manifest::default()),
            Err(error) => Err(error),
        }
    }

    /// Replaces `dir`'s manifest with this one, atomically and durably.
    pub fn store(&self, dir: &Path) -> io::Result<()> {
        let manifest = Manifest {
            version: VERSION,
            sealed: self.sealed.clone(),
        };
        let bytes = serde_json::to_vec(&manifest).map_err(io::Error::other)?;
        let tmp = dir.join(TMP_FILE);
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_data()?;
        std::fs::rename(&tmp, dir.join(FILE))?;
        File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_and_loads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            Manifest::load(dir.path()).expect("empty"),
            Manifest::default()
        );
        let mut manifest = Manifest::default();
        manifest.sealed.insert(
            3,
            SealedSegment {
                bytes: 1 << 20,
                records: 12,
            },
        );
        manifest.store(dir.path()).expect("store");
        let back = Manifest::load(dir.path()).expect("load");
        assert_eq!(back.sealed, manifest.sealed);
        std::fs::write(dir.path().join(FILE), b"{broken").expect("write");
        assert!(Manifest::load(dir.path()).is_err());
    }
}
