//! NUMA placement of the pool arena: its pages go on the NUMA node of the GPU's PCIe root.
//!
//! On a two-socket host, pages pinned on the far socket make every DMA cross the inter-socket
//! link, which costs PCIe bandwidth and adds latency. The kernel tells which node a PCI device
//! hangs off in `/sys/bus/pci/devices/<bus id>/numa_node` (`-1` when the platform does not say),
//! and which nodes exist in `/sys/devices/system/node/online`. The arena is then given an
//! `MPOL_PREFERRED` policy for that node ([`crate::Arena::prefer_numa_node`]) before pinning first
//! touches its pages: preferred, not bound, so a full node spills to another instead of failing.
//!
//! Deciding is plain file parsing, kept apart from the syscall so it is tested against a fake
//! sysfs tree.

use std::path::Path;

/// Where the kernel exposes PCI devices and NUMA nodes.
pub(crate) const SYSFS_ROOT: &str = "/sys";

/// What to do with the arena's NUMA policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NumaPlacement {
    /// Prefer this node for the arena's pages.
    Prefer(u32),
    /// Leave the default policy; the reason is logged.
    Skip(String),
}

/// Decides where the arena of the GPU at PCI `bus_id` goes, reading sysfs under `root`.
pub(crate) fn placement(root: &Path, bus_id: &str) -> NumaPlacement {
    let node = match device_node(root, bus_id) {
        Ok(node) => node,
        Err(why) => return NumaPlacement::Skip(why),
    };
    let online = root.join("devices/system/node/online");
    // Unreadable (no NUMA support in the kernel) counts as one node.
    let nodes = std::fs::read_to_string(&online)
        .ok()
        .and_then(|text| parse_node_list(&text))
        .map_or(1, |nodes| nodes.len());
    if nodes <= 1 {
        return NumaPlacement::Skip(format!(
            "one NUMA node online; the GPU ({bus_id}) is on {node}"
        ));
    }
    NumaPlacement::Prefer(node)
}

/// The NUMA node of the PCI device at `bus_id`, read from sysfs under `root`, or why it is not
/// known.
pub(crate) fn device_node(root: &Path, bus_id: &str) -> Result<u32, String> {
    let Some(name) = sysfs_pci_name(bus_id) else {
        return Err(format!("unrecognised PCI bus id {bus_id:?}"));
    };
    let path = root.join("bus/pci/devices").join(&name).join("numa_node");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let node = text.trim().parse::<i64>().map_err(|_| {
        format!(
            "{} holds {:?}, not a node number",
            path.display(),
            text.trim()
        )
    })?;
    u32::try_from(node)
        .map_err(|_| format!("the platform reports no NUMA node for the GPU ({name}: {node})"))
}

/// The sysfs directory name of a PCI device: lowercase, the domain as 4 hex digits
/// (`00000000:1B:00.0` from some tools and `0000:1B:00.0` from the driver both become
/// `0000:1b:00.0`). `None` unless it is `domain:bus:device.function` in hex.
fn sysfs_pci_name(bus_id: &str) -> Option<String> {
    let (domain, rest) = bus_id.trim().split_once(':')?;
    let (bus, dev_fn) = rest.split_once(':')?;
    let (device, function) = dev_fn.split_once('.')?;
    let hex = |s: &str, max_len: usize| {
        (!s.is_empty() && s.len() <= max_len)
            .then(|| u32::from_str_radix(s, 16).ok())
            .flatten()
    };
    Some(format!(
        "{:04x}:{:02x}:{:02x}.{:x}",
        hex(domain, 8)?,
        hex(bus, 2)?,
        hex(device, 2)?,
        hex(function, 1)?
    ))
}

/// The nodes a sysfs node list names (`0`, `0-1`, `0,2-3`), in order; `None` if it does not
/// parse.
pub(crate) fn parse_node_list(text: &str) -> Option<Vec<u32>> {
    let text = text.trim();
    if text.is_empty() {
        return Some(Vec::new());
    }
    let mut nodes = Vec::new();
    for part in text.split(',') {
        match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (lo.parse::<u32>().ok()?, hi.parse::<u32>().ok()?);
                if hi < lo {
                    return None;
                }
                nodes.extend(lo..=hi);
            }
            None => nodes.push(part.parse::<u32>().ok()?),
        }
    }
    Some(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs with one GPU at `0000:1b:00.0` on `node` and `online` as the node list.
    fn fake_sysfs(node: &str, online: Option<&str>) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dev = root.path().join("bus/pci/devices/0000:1b:00.0");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("numa_node"), node).unwrap();
        if let Some(online) = online {
            let dir = root.path().join("devices/system/node");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("online"), online).unwrap();
        }
        root
    }

    #[test]
    fn bus_ids_become_sysfs_names() {
        assert_eq!(
            sysfs_pci_name("0000:1B:00.0").as_deref(),
            Some("0000:1b:00.0")
        );
        assert_eq!(
            sysfs_pci_name("00000000:1b:00.0").as_deref(),
            Some("0000:1b:00.0")
        );
        assert_eq!(
            sysfs_pci_name("10000:e1:1f.7\n").as_deref(),
            Some("10000:e1:1f.7")
        );
        for bad in [
            "",
            "1b:00.0",
            "0000:1b:00",
            "0000:1g:00.0",
            "0000:100:00.0",
            "a:b:c.d.e",
        ] {
            assert_eq!(sysfs_pci_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn node_lists_are_parsed() {
        assert_eq!(parse_node_list("0\n"), Some(vec![0]));
        assert_eq!(parse_node_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(parse_node_list("0,2-3"), Some(vec![0, 2, 3]));
        assert_eq!(parse_node_list(""), Some(vec![]));
        assert_eq!(parse_node_list("3-1"), None);
        assert_eq!(parse_node_list("x"), None);
    }

    #[test]
    fn the_gpus_node_is_preferred_on_a_multi_node_host() {
        let root = fake_sysfs("1\n", Some("0-1\n"));
        assert_eq!(
            placement(root.path(), "0000:1B:00.0"),
            NumaPlacement::Prefer(1)
        );
    }

    #[test]
    fn nothing_is_done_without_a_choice_to_make() {
        for (node, online, why) in [
            ("-1\n", Some("0-1\n"), "no NUMA node"),
            ("0\n", Some("0\n"), "one NUMA node"),
            ("0\n", None, "one NUMA node"),
            ("zero\n", Some("0-1\n"), "not a node number"),
        ] {
            let root = fake_sysfs(node, online);
            match placement(root.path(), "0000:1b:00.0") {
                NumaPlacement::Skip(reason) => assert!(reason.contains(why), "{reason}"),
                other => panic!("{node:?} {online:?}: {other:?}"),
            }
        }
        let root = fake_sysfs("1\n", Some("0-1\n"));
        match placement(root.path(), "0000:2a:00.0") {
            NumaPlacement::Skip(reason) => assert!(reason.contains("cannot read"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
}
