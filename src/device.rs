//! The device policy (`HARNESS_DEVICE`) and how it resolves against what the
//! machine has (probed by [`crate::engine::gpu::GpuFacts`]).

use std::fmt;
use std::str::FromStr;

use crate::engine::gpu::GpuFacts;

/// Where the operator asked the model to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevicePolicy {
    /// The first CUDA device; without one the serving is not started.
    Cuda,
    /// CUDA device `N`; without it the serving is not started.
    CudaIndex(usize),
    /// The CPU, even where a GPU is present.
    Cpu,
    /// The first CUDA device where there is one, else the CPU.
    Auto,
}

/// The concrete device a policy resolves to; it lives with the engine, which
/// places models on it.
pub use crate::engine::DeviceChoice;

/// The policy asked for CUDA and the machine cannot give it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoGpu {
    #[error("HARNESS_DEVICE={policy} needs a CUDA GPU and none is usable here (CUDA runtime linked: {cudart_linked})")]
    NoCuda {
        policy: DevicePolicy,
        cudart_linked: bool,
    },
    #[error("HARNESS_DEVICE={policy} asks for CUDA device {index}, but this machine has {count} (indices 0..{count})")]
    NoSuchDevice {
        policy: DevicePolicy,
        index: usize,
        count: usize,
    },
}

/// A `HARNESS_DEVICE` value that is none of the accepted ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid device {0:?}: expected `cuda`, `cuda:N` (N a device index), `cpu` or `auto`")]
pub struct InvalidDevicePolicy(String);

impl DevicePolicy {
    /// Whether this policy refuses to run without CUDA.
    pub fn requires_cuda(self) -> bool {
        matches!(self, DevicePolicy::Cuda | DevicePolicy::CudaIndex(_))
    }

    /// Picks the device given how many CUDA devices are usable (0 when CUDA is not
    /// usable at all) and whether the CUDA runtime is linked (for the error text).
    pub fn resolve(self, cuda_devices: usize, cudart_linked: bool) -> Result<DeviceChoice, NoGpu> {
        match self {
            DevicePolicy::Cpu => Ok(DeviceChoice::Cpu),
            DevicePolicy::Auto if cuda_devices > 0 => Ok(DeviceChoice::Cuda(0)),
            DevicePolicy::Auto => Ok(DeviceChoice::Cpu),
            DevicePolicy::Cuda | DevicePolicy::CudaIndex(_) if cuda_devices == 0 => {
                Err(NoGpu::NoCuda {
                    policy: self,
                    cudart_linked,
                })
            }
            DevicePolicy::Cuda => Ok(DeviceChoice::Cuda(0)),
            DevicePolicy::CudaIndex(index) if index < cuda_devices => Ok(DeviceChoice::Cuda(index)),
            DevicePolicy::CudaIndex(index) => Err(NoGpu::NoSuchDevice {
                policy: self,
                index,
                count: cuda_devices,
            }),
        }
    }
}

/// The serve path's start-up decision, logged as the original harness did: info
/// `CUDA GPU access confirmed; starting serving <name>`, or warning
/// `no CUDA GPU access; serving <name> will NOT be started` when the policy needs
/// CUDA and there is none.
pub fn choose_serving_device(
    policy: DevicePolicy,
    facts: &GpuFacts,
    serving: &str,
) -> Result<DeviceChoice, NoGpu> {
    let usable = if facts.gpu_usable() {
        facts.device_count
    } else {
        0
    };
    match policy.resolve(usable, facts.cudart_linked) {
        Ok(device @ DeviceChoice::Cuda(_)) => {
            tracing::info!(
                %device,
                gpus = %facts.device_names(),
                libtorch = facts.libtorch_version,
                "CUDA GPU access confirmed; starting serving {serving}"
            );
            Ok(device)
        }
        Ok(DeviceChoice::Cpu) => {
            tracing::info!(
                %policy,
                gpus = %facts.device_names(),
                libtorch = facts.libtorch_version,
                "starting serving {serving} on the CPU (HARNESS_DEVICE={policy})"
            );
            Ok(DeviceChoice::Cpu)
        }
        Err(reason) => {
            tracing::warn!(
                %reason,
                cudart_linked = facts.cudart_linked,
                libtorch = facts.libtorch_version,
                "no CUDA GPU access; serving {serving} will NOT be started"
            );
            Err(reason)
        }
    }
}

impl FromStr for DevicePolicy {
    type Err = InvalidDevicePolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let value = s.trim().to_ascii_lowercase();
        match value.as_str() {
            "cuda" => Ok(DevicePolicy::Cuda),
            "cpu" => Ok(DevicePolicy::Cpu),
            "auto" => Ok(DevicePolicy::Auto),
            _ => value
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(DevicePolicy::CudaIndex)
                .ok_or_else(|| InvalidDevicePolicy(s.to_string())),
        }
    }
}

