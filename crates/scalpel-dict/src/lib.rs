//! Sparse dictionaries over model activations: sparse autoencoders and transcoders in the
//! SAELens file format (<https://github.com/jbloomAus/SAELens>), their inference (`encode`,
//! `decode`, `forward`) and splicing into a forward pass through scalpel's hooks.
//!
//! - [`DictConfig`]: the SAELens `cfg.json` (6.x, and pre-6 flat configs on reading).
//! - [`Sae`]: the weights in SAELens orientation (`encode` is `x @ W_enc`) and inference.
//! - [`saelens`]: reading and writing a SAELens directory.
//! - [`import`]: sparsify, Gemma Scope and circuit-tracer dictionaries, converted.
//! - [`splice`]: replace an activation with the dictionary's reconstruction.
//! - [`eval`]: SAELens's evaluation metrics of a dictionary spliced into a model.

mod config;
mod error;
pub mod eval;
pub mod import;
pub mod run;
mod sae;
pub mod saelens;
mod splice;
pub mod synthetic;
pub mod train;

pub use config::{Architecture, DictConfig, Metadata, NormalizeActivations, FORMAT_VERSION};
pub use error::{DictError, Result};
pub use sae::{InputNorm, Sae};
pub use splice::{splice, splice_at};
