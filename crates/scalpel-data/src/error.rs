//! The one error type of `scalpel-data`.

use std::path::PathBuf;

/// Errors from corpora, packing and the activation store. Variants name the file or shard.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file's content is not what its format promises (bad JSON line, missing column...).
    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },
    /// A store or shard failed a consistency check (checksum, manifest from another model...).
    #[error("{path}: {msg}")]
    Store { path: PathBuf, msg: String },
    /// A download failed.
    #[error("download of {what}: {msg}")]
    Download { what: String, msg: String },
    /// A request that cannot be served (bad option values...).
    #[error("{0}")]
    Input(String),
    /// Errors from the model crate (tokenizer, forward pass).
    #[error(transparent)]
    Model(#[from] scalpel_models::ModelError),
    /// Errors from the tensor library.
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

impl DataError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
