//! `scalpel-circuits`: locating the parts of a model that produce a behaviour.
//!
//! - [`lens`]: the logit lens (nostalgebraist 2020): the final normaliser and unembedding applied
//!   to the residual stream after every block.
//! - [`dla`]: direct logit attribution: the final residual split into embeddings, every head,
//!   every attention bias and every MLP, each projected on a logit or logit difference through
//!   the final normaliser with its scale frozen; the parts sum to the whole.
//!
//! - [`heads`]: previous-token, duplicate-token and induction scores of every head.
//!
//! Everything goes through hook points and the model's public weights.

pub mod ablate;
pub mod dla;
pub mod error;
pub mod heads;
pub mod lens;
pub mod metric;
pub mod pairs;
pub mod patching;
pub mod steer;

pub use error::{CircuitError, Result};
