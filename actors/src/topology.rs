//! The host as the node serves it: its NUMA nodes (one pool each) and its GPUs (one transfer
//! actor each), found at start from sysfs and the CUDA driver, plus the GPUs of host engines the
//! config declares (`topology`), so a host without a GPU runs the same per-GPU code paths.

use pegaflow_config::TopologyConfig;
use pegaflow_gpu_dma::{canonical_gpu_uuid, discover_gpus, numa_nodes};
use serde::{Deserialize, Serialize};

/// What kind of copy engine serves a GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuKind {
    /// A device the CUDA driver reports: engines register GPU memory by CUDA IPC.
    Cuda,
    /// Declared in `topology.gpus`: engines register shared memory and the host engine copies.
    Host,
}

/// One GPU of the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuView {
    /// The name `register` gives in `region.gpu`.
    pub uuid: String,
    pub kind: GpuKind,
    /// The driver's ordinal in the node's process (CUDA GPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordinal: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_bus_id: Option<String>,
    /// The NUMA node whose pool is nearest.
    pub numa_node: u32,
}

/// The host's NUMA nodes and GPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostTopology {
    /// In ascending order; never empty.
    pub numa_nodes: Vec<u32>,
    pub gpus: Vec<GpuView>,
    /// Why the driver could not be asked for GPUs, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_error: Option<String>,
}

impl HostTopology {
    /// Asks the hardware and adds what `config` declares.
    pub fn discover(config: &TopologyConfig) -> Self {
        let (devices, driver_error) = match discover_gpus() {
            Ok(devices) => (devices, None),
            Err(error) => (Vec::new(), Some(error.to_string())),
        };
        let cuda = devices.into_iter().map(|gpu| GpuView {
            uuid: gpu.uuid,
            kind: GpuKind::Cuda,
            ordinal: Some(gpu.ordinal),
            name: Some(gpu.name),
            pci_bus_id: Some(gpu.pci_bus_id),
            numa_node: gpu.numa_node.unwrap_or(0),
        });
        Self::from_parts(numa_nodes(), cuda.collect(), config, driver_error)
    }

    /// The topology of `cuda` GPUs on the `online` NUMA nodes, with `config`'s declarations: its
    /// NUMA nodes replace the online ones, its GPUs are added. A GPU on a node not in the list
    /// (unknown to the platform, or left out by the config) counts as on the first node.
    fn from_parts(
        online: Vec<u32>,
        cuda: Vec<GpuView>,
        config: &TopologyConfig,
        driver_error: Option<String>,
    ) -> Self {
        let mut numa_nodes = match config.numa_nodes.is_empty() {
            true => online,
            false => config.numa_nodes.clone(),
        };
        numa_nodes.sort_unstable();
        numa_nodes.dedup();
        if numa_nodes.is_empty() {
            numa_nodes.push(0);
        }
        let first = numa_nodes[0];
        let host = config.gpus.iter().map(|gpu| GpuView {
            uuid: canonical_gpu_uuid(&gpu.uuid),
            kind: GpuKind::Host,
            ordinal: None,
            name: None,
            pci_bus_id: None,
            numa_node: gpu.numa_node,
        });
        let gpus = cuda
            .into_iter()
            .chain(host)
            .map(|mut gpu| {
                if !numa_nodes.contains(&gpu.numa_node) {
                    gpu.numa_node = first;
                }
                gpu
            })
            .collect();
        Self {
            numa_nodes,
            gpus,
            driver_error,
        }
    }

    /// The GPU a connector named, in any spelling [`canonical_gpu_uuid`] accepts.
    pub fn gpu(&self, uuid: &str) -> Option<&GpuView> {
        let uuid = canonical_gpu_uuid(uuid);
        self.gpus.iter().find(|gpu| gpu.uuid == uuid)
    }

    /// The topology in a few lines, for `--print-topology` and the start-up log.
    pub fn render(&self) -> String {
        let nodes: Vec<String> = self.numa_nodes.iter().map(u32::to_string).collect();
        let mut out = format!("numa nodes: {}\n", nodes.join(", "));
        if self.gpus.is_empty() {
            out.push_str("gpus: none\n");
        }
        for gpu in &self.gpus {
            let detail = match gpu.kind {
                GpuKind::Cuda => format!(
                    "cuda ordinal {}, {}, pci {}",
                    gpu.ordinal.unwrap_or_default(),
                    gpu.name.as_deref().unwrap_or("?"),
                    gpu.pci_bus_id.as_deref().unwrap_or("?")
                ),
                GpuKind::Host => "host engines (topology.gpus)".to_owned(),
            };
            out.push_str(&format!(
                "gpu {}: numa node {}, {detail}\n",
                gpu.uuid, gpu.numa_node
            ));
        }
        if let Some(error) = &self.driver_error {
            out.push_str(&format!("cuda driver: {error}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use pegaflow_config::HostGpu;

    use super::*;

    fn cuda_gpu(uuid: &str, numa_node: u32) -> GpuView {
        GpuView {
            uuid: uuid.into(),
            kind: GpuKind::Cuda,
            ordinal: Some(0),
            name: Some("H100".into()),
            pci_bus_id: Some("0000:1b:00.0".into()),
            numa_node,
        }
    }

    #[test]
    fn declared_gpus_join_the_discovered_ones_and_declared_nodes_replace_online_ones() {
        let config = TopologyConfig {
            numa_nodes: vec![1, 0],
            gpus: vec![HostGpu {
                uuid: "rank-1".into(),
                numa_node: 1,
            }],
        };
        let real = "GPU-00112233-4455-6677-8899-aabbccddeeff";
        let topology = HostTopology::from_parts(vec![0], vec![cuda_gpu(real, 3)], &config, None);
        assert_eq!(topology.numa_nodes, [0, 1]);
        let placed: Vec<_> = topology
            .gpus
            .iter()
            .map(|g| (g.uuid.as_str(), g.kind, g.numa_node))
            .collect();
        // The CUDA GPU's node 3 is not among the nodes: it counts as on the first.
        assert_eq!(
            placed,
            [(real, GpuKind::Cuda, 0), ("rank-1", GpuKind::Host, 1)]
        );
        assert_eq!(
            topology
                .gpu("00112233-4455-6677-8899-AABBCCDDEEFF")
                .map(|g| g.kind),
            Some(GpuKind::Cuda)
        );
        assert!(topology.gpu("rank-2").is_none());
        let text = topology.render();
        assert!(text.starts_with("numa nodes: 0, 1\n"), "{text}");
        assert!(
            text.contains("gpu rank-1: numa node 1, host engines"),
            "{text}"
        );
    }

    #[test]
    fn without_gpus_or_numa_support_the_host_is_one_node_and_no_gpu() {
        let topology = HostTopology::from_parts(
            Vec::new(),
            Vec::new(),
            &TopologyConfig::default(),
            Some("cuInit failed".into()),
        );
        assert_eq!(
            (topology.numa_nodes.as_slice(), topology.gpus.len()),
            (&[0][..], 0)
        );
        assert_eq!(
            topology.render(),
            "numa nodes: 0\ngpus: none\ncuda driver: cuInit failed\n"
        );
    }
}
