//! Errors of the toy-model crate.

use thiserror::Error;

/// Everything that can go wrong while growing or analysing a toy model.
#[derive(Debug, Error)]
pub enum ToyError {
    /// A setting is out of range; the message names it.
    #[error("invalid setting: {0}")]
    Config(String),
    /// Training produced a non-finite loss or gradient.
    #[error("training diverged at step {step}: {what}")]
    Diverged { step: usize, what: String },
    /// A checkpoint or report file could not be read or written.
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] scalpel_models::ModelError),
    #[error(transparent)]
    Hook(#[from] scalpel_core::HookError),
    /// Boxed: the circuits error holds the model's and candle's errors.
    #[error(transparent)]
    Circuit(Box<scalpel_circuits::CircuitError>),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<scalpel_circuits::CircuitError> for ToyError {
    fn from(e: scalpel_circuits::CircuitError) -> Self {
        ToyError::Circuit(Box::new(e))
    }
}

/// Result with [`ToyError`].
pub type Result<T> = std::result::Result<T, ToyError>;
