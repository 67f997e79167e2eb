//! The tensor task: `Run` takes tensors sharing their leading dimension (the
//! items) and returns the model's output tensors for those items.
//!
//! Every rule is checked before anything is queued, and each failure says which.
//! A request's bytes go to the engine as they came off the wire, and its answer
//! is made on the engine thread from the outputs' bytes ([`HostTensor`]).

use std::sync::Arc;

use futures_util::future::BoxFuture;
use harness_client::{DType, RunReply, RunRequest, ServingError, WireTensor};
use tch::{Kind, Tensor};
use tokio::sync::watch;

use super::{serving_error, LoadContext, LoadFailure, Respond, Task, Timing};
use crate::engine::{Engine, EngineStats, HostTensor};

/// Elements one request may carry, over all its tensors: a guard against a
/// request that would exhaust memory (256 Mi elements, 1 GiB of f32).
pub const MAX_ELEMENTS: usize = 1 << 28;

/// The per-item signature of one input: dtype and trailing shape, as
/// `HARNESS_WARMUP_INPUTS` writes it (`f32[4]`, `i64[128]`, `f32[3,224,224]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSpec {
    pub dtype: DType,
    pub shape: Vec<i64>,
}

impl InputSpec {
    /// Parses `f32[4],i64[2,8]` into one spec per input.
    pub fn parse_list(text: &str) -> Result<Vec<InputSpec>, String> {
        let mut specs = Vec::new();
        let mut rest = text.trim();
        while !rest.is_empty() {
            let open = rest
                .find('[')
                .ok_or_else(|| format!("{rest:?}: expected dtype[dims], e.g. f32[4]"))?;
            let close = rest
                .find(']')
                .ok_or_else(|| format!("{rest:?}: missing ]"))?;
            let dtype = parse_dtype(rest[..open].trim())?;
            let shape = rest[open + 1..close]
                .split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(|d| {
                    d.parse::<i64>()
                        .ok()
                        .filter(|d| *d > 0)
                        .ok_or_else(|| format!("{d:?} is not a positive dimension"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            specs.push(InputSpec { dtype, shape });
            rest = rest[close + 1..].trim_start_matches([',', ' ']);
        }
        if specs.is_empty() {
            return Err("no inputs given".to_string());
        }
        Ok(specs)
    }

    /// A batch of `items` zero-filled items of this input, for warm-up.
    pub fn zeros(&self, items: i64) -> Tensor {
        let mut shape = vec![items];
        shape.extend(&self.shape);
        Tensor::zeros(shape.as_slice(), (kind_of(self.dtype), tch::Device::Cpu))
    }
}

/// `HARNESS_WARMUP_INPUTS` parsed and checked against `HARNESS_MAX_BATCH_SIZE`:
/// warm-up's largest batch must be one a request could carry ([`MAX_ELEMENTS`]),
/// so an allocation that cannot succeed is refused before it is tried.
pub fn warmup_specs(
    text: Option<&str>,
    max_batch_size: u32,
) -> Result<Option<Vec<InputSpec>>, String> {
    let Some(text) = text else {
        return Ok(None);
    };
    let specs = InputSpec::parse_list(text).map_err(|e| format!("HARNESS_WARMUP_INPUTS: {e}"))?;
    let per_item: u128 = specs
        .iter()
        .map(|s| s.shape.iter().map(|&d| d as u128).product::<u128>())
        .sum();
    let batch = per_item * u128::from(max_batch_size);
    if batch > MAX_ELEMENTS as u128 {
        let bytes: u128 = specs
            .iter()
            .map(|s| {
                s.shape.iter().map(|&d| d as u128).product::<u128>()
                    * s.dtype.size() as u128
                    * u128::from(max_batch_size)
            })
            .sum();
        return Err(format!(
            "HARNESS_WARMUP_INPUTS={text} with HARNESS_MAX_BATCH_SIZE={max_batch_size} makes a warm-up batch of {batch} elements ({:.1} GiB), over the {MAX_ELEMENTS} one request may carry: lower HARNESS_MAX_BATCH_SIZE or check HARNESS_WARMUP_INPUTS (the shape of ONE item)",
            bytes as f64 / (1u64 << 30) as f64
        ));
    }
    Ok(Some(specs))
}

fn parse_dtype(name: &str) -> Result<DType, String> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "f32" | "float" | "float32" => DType::F32,
        "f64" | "double" | "float64" => DType::F64,
        "f16" | "half" | "float16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        "i64" | "long" | "int64" => DType::I64,
        "i32" | "int" | "int32" => DType::I32,
        "i16" | "int16" => DType::I16,
        "i8" | "int8" => DType::I8,
        "u8" | "uint8" => DType::U8,
        "bool" => DType::Bool,
        other => {
            return Err(format!(
                "unknown dtype {other:?} (f32, f64, f16, bf16, i64, i32, i16, i8, u8, bool)"
            ))
        }
    })
}

fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::F32 => Kind::Float,
        DType::F64 => Kind::Double,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        DType::I64 => Kind::Int64,
        DType::I32 => Kind::Int,
        DType::I16 => Kind::Int16,
        DType::I8 => Kind::Int8,
        DType::U8 => Kind::Uint8,
        DType::Bool => Kind::Bool,
    }
}

