//! A loaded model as the batcher uses it: inputs to the device, one TorchScript
//! forward, the task's finishing step there, outputs back to the host.

use std::sync::Arc;

use tch::Tensor;

use super::collate::{Collate, Finish};
use super::error::ForwardError;
use super::host::{split_rows, HostTensor};
use super::torchscript::TorchScript;

/// The module with how its batches are joined and finished.
pub(super) struct Model {
    pub script: TorchScript,
    pub collate: Collate,
    pub finish: Option<Arc<dyn Finish>>,
}

impl Model {
    /// One forward on exactly `inputs`; the outputs on the CPU.
    pub fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, ForwardError> {
        let device = self.script.device();
        let inputs = inputs
            .into_iter()
            .map(|t| t.f_to_device(device))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ForwardError::from_torch)?;
        let outputs = self.script.forward(&inputs)?;
        let outputs = match &self.finish {
            Some(finish) => finish.finish(&inputs, outputs)?,
            None => outputs,
        };
        outputs
            .into_iter()
            .map(|t| {
                t.f_to_device(tch::Device::Cpu)
                    .map_err(ForwardError::from_torch)
            })
            .collect()
    }

    /// Several requests' inputs joined into one forward, its outputs cut back into
    /// each request's share (`sizes` items each), on the host.
    pub fn forward_joined(
        &self,
        inputs: &[&[HostTensor]],
        sizes: &[i64],
    ) -> Result<Vec<Vec<HostTensor>>, ForwardError> {
        let joined = self.collate.join(inputs)?;
        self.forward_host(joined, sizes)
    }

    /// One forward on `inputs` (CPU tensors), its outputs cut into `sizes` items
    /// each, on the host.
    pub fn forward_host(
        &self,
        inputs: Vec<Tensor>,
        sizes: &[i64],
    ) -> Result<Vec<Vec<HostTensor>>, ForwardError> {
        split_rows(self.forward(inputs)?, sizes)
    }
}
