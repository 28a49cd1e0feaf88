//! What the host is made of: its NUMA nodes and its GPUs, as the kernel and the CUDA driver see
//! them.
//!
//! A GPU is named by its UUID (`GPU-` and 32 hex digits with dashes, as `nvidia-smi -L` prints
//! it), never by an ordinal: ordinals depend on each process's `CUDA_VISIBLE_DEVICES`, UUIDs do
//! not. The driver is asked only when its library is present, because cudarc panics on the first
//! call without one: a host without a driver has no GPUs.

use std::path::Path;

use cudarc::driver::{result, sys};

use crate::cuda::pci_bus_id_of;
use crate::error::DmaError;
use crate::numa::{self, SYSFS_ROOT};

/// One GPU the driver sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuDevice {
    /// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lowercase.
    pub uuid: String,
    /// The driver's ordinal in this process (what [`crate::CudaDmaEngine::new`] opens).
    pub ordinal: usize,
    /// The device's marketing name.
    pub name: String,
    /// `0000:1b:00.0`, as the driver formats it.
    pub pci_bus_id: String,
    /// The NUMA node of the GPU's PCIe root; `None` when the platform does not say.
    pub numa_node: Option<u32>,
}

/// The NUMA nodes online on this host (`/sys/devices/system/node/online`); `[0]` where the
/// kernel has no NUMA support.
pub fn numa_nodes() -> Vec<u32> {
    numa_nodes_under(Path::new(SYSFS_ROOT))
}

fn numa_nodes_under(root: &Path) -> Vec<u32> {
    std::fs::read_to_string(root.join("devices/system/node/online"))
        .ok()
        .and_then(|text| numa::parse_node_list(&text))
        .filter(|nodes| !nodes.is_empty())
        .unwrap_or_else(|| vec![0])
}

/// Every GPU the driver sees, in ordinal order; none when the driver library is missing.
///
/// Returns [`DmaError::CudaUnavailable`] when the library is present but the driver cannot be
/// initialised or queried (the node then runs without GPUs and logs why).
pub fn discover_gpus() -> Result<Vec<GpuDevice>, DmaError> {
    // SAFETY: `is_culib_present` only tries to dlopen the driver library by its usual names.
    if !unsafe { sys::is_culib_present() } {
        return Ok(Vec::new());
    }
    let unavailable =
        |what: &str, e: result::DriverError| DmaError::CudaUnavailable(format!("{what}: {e:?}"));
    match result::init() {
        Ok(()) => {}
        // A driver without devices (or with none visible) answers cuInit with this.
        Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => return Ok(Vec::new()),
        Err(e) => return Err(unavailable("cuInit", e)),
    }
    let count = result::device::get_count().map_err(|e| unavailable("cuDeviceGetCount", e))?;
    (0..count.max(0))
        .map(|ordinal| {
            let device = result::device::get(ordinal).map_err(|e| unavailable("cuDeviceGet", e))?;
            let uuid =
                result::device::get_uuid(device).map_err(|e| unavailable("cuDeviceGetUuid", e))?;
            let name =
                result::device::get_name(device).map_err(|e| unavailable("cuDeviceGetName", e))?;
            let pci_bus_id = pci_bus_id_of(device)?;
            let numa_node = numa::device_node(Path::new(SYSFS_ROOT), &pci_bus_id).ok();
            Ok(GpuDevice {
                uuid: format_uuid(&uuid.bytes.map(|b| b as u8)),
                ordinal: ordinal as usize,
                name,
                pci_bus_id: pci_bus_id.to_ascii_lowercase(),
                numa_node,
            })
        })
        .collect()
}

/// The `GPU-...` form of a device's 16 UUID bytes.
fn format_uuid(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A GPU UUID as a connector may send it (torch prints it without the `GPU-` prefix, some tools
/// in upper case) in the form [`GpuDevice::uuid`] has; other names (fake GPUs of a configured
/// topology) are only trimmed.
pub fn canonical_gpu_uuid(name: &str) -> String {
    let name = name.trim();
    let bare = name
        .strip_prefix("GPU-")
        .or_else(|| name.strip_prefix("gpu-"))
        .unwrap_or(name);
    let is_uuid = bare.len() == 36
        && bare.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    match is_uuid {
        true => format!("GPU-{}", bare.to_ascii_lowercase()),
        false => name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_print_as_nvidia_smi_does() {
        let bytes: [u8; 16] = std::array::from_fn(|i| (i as u8) * 17);
        assert_eq!(
            format_uuid(&bytes),
            "GPU-00112233-4455-6677-8899-aabbccddeeff"
        );
    }

    #[test]
    fn uuids_from_connectors_are_made_canonical() {
        let canonical = "GPU-00112233-4455-6677-8899-aabbccddeeff";
        for given in [
            canonical,
            "00112233-4455-6677-8899-aabbccddeeff",
            "GPU-00112233-4455-6677-8899-AABBCCDDEEFF",
            " 00112233-4455-6677-8899-aabbccddeeff\n",
        ] {
            assert_eq!(canonical_gpu_uuid(given), canonical, "{given:?}");
        }
        assert_eq!(canonical_gpu_uuid("fake-gpu-0"), "fake-gpu-0");
    }

    #[test]
    fn numa_nodes_come_from_sysfs_or_default_to_one() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(numa_nodes_under(root.path()), [0]);
        let dir = root.path().join("devices/system/node");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("online"), "0-1,3\n").unwrap();
        assert_eq!(numa_nodes_under(root.path()), [0, 1, 3]);
    }

    #[test]
    fn a_host_without_a_driver_has_no_gpus_and_does_not_panic() {
        // On CI there is no libcuda; on a GPU host this lists the GPUs. Either way: no panic.
        if let Ok(gpus) = discover_gpus() {
            for gpu in gpus {
                assert_eq!(canonical_gpu_uuid(&gpu.uuid), gpu.uuid);
            }
        }
    }
}
