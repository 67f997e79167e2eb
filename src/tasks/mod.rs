//! Tasks: what a request means to the model, on each side of the engine. With the
//! engine, the only room that touches `tch`.

pub mod embedding;
pub mod tensor;
pub mod tokenizer;
