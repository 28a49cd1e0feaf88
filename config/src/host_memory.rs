//! The pool against the host's memory, checked when the node starts (not when a config is
//! merely loaded or printed, since it depends on the machine): a pool larger than `MemTotal`
//! can never be backed, and would only fail later, when the kernel runs out of pages.

use crate::error::ConfigError;
use crate::loaded::LoadedConfig;
use crate::origin::Origin;

/// Refuses a `pool.size` larger than the host's `MemTotal` in `/proc/meminfo`; a host without a
/// readable `/proc/meminfo` is not checked.
pub fn check_pool_fits_memory(loaded: &LoadedConfig) -> Result<(), ConfigError> {
    match std::fs::read_to_string("/proc/meminfo") {
        Ok(meminfo) => pool_fits(loaded, &meminfo),
        Err(_) => Ok(()),
    }
}

fn pool_fits(loaded: &LoadedConfig, meminfo: &str) -> Result<(), ConfigError> {
    let Some(total) = mem_total_bytes(meminfo) else {
        return Ok(());
    };
    let pool = loaded.config.pool.size;
    if pool.bytes() <= total {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        key: "pool.size".to_owned(),
        value: format!("\"{pool}\""),
        origin: loaded
            .origin("pool.size")
            .cloned()
            .unwrap_or(Origin::Default),
        expected: format!(
            "at most this host's memory (MemTotal {:.1}GiB)",
            total as f64 / f64::from(1u32 << 30)
        ),
    })
}

/// `MemTotal` in bytes (`/proc/meminfo` writes it in KiB, spelled "kB").
fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::ConfigArgs;

    const MEMINFO: &str = "MemTotal:       24117248 kB\nMemFree:         1000000 kB\n";

    fn loaded(pool_size: &str) -> LoadedConfig {
        let args = ConfigArgs {
            pool_size: Some(pool_size.to_owned()),
            ..ConfigArgs::default()
        };
        crate::load_from(&args, Vec::<(String, String)>::new()).expect("valid config")
    }

    #[test]
    fn a_pool_larger_than_memtotal_is_refused_naming_pool_size() {
        let error = pool_fits(&loaded("1TiB"), MEMINFO).expect_err("1TiB on a 23GiB host");
        assert_eq!(
            error.to_string(),
            r#"config key pool.size = "1TiB" (flag --pool-size): expected at most this host's memory (MemTotal 23.0GiB)"#
        );
    }

    #[test]
    fn a_pool_within_memtotal_or_an_unreadable_meminfo_passes() {
        assert!(pool_fits(&loaded("16GiB"), MEMINFO).is_ok());
        assert!(pool_fits(&loaded("1TiB"), "no such line\n").is_ok());
    }
}
