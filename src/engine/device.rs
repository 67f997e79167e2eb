//! The device a model is placed on, in our terms and in libtorch's. Which one to
//! use is policy (`HARNESS_DEVICE`), decided in [`crate::device`].

use std::fmt;

/// A concrete device to load a model on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    /// libtorch's device for this one.
    pub(crate) fn tch(self) -> tch::Device {
        match self {
            DeviceChoice::Cpu => tch::Device::Cpu,
            DeviceChoice::Cuda(index) => tch::Device::Cuda(index),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}