fn dtype_of(kind: Kind) -> Option<DType> {
    Some(match kind {
        Kind::Float => DType::F32,
        Kind::Double => DType::F64,
        Kind::Half => DType::F16,
        Kind::BFloat16 => DType::BF16,
        Kind::Int64 => DType::I64,
        Kind::Int => DType::I32,
        Kind::Int16 => DType::I16,
        Kind::Int8 => DType::I8,
        Kind::Uint8 => DType::U8,
        Kind::Bool => DType::Bool,
        _ => return None,
    })
}

/// Checks a request's tensors against every rule. `specs` are the model's
/// per-item inputs (`HARNESS_WARMUP_INPUTS`), when declared: then the number of
/// inputs, each one's dtype and its number of dimensions must match (the sizes
/// may differ, for models that take several). Only headers are read: cheap
/// whatever the request's size.
pub fn check(inputs: &[WireTensor], specs: Option<&[InputSpec]>) -> Result<(), String> {
    if inputs.is_empty() {
        return Err("no input tensors".to_string());
    }
    if let Some(specs) = specs {
        if inputs.len() != specs.len() {
            return Err(format!(
                "the model takes {} input tensor(s), the request has {}",
                specs.len(),
                inputs.len()
            ));
        }
    }
    let mut total = 0usize;
    let mut items = None;
    for (i, t) in inputs.iter().enumerate() {
        if t.shape.is_empty() {
            return Err(format!(
                "input {i} is a scalar; inputs lead with the item dimension"
            ));
        }
        if let Some(d) = t.shape.iter().find(|d| **d < 0) {
            return Err(format!(
                "input {i} has a negative dimension ({d}) in shape {:?}",
                t.shape
            ));
        }
        let count = t
            .element_count()
            .ok_or_else(|| format!("input {i}'s shape {:?} is too large", t.shape))?;
        total = total.saturating_add(count);
        if total > MAX_ELEMENTS {
            return Err(format!("the request carries more than {MAX_ELEMENTS} elements; send fewer items per request"));
        }
        let expected = count
            .checked_mul(t.dtype.size())
            .ok_or_else(|| format!("input {i} is too large"))?;
        if expected != t.data.len() {
            return Err(format!(
                "input {i}: shape {:?} of {:?} needs {expected} bytes, the request carries {}",
                t.shape,
                t.dtype,
                t.data.len()
            ));
        }
        match items {
            None if t.shape[0] == 0 => {
                return Err("the request has no items (leading dimension 0)".to_string())
            }
            None => items = Some(t.shape[0]),
            Some(n) if n != t.shape[0] => {
                return Err(format!(
                    "inputs disagree on the number of items: {n} and {} (input {i})",
                    t.shape[0]
                ))
            }
            Some(_) => {}
        }
    }
    if let Some(specs) = specs {
        for (i, (t, spec)) in inputs.iter().zip(specs).enumerate() {
            if t.dtype != spec.dtype || t.shape.len() != spec.shape.len() + 1 {
                return Err(format!(
                    "input {i} is {:?} of shape {:?}; the model takes {:?} items of shape {:?}, so [N, {}] (HARNESS_WARMUP_INPUTS)",
                    t.dtype,
                    t.shape,
                    spec.dtype,
                    spec.shape,
                    spec.shape
                        .iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
    Ok(())
}

/// A checked wire tensor as the engine takes it: its bytes moved, not copied.
pub fn to_host(t: WireTensor) -> HostTensor {
    HostTensor {
        kind: kind_of(t.dtype),
        shape: t.shape,
        data: t.data,
    }
}

/// The model's outputs, on the wire: their bytes moved, not copied.
pub fn to_wire(outputs: Vec<HostTensor>) -> Result<Vec<WireTensor>, String> {
    outputs
        .into_iter()
        .map(|t| {
            let dtype = dtype_of(t.kind).ok_or_else(|| {
                format!(
                    "the model returned a {:?} tensor, which the protocol cannot carry",
                    t.kind
                )
            })?;
            Ok(WireTensor {
                dtype,
                shape: t.shape,
                data: t.data,
            })
        })
        .collect()
}

/// The tensor task: a TorchScript model whose inputs stack along the item dimension.
pub struct TensorTask {
    engine: Engine,
    /// The model's per-item inputs (`HARNESS_WARMUP_INPUTS`), when declared:
    /// requests are checked against them and warm-up uses them.
    inputs: Option<Arc<Vec<InputSpec>>>,
}

impl TensorTask {
    /// Loads the model: the first of the files is the TorchScript module.
    pub async fn load(context: LoadContext) -> Result<Self, LoadFailure> {
        let (_, model) = context
            .files
            .first()
            .ok_or_else(|| LoadFailure::permanent("no model file (HARNESS_MODEL_FILES)"))?;
        let engine = Engine::load(model, context.device, context.batch).await?;
        engine.observe(context.observer);
        Ok(TensorTask {
            engine,
            inputs: context.warmup_inputs.map(Arc::new),
        })
    }
}

impl Task for TensorTask {
    fn name(&self) -> &'static str {
        "tensor"
    }

    fn answers(&self) -> &'static str {
        "Run"
    }

    fn warm_up(self: Arc<Self>) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(async move {
            let Some(specs) = &self.inputs else {
                tracing::warn!("HARNESS_WARMUP_INPUTS is unset: no warm-up, so the first requests of each shape are slow");
                return Ok(());
            };
            // One item and a full batch: the shapes the batcher will send.
            for items in [1, self.engine.config().max_batch_size as i64] {
                let sample: Vec<_> = specs.iter().map(|s| s.zeros(items)).collect();
                self.engine.warm_up(sample, 3).await.map_err(|e| {
                    format!("the warm-up forward failed (check HARNESS_WARMUP_INPUTS): {e}")
                })?;
            }
            Ok(())
        })
    }

    fn stats(&self) -> Arc<EngineStats> {
        self.engine.stats().clone()
    }

    fn failure(&self) -> watch::Receiver<Option<String>> {
        self.engine.failure()
    }

    /// Checked where it arrives, queued as it came off the wire, answered from
    /// the engine thread: no task, no blocking-pool hop, no tensor per request.
    fn run(self: Arc<Self>, request: RunRequest, timing: Timing, respond: Respond<RunReply>) {
        let _span = tracing::info_span!("serving.run", inputs = request.inputs.len()).entered();
        let specs = self.inputs.as_ref().map(|s| s.as_slice());
        if let Err(reason) = check(&request.inputs, specs) {
            return respond(Err(ServingError::BadInput { reason }));
        }
        let inputs = request.inputs.into_iter().map(to_host).collect();
        let received = timing.received;
        self.engine.submit(inputs, timing.deadline, move |answer| {
            let outputs = answer.map_err(|e| serving_error(e, received));
            respond(
                outputs.and_then(|o| to_wire(o).map_err(|message| ServingError::Model { message })),
            )
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_specs_parse() {
        assert_eq!(
            InputSpec::parse_list("f32[4], i64[2,8]").unwrap(),
            vec![
                InputSpec {
                    dtype: DType::F32,
                    shape: vec![4]
                },
                InputSpec {
                    dtype: DType::I64,
                    shape: vec![2, 8]
                }
            ]
        );
        assert_eq!(
            InputSpec::parse_list("f32[]").unwrap()[0].shape,
            Vec::<i64>::new()
        );
        for bad in ["", "f32", "x9[4]", "f32[-1]", "f32[4"] {
            assert!(InputSpec::parse_list(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_warm_up_batch_that_cannot_be_allocated_is_refused_before_it_is_tried() {
        let err = warmup_specs(Some("f32[1000,1000]"), 65536).unwrap_err();
        assert!(err.contains("HARNESS_MAX_BATCH_SIZE=65536"), "{err}");
        assert!(err.contains("244.1 GiB"), "{err}");
        assert_eq!(
            warmup_specs(Some("f32[4]"), 32).unwrap().unwrap()[0].shape,
            vec![4]
        );
        assert_eq!(warmup_specs(None, 65536).unwrap(), None);
        assert!(warmup_specs(Some("f32[x]"), 1)
            .unwrap_err()
            .starts_with("HARNESS_WARMUP_INPUTS: "));
    }

    #[test]
    fn every_rule_is_checked() {
        let good = WireTensor::from_f32(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
        let one = InputSpec::parse_list("f32[2]").unwrap();
        let two = InputSpec::parse_list("f32[2],f32[2]").unwrap();
        assert!(check(std::slice::from_ref(&good), Some(&one)).is_ok());
        // Sizes may differ from the declared ones; dtype and rank may not.
        let wider = WireTensor::from_f32(&[1, 4], &[0.0; 4]);
        assert!(check(std::slice::from_ref(&wider), Some(&one)).is_ok());
        /// Inputs, the declared specs, and what the error must say.
        type Case<'a> = (Vec<WireTensor>, Option<&'a [InputSpec]>, &'a str);
        let cases: Vec<Case> = vec![
            (vec![], None, "no input"),
            (vec![good.clone()], Some(&two), "takes 2 input"),
            (
                vec![WireTensor::from_f32(&[4], &[0.0; 4])],
                Some(&one),
                "so [N, 2]",
            ),
            (
                vec![WireTensor::from_i64(&[2, 2], &[0; 4])],
                Some(&one),
                "takes F32 items",
            ),
            (
                vec![WireTensor {
                    shape: vec![],
                    ..good.clone()
                }],
                None,
                "scalar",
            ),
            (
                vec![WireTensor {
                    shape: vec![2, -2],
                    ..good.clone()
                }],
                None,
                "negative dimension",
            ),
            (
                vec![WireTensor {
                    shape: vec![2, 3],
                    ..good.clone()
                }],
                None,
                "needs 24 bytes",
            ),
            (
                vec![WireTensor {
                    shape: vec![0, 2],
                    data: vec![],
                    ..good.clone()
                }],
                None,
                "no items",
            ),
            (
                vec![good.clone(), WireTensor::from_f32(&[1, 2], &[0.0, 0.0])],
                None,
                "disagree",
            ),
            (
                vec![WireTensor {
                    shape: vec![1 << 20, 1 << 9],
                    data: vec![],
                    ..good.clone()
                }],
                None,
                "more than",
            ),
        ];
        for (inputs, arity, says) in cases {
            let err = check(&inputs, arity).unwrap_err();
            assert!(err.contains(says), "{says}: {err}");
        }
    }

    #[test]
    fn tensors_round_trip_through_the_wire() {
        let x = Tensor::from_slice(&[1i64, -2, 3, 4, 5, 6]).reshape([3, 2]);
        let wire = to_wire(vec![HostTensor::from_tensor(&x).unwrap()]).unwrap();
        assert_eq!(
            (wire[0].dtype, wire[0].shape.clone()),
            (DType::I64, vec![3, 2])
        );
        check(&wire, None).unwrap();
        let back = to_host(wire.into_iter().next().unwrap());
        assert!(back.to_tensor().unwrap().equal(&x));
        let complex = HostTensor {
            kind: Kind::ComplexFloat,
            ..back
        };
        assert!(to_wire(vec![complex]).unwrap_err().contains("cannot carry"));
    }
}