impl fmt::Display for DevicePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DevicePolicy::Cuda => f.write_str("cuda"),
            DevicePolicy::CudaIndex(n) => write!(f, "cuda:{n}"),
            DevicePolicy::Cpu => f.write_str("cpu"),
            DevicePolicy::Auto => f.write_str("auto"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_accepted_form() {
        assert_eq!("cuda".parse(), Ok(DevicePolicy::Cuda));
        assert_eq!("CUDA".parse(), Ok(DevicePolicy::Cuda));
        assert_eq!("cuda:1".parse(), Ok(DevicePolicy::CudaIndex(1)));
        assert_eq!(" cpu ".parse(), Ok(DevicePolicy::Cpu));
        assert_eq!("auto".parse(), Ok(DevicePolicy::Auto));
        for bad in ["", "cuda:", "cuda:-1", "cuda:x", "tpu", "cuda1"] {
            let err = bad.parse::<DevicePolicy>().unwrap_err();
            assert!(err.to_string().contains("expected `cuda`"), "{bad}: {err}");
        }
    }

    #[test]
    fn display_round_trips() {
        for p in [
            DevicePolicy::Cuda,
            DevicePolicy::CudaIndex(3),
            DevicePolicy::Cpu,
            DevicePolicy::Auto,
        ] {
            assert_eq!(p.to_string().parse(), Ok(p));
        }
    }

    #[test]
    fn resolves_against_the_machine() {
        use DeviceChoice::*;
        assert_eq!(DevicePolicy::Cpu.resolve(2, true), Ok(Cpu));
        assert_eq!(DevicePolicy::Auto.resolve(0, true), Ok(Cpu));
        assert_eq!(DevicePolicy::Auto.resolve(2, true), Ok(Cuda(0)));
        assert_eq!(DevicePolicy::Cuda.resolve(1, true), Ok(Cuda(0)));
        assert_eq!(DevicePolicy::CudaIndex(1).resolve(2, true), Ok(Cuda(1)));
        assert!(matches!(
            DevicePolicy::Cuda.resolve(0, false),
            Err(NoGpu::NoCuda {
                cudart_linked: false,
                ..
            })
        ));
        let err = DevicePolicy::CudaIndex(2).resolve(2, true).unwrap_err();
        assert_eq!(
            err,
            NoGpu::NoSuchDevice {
                policy: DevicePolicy::CudaIndex(2),
                index: 2,
                count: 2
            }
        );
        assert!(err.to_string().contains("has 2"), "{err}");
    }

    fn facts(device_count: usize) -> GpuFacts {
        GpuFacts {
            cuda_available: device_count > 0,
            device_count,
            devices: (0..device_count)
                .map(|index| crate::engine::gpu::GpuDevice {
                    index,
                    name: "NVIDIA H200".to_string(),
                })
                .collect(),
            cudart_linked: true,
            cudnn_available: device_count > 0,
            driver_version: None,
            libtorch_version: "2.11.0",
            libtorch_path: None,
        }
    }

    /// Runs `f` with a subscriber that writes plain log lines into a buffer.
    fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        (out, text)
    }

    #[test]
    fn the_serve_path_logs_what_the_original_harness_did() {
        let (chosen, log) =
            logged(|| choose_serving_device(DevicePolicy::Cuda, &facts(1), "embedder"));
        assert_eq!(chosen, Ok(DeviceChoice::Cuda(0)));
        assert!(log.contains("INFO"), "{log}");
        assert!(
            log.contains("CUDA GPU access confirmed; starting serving embedder"),
            "{log}"
        );
        assert!(log.contains("cuda:0 NVIDIA H200"), "names the GPU: {log}");

        let (chosen, log) =
            logged(|| choose_serving_device(DevicePolicy::Cuda, &facts(0), "embedder"));
        assert!(matches!(chosen, Err(NoGpu::NoCuda { .. })));
        assert!(log.contains("WARN"), "{log}");
        assert!(
            log.contains("no CUDA GPU access; serving embedder will NOT be started"),
            "{log}"
        );

        let (chosen, log) =
            logged(|| choose_serving_device(DevicePolicy::Auto, &facts(0), "embedder"));
        assert_eq!(chosen, Ok(DeviceChoice::Cpu));
        assert!(
            log.contains("starting serving embedder on the CPU"),
            "{log}"
        );
        assert!(
            !log.contains("WARN"),
            "auto without a GPU is not a warning: {log}"
        );
    }

    #[test]
    fn only_cuda_policies_require_cuda() {
        assert!(DevicePolicy::Cuda.requires_cuda());
        assert!(DevicePolicy::CudaIndex(0).requires_cuda());
        assert!(!DevicePolicy::Cpu.requires_cuda());
        assert!(!DevicePolicy::Auto.requires_cuda());
    }
}
