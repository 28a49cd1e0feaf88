//! Finding the CUDA driver, opening a device's context, and turning driver status codes into
//! [`DmaError`]s.
//!
//! cudarc loads `libcuda` with `dlopen` on first use and panics if it is missing, so the library's
//! presence is checked first: a node on a machine without NVIDIA drivers must say "CUDA
//! unavailable: <why>" and carry on with the host engine, never abort.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext};

use crate::error::DmaError;

/// Maps a driver status to `Ok` or to [`DmaError::Cuda`] naming the failed call (`op` is only
/// evaluated on failure, so callers can format freely).
pub(crate) fn check(status: sys::CUresult, op: impl FnOnce() -> String) -> Result<(), DmaError> {
    status.result().map_err(|e| cuda_err(op(), e))
}

/// A [`DmaError::Cuda`] for a cudarc call that already returned a `DriverError`.
pub(crate) fn cuda_err(op: impl Into<String>, err: result::DriverError) -> DmaError {
    DmaError::Cuda {
        op: op.into(),
        message: format!("{err:?}"),
    }
}

/// What the engine needs to know about the device it copies for.
#[derive(Clone, Debug)]
pub(crate) struct DeviceInfo {
    /// The device's marketing name, for the start-up log.
    pub name: String,
    /// Compute capability `(major, minor)`; NVRTC compiles for exactly this.
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors: the copy kernel's grid is a multiple of this.
    pub sm_count: u32,
    /// The driver's CUDA version as `1000 * major + 10 * minor` (13000 for 13.0).
    pub driver_version: i32,
    /// Largest pitch a strided memcpy accepts (`CU_DEVICE_ATTRIBUTE_MAX_PITCH`).
    pub max_pitch: u64,
}

/// Opens (retains) the primary context of device `ordinal` and binds it to this thread.
///
/// Returns [`DmaError::CudaUnavailable`] with the reason when the driver library is missing, no
/// device is present, or the ordinal does not exist.
pub(crate) fn open_device(ordinal: usize) -> Result<(Arc<CudaContext>, DeviceInfo), DmaError> {
    // SAFETY: `is_culib_present` only tries to dlopen the driver library by its usual names.
    if !unsafe { sys::is_culib_present() } {
        return Err(DmaError::CudaUnavailable(
            "the NVIDIA driver library (libcuda.so) is not installed or not on the loader path"
                .into(),
        ));
    }
    // cudarc panics only where a symbol it needs is missing from the library (a driver far older
    // than CUDA 12); catch that so the node reports it instead of aborting.
    let opened = catch_unwind(AssertUnwindSafe(|| -> Result<_, DmaError> {
        let unavailable = |what: &str, e: result::DriverError| {
            DmaError::CudaUnavailable(format!("{what}: {e:?}"))
        };
        result::init().map_err(|e| unavailable("cuInit", e))?;
        let count = result::device::get_count().map_err(|e| unavailable("cuDeviceGetCount", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(DmaError::CudaUnavailable(format!(
                "device {ordinal} requested but the driver sees {count} device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| unavailable("opening the context", e))?;
        let mut driver_version = 0;
        // SAFETY: writes one int through a valid pointer.
        check(
            unsafe { sys::cuDriverGetVersion(&mut driver_version) },
            || "cuDriverGetVersion".into(),
        )?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| cuda_err("cuDeviceGetAttribute (SM count)", e))?;
        let max_pitch = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_PITCH)
            .map_err(|e| cuda_err("cuDeviceGetAttribute (max pitch)", e))?;
        let info = DeviceInfo {
            name: ctx.name().map_err(|e| cuda_err("cuDeviceGetName", e))?,
            compute_capability: ctx
                .compute_capability()
                .map_err(|e| cuda_err("cuDeviceGetAttribute (compute capability)", e))?,
            sm_count: sm_count.max(1) as u32,
            driver_version,
            max_pitch: max_pitch.max(0) as u64,
        };
        Ok((ctx, info))
    }));
    opened.unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("the CUDA bindings panicked");
        Err(DmaError::CudaUnavailable(why.to_owned()))
    })
}

/// Binds `ctx` to the calling thread; every entry point calls this because the node calls the
/// engine from whatever blocking-pool thread runs the job.
pub(crate) fn bind(ctx: &CudaContext) -> Result<(), DmaError> {
    ctx.bind_to_thread()
        .map_err(|e| cuda_err("cuCtxSetCurrent", e))
}

/// The PCI bus id of the context's device as the driver formats it (e.g. `0000:1B:00.0`), to
/// find the device's NUMA node in sysfs.
pub(crate) fn pci_bus_id(ctx: &CudaContext) -> Result<String, DmaError> {
    pci_bus_id_of(ctx.cu_device())
}

/// The PCI bus id of `device`, as [`pci_bus_id`] formats it.
pub(crate) fn pci_bus_id_of(device: sys::CUdevice) -> Result<String, DmaError> {
    let mut buf = [0 as std::ffi::c_char; 64];
    // SAFETY: the driver writes at most `len` bytes into `buf`, NUL-terminated.
    check(
        unsafe { sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, device) },
        || "cuDeviceGetPCIBusId".into(),
    )?;
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
