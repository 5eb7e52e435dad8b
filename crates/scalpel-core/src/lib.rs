//! `scalpel-core`: the vocabulary every scalpel crate shares.
//!
//! - [`HookPoint`]: the named places inside a transformer where an activation can be read or
//!   replaced, spelled exactly as TransformerLens spells them (`blocks.6.hook_resid_post`).
//! - [`Hooks`]: what a caller asks of one forward pass: which activations to cache, which to
//!   replace, and which to track for gradients.
//! - [`ActivationCache`]: the activations a forward pass cached, by hook point.

mod cache;
mod error;
pub mod gemm;
mod hook_point;
mod hooks;

pub use cache::ActivationCache;
pub use error::HookError;
pub use hook_point::{BlockHook, HookPoint};
pub use hooks::{HookCtx, HookFn, Hooks};
