//! The one error type of `scalpel-models`. Every variant names the file, tensor or setting at fault
//! so that the CLI can print a single clear line.

use std::path::PathBuf;

/// Errors from loading, configuring and running models.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is not what its format promises.
    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },
    /// A configuration value is missing, unsupported or inconsistent.
    #[error("config: {0}")]
    Config(String),
    /// A tensor is missing from a checkpoint.
    #[error("tensor `{name}` is missing from {source_desc}")]
    MissingTensor { name: String, source_desc: String },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// The tokenizer could not be built or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A download (PyPI wheel, Hugging Face hub) failed.
    #[error("download of {what}: {msg}")]
    Download { what: String, msg: String },
    /// The chat template could not be rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A request that the model cannot serve (empty prompt, too long, bad hook replacement...).
    #[error("{0}")]
    Input(String),
    /// Errors from the hook machinery (unknown hook, replacement of the wrong shape).
    #[error(transparent)]
    Hook(#[from] scalpel_core::HookError),
    /// Errors from the tensor library.
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }

    /// A file whose content is wrong.
    pub fn bad_file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        ModelError::BadFile {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
