//! Requests' tensors as plain bytes in host memory: what callers hand the engine
//! and get back from it. A request never becomes a libtorch tensor of its own:
//! the engine thread copies every request of a batch straight into the batch's
//! input tensor and cuts each caller's rows out of the outputs' bytes, so the
//! async side never calls into libtorch and a batch costs one tensor per input,
//! not one per item (see `batcher.rs`).

use tch::{Kind, Tensor};

use super::error::ForwardError;

/// A tensor's elements in host memory, row-major, leading with the item dimension.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub kind: Kind,
    pub shape: Vec<i64>,
    /// `shape`'s elements, C-contiguous, native-endian.
    pub data: Vec<u8>,
}

impl HostTensor {
    /// Items (the leading dimension), 0 for a scalar.
    pub fn items(&self) -> i64 {
        self.shape.first().copied().unwrap_or(0)
    }

    /// Bytes of one item.
    pub fn row_bytes(&self) -> usize {
        let per_item = self
            .shape
            .iter()
            .skip(1)
            .fold(1i64, |n, &d| n.saturating_mul(d.max(0)));
        (per_item as usize).saturating_mul(self.kind.elt_size_in_bytes())
    }

    /// Whether `data` holds exactly the elements `shape` and `kind` say.
    /// The dimensions, a zero among them or not, must also multiply out
    /// within `i64`: a shape like `[1, 2^62, 2, 0]` holds no elements but no
    /// arithmetic on it is safe.
    pub fn is_whole(&self) -> bool {
        let bytes = self.kind.elt_size_in_bytes() as i64;
        let nonzero = self
            .shape
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(bytes, |n, &d| n.checked_mul(d));
        self.shape.iter().all(|&d| d >= 0)
            && nonzero.is_some()
            && self
                .shape
                .iter()
                .try_fold(bytes as usize, |n, &d| n.checked_mul(d as usize))
                == Some(self.data.len())
    }

    /// A tensor's elements, read back to the host.
    pub fn from_tensor(tensor: &Tensor) -> Result<HostTensor, ForwardError> {
        let t = tensor
            .f_to_device(tch::Device::Cpu)
            .and_then(|t| t.f_contiguous())
            .map_err(ForwardError::from_torch)?;
        let numel = t.numel();
        let kind = t.kind();
        let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)
            .map_err(ForwardError::from_torch)?;
        Ok(HostTensor {
            kind,
            shape: t.size(),
            data,
        })
    }

    /// A CPU tensor of these elements (one copy).
    pub fn to_tensor(&self) -> Result<Tensor, ForwardError> {
        Tensor::f_from_data_size(&self.data, &self.shape, self.kind)
            .map_err(ForwardError::from_torch)
    }

    /// Items `start..start + count`, as a tensor of their own (one copy).
    pub fn rows(&self, start: i64, count: i64) -> Result<Tensor, ForwardError> {
        let row = self.row_bytes();
        let (from, to) = (start as usize * row, (start + count) as usize * row);
        let mut shape = self.shape.clone();
        shape[0] = count;
        Tensor::f_from_data_size(&self.data[from..to], &shape, self.kind)
            .map_err(ForwardError::from_torch)
    }
}

/// Each output's rows shared out to the callers of a batch, `sizes` items each,
/// in order: each caller's rows copied once, straight from the output.
pub(super) fn split_rows(
    outputs: Vec<Tensor>,
    sizes: &[i64],
) -> Result<Vec<Vec<HostTensor>>, ForwardError> {
    let total: i64 = sizes.iter().sum();
    if let Some(bad) = outputs.iter().find(|o| o.size().first() != Some(&total)) {
        return Err(ForwardError::Model {
            message: format!(
                "the model returned shape {:?} for a batch of {total} items; a batchable model's outputs lead with the item dimension",
                bad.size()
            ),
        });
    }
    let mut parts: Vec<Vec<HostTensor>> = sizes
        .iter()
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for output in &outputs {
        let output = output
            .f_to_device(tch::Device::Cpu)
            .and_then(|t| t.f_contiguous())
            .map_err(ForwardError::from_torch)?;
        let mut offset = 0;
        for (part, &n) in parts.iter_mut().zip(sizes) {
            // Rows of a contiguous tensor: a contiguous view, read once.
            let rows = output
                .f_narrow(0, offset, n)
                .map_err(ForwardError::from_torch)?;
            part.push(HostTensor::from_tensor(&rows)?);
            offset += n;
        }
    }
    Ok(parts)
}

/// Outputs of consecutive slices of one request joined back along dim 0.
pub(super) fn join_rows(pieces: Vec<Vec<HostTensor>>) -> Result<Vec<HostTensor>, ForwardError> {
    let mut pieces = pieces.into_iter();
    let Some(mut joined) = pieces.next() else {
        return Ok(Vec::new());
    };
    for piece in pieces {
        if piece.len() != joined.len() {
            return Err(ForwardError::Model {
                message: "the model returned a different number of outputs per batch".to_string(),
            });
        }
        for (whole, part) in joined.iter_mut().zip(piece) {
            if part.kind != whole.kind || part.shape.get(1..) != whole.shape.get(1..) {
                return Err(ForwardError::Model {
                    message: format!(
                        "the model's outputs differ between batches: {:?} {:?} and {:?} {:?}",
                        whole.kind, whole.shape, part.kind, part.shape
                    ),
                });
            }
            whole.shape[0] += part.shape[0];
            whole.data.extend_from_slice(&part.data);
        }
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip_and_split_by_rows() {
        let x = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6]).view([3, 2]);
        let host = HostTensor::from_tensor(&x).unwrap();
        assert!(host.is_whole());
        assert_eq!((host.items(), host.row_bytes()), (3, 16));
        assert!(host.to_tensor().unwrap().equal(&x));
        assert!(host.rows(1, 2).unwrap().equal(&x.narrow(0, 1, 2)));
        // A transposed view is read in its logical order.
        let t = HostTensor::from_tensor(&x.tr()).unwrap();
        assert!(t.to_tensor().unwrap().equal(&x.tr()));

        let parts = split_rows(vec![x.shallow_clone()], &[1, 2]).unwrap();
        assert!(parts[0][0].to_tensor().unwrap().equal(&x.narrow(0, 0, 1)));
        assert!(parts[1][0].to_tensor().unwrap().equal(&x.narrow(0, 1, 2)));
        let back = join_rows(parts).unwrap();
        assert_eq!(back[0], host);
        let err = split_rows(vec![x], &[2, 2]).unwrap_err();
        assert!(matches!(err, ForwardError::Model { .. }), "{err}");
    }

    #[test]
    fn bytes_that_do_not_fill_the_shape_are_not_whole() {
        let short = HostTensor {
            kind: Kind::Float,
            shape: vec![2, 2],
            data: vec![0; 12],
        };
        assert!(!short.is_whole());
        let negative = HostTensor {
            shape: vec![-1, 2],
            ..short.clone()
        };
        assert!(!negative.is_whole());
        // No elements, but dimensions no arithmetic survives.
        let huge = HostTensor {
            shape: vec![1, 1 << 62, 2, 0],
            data: vec![],
            ..short
        };
        assert!(!huge.is_whole());
    }
}
