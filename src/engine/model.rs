//! A loaded model as the batcher uses it: inputs to the device, one TorchScript
//! forward, the task's finishing step there, outputs back to the CPU.

use std::sync::Arc;

use tch::Tensor;

use super::collate::{split, Collate, Finish};
use super::error::ForwardError;
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
    /// each request's share (`sizes` items each).
    pub fn forward_joined(
        &self,
        inputs: Vec<Vec<Tensor>>,
        sizes: &[i64],
    ) -> Result<Vec<Vec<Tensor>>, ForwardError> {
        let total = sizes.iter().sum();
        let joined = self.collate.join(inputs)?;
        split(self.forward(joined)?, sizes, total)
    }
}
