//! An engine's KV memory: a file in /dev/shm that the node maps and copies to and from (the
//! host DMA engine), laid out `vllm_lbnhc` (one segment per layer; block `b` of layer `l` at
//! `l * blocks * segment + b * segment`). Unlinked when dropped, so a crashed harness run leaves
//! at most the files of its own process id behind.

use std::fs::OpenOptions;
use std::path::PathBuf;

use memmap2::MmapMut;
use pegaflow_actors::keys::{BlockKey, NamespaceFields};
use pegaflow_actors::protocol::{RegionSpec, RegisterRequest};

use crate::content;
use crate::error::ScenarioError;
use crate::scenario::EngineSpec;

/// One engine's shared-memory KV region.
pub struct ShmRegion {
    name: String,
    map: MmapMut,
    blocks: u32,
    layers: u32,
    segment: usize,
}

impl ShmRegion {
    /// Creates `/dev/shm/<name>` holding `blocks` blocks of every layer.
    pub fn create(name: String, spec: &EngineSpec, blocks: u32) -> Result<Self, ScenarioError> {
        let path = PathBuf::from("/dev/shm").join(&name);
        let segment = spec.segment_bytes() as usize;
        let bytes = segment as u64 * u64::from(blocks.max(1)) * u64::from(spec.num_layers);
        let region_error = |source| ScenarioError::Region {
            name: name.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(region_error)?;
        file.set_len(bytes).map_err(region_error)?;
        // SAFETY: the file is ours, sized above, and outlives the mapping; the node writes into
        // it only during a `load` this process awaits, so no byte changes under a read here.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(region_error)?;
        Ok(Self {
            name,
            map,
            blocks: blocks.max(1),
            layers: spec.num_layers,
            segment,
        })
    }

    /// Blocks per layer.
    pub fn blocks(&self) -> u32 {
        self.blocks
    }

    /// The `register` request describing this region.
    pub fn register_request(&self, namespace: NamespaceFields) -> RegisterRequest {
        let plane = u64::from(self.blocks) * self.segment as u64;
        RegisterRequest {
            namespace,
            region: RegionSpec {
                shm: Some(self.name.clone()),
                bytes: self.map.len() as u64,
                ..RegionSpec::default()
            },
            num_blocks: self.blocks,
            segment_bytes: self.segment as u64,
            layers: (0..u64::from(self.layers))
                .map(|l| vec![(l * plane, self.segment as u64)])
                .collect(),
            engine_events: Vec::new(),
            load_progress: None,
        }
    }

    fn range(&self, layer: u32, block: u32) -> std::ops::Range<usize> {
        let start = (layer as usize * self.blocks as usize + block as usize) * self.segment;
        start..start + self.segment
    }

    /// Writes the key's content into `block` (every layer), as a prefill would.
    pub fn write_block(&mut self, block: u32, key: &BlockKey) {
        for layer in 0..self.layers {
            let range = self.range(layer, block);
            content::fill(key, layer, &mut self.map[range]);
        }
    }

    /// Whether `block` holds exactly the key's content.
    pub fn check_block(&self, block: u32, key: &BlockKey) -> bool {
        (0..self.layers)
            .all(|layer| content::matches(key, layer, &self.map[self.range(layer, block)]))
    }

    /// Zeroes `block` so a load that copies nothing cannot pass as a good one.
    pub fn clear_block(&mut self, block: u32) {
        for layer in 0..self.layers {
            let range = self.range(layer, block);
            self.map[range].fill(0);
        }
    }
}

impl Drop for ShmRegion {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(PathBuf::from("/dev/shm").join(&self.name));
    }
}
