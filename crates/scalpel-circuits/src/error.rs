//! Errors of the circuits crate.

use thiserror::Error;

/// What can go wrong while analysing a model.
#[derive(Debug, Error)]
pub enum CircuitError {
    /// A request that does not fit the model or prompt; the message says which part.
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] scalpel_models::ModelError),
    #[error(transparent)]
    Hook(#[from] scalpel_core::HookError),
}

/// Result with [`CircuitError`].
pub type Result<T> = std::result::Result<T, CircuitError>;
