//! What this machine offers libtorch: the facts behind `harness gpu-check` and the
//! serve path's start-up log line (the original harness's `has_gpu_access?`).

use std::ffi::{c_char, c_int, CStr};

use serde::Serialize;

/// The libtorch version this binary was built against (read by build.rs).
pub const LIBTORCH_VERSION: &str = env!("HARNESS_LIBTORCH_VERSION");

/// One CUDA device.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GpuDevice {
    pub index: usize,
    /// The driver's name for it, e.g. `NVIDIA H200`; `unknown` if the driver would not say.
    pub name: String,
}

/// Whether and how this process can use a GPU.
#[derive(Debug, Clone, Serialize)]
pub struct GpuFacts {
    /// libtorch can run work on CUDA here.
    pub cuda_available: bool,
    pub device_count: usize,
    pub devices: Vec<GpuDevice>,
    /// The CUDA runtime is linked into this binary (false means a build or link
    /// problem, not a machine without a GPU).
    pub cudart_linked: bool,
    pub cudnn_available: bool,
    /// The CUDA driver's version, e.g. `13.0`, when a driver is installed.
    pub driver_version: Option<String>,
    pub libtorch_version: &'static str,
    /// Where the loaded `libtorch.so` came from (rpath or `LD_LIBRARY_PATH`).
    pub libtorch_path: Option<String>,
}

impl GpuFacts {
    /// Asks libtorch and the CUDA driver. Cheap enough to call at start-up; never panics.
    pub fn probe() -> Self {
        let cuda_available = tch::Cuda::is_available();
        let device_count = if cuda_available {
            tch::Cuda::device_count().max(0) as usize
        } else {
            0
        };
        let driver = CudaDriver::open();
        let devices = (0..device_count)
            .map(|index| GpuDevice {
                index,
                name: driver
                    .as_ref()
                    .and_then(|d| d.device_name(index))
                    .unwrap_or_else(|| "unknown".to_string()),
            })
            .collect();
        GpuFacts {
            cuda_available,
            device_count,
            devices,
            cudart_linked: tch::utils::has_cudart(),
            cudnn_available: cuda_available && tch::Cuda::cudnn_is_available(),
            driver_version: driver.as_ref().and_then(CudaDriver::version),
            libtorch_version: LIBTORCH_VERSION,
            libtorch_path: loaded_libtorch(),
        }
    }

    /// A GPU can run the model: what `gpu-check`'s exit code reports.
    pub fn gpu_usable(&self) -> bool {
        self.cuda_available && self.device_count > 0
    }

    /// The human-readable report of `harness gpu-check`.
    pub fn report(&self) -> String {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let mut out = format!("CUDA usable:         {}\n", yes_no(self.gpu_usable()));
        out += &format!("CUDA devices:        {}\n", self.device_count);
        for d in &self.devices {
            out += &format!("  cuda:{}  {}\n", d.index, d.name);
        }
        out += &format!("CUDA runtime linked: {}\n", yes_no(self.cudart_linked));
        out += &format!("cuDNN available:     {}\n", yes_no(self.cudnn_available));
        out += &format!(
            "CUDA driver:         {}\n",
            self.driver_version
                .as_deref()
                .unwrap_or("none found (libcuda.so.1)")
        );
        out += &format!("libtorch:            {}\n", self.libtorch_version);
        if let Some(path) = &self.libtorch_path {
            out += &format!("libtorch loaded from {path}\n");
        }
        out
    }

    /// One line naming the devices, for logs.
    pub fn device_names(&self) -> String {
        if self.devices.is_empty() {
            return "no CUDA devices".to_string();
        }
        self.devices
            .iter()
            .map(|d| format!("cuda:{} {}", d.index, d.name))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The path of the `libtorch.so` mapped into this process.
fn loaded_libtorch() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch.so"))
        .map(str::to_string)
}

/// The CUDA driver API (`libcuda.so.1`, installed with the NVIDIA driver), opened at
/// run time for what libtorch does not expose: device names and the driver version.
struct CudaDriver {
    lib: libloading::Library,
}

type CuResult = c_int;

impl CudaDriver {
    fn open() -> Option<Self> {
        // SAFETY: libcuda's initialisers are safe to run; we call only the plain C
        // functions below, with the signatures of CUDA's cuda.h.
        let lib = unsafe { libloading::Library::new("libcuda.so.1") }.ok()?;
        let driver = CudaDriver { lib };
        // SAFETY: cuInit(unsigned int flags) -> CUresult; flags must be 0.
        let init: libloading::Symbol<unsafe extern "C" fn(u32) -> CuResult> =
            unsafe { driver.lib.get(b"cuInit\0") }.ok()?;
        (unsafe { init(0) } == 0).then_some(())?;
        Some(driver)
    }

    fn version(&self) -> Option<String> {
        // SAFETY: cuDriverGetVersion(int *version) -> CUresult.
        let get: libloading::Symbol<unsafe extern "C" fn(*mut c_int) -> CuResult> =
            unsafe { self.lib.get(b"cuDriverGetVersion\0") }.ok()?;
        let mut v: c_int = 0;
        (unsafe { get(&mut v) } == 0).then(|| format!("{}.{}", v / 1000, (v % 1000) / 10))
    }

    fn device_name(&self, index: usize) -> Option<String> {
        // SAFETY: cuDeviceGet(CUdevice *dev, int ordinal) and
        // cuDeviceGetName(char *name, int len, CUdevice dev), CUdevice being an int.
        let device_get: libloading::Symbol<unsafe extern "C" fn(*mut c_int, c_int) -> CuResult> =
            unsafe { self.lib.get(b"cuDeviceGet\0") }.ok()?;
        let get_name: libloading::Symbol<
            unsafe extern "C" fn(*mut c_char, c_int, c_int) -> CuResult,
        > = unsafe { self.lib.get(b"cuDeviceGetName\0") }.ok()?;
        let mut device: c_int = 0;
        if unsafe { device_get(&mut device, index as c_int) } != 0 {
            return None;
        }
        let mut buf = [0 as c_char; 256];
        if unsafe { get_name(buf.as_mut_ptr(), buf.len() as c_int, device) } != 0 {
            return None;
        }
        // SAFETY: the driver writes a NUL-terminated string into the buffer.
        let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
        Some(name.to_string_lossy().into_owned())
    }
}
