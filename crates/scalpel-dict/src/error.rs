//! The one error type of the crate: every variant names the file (or source), the tensor or the
//! config field at fault.

use std::path::PathBuf;

/// An error reading, checking, writing or running a dictionary.
#[derive(Debug, thiserror::Error)]
pub enum DictError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A config is not valid JSON, or a field has the wrong type or value.
    #[error("{source_name}: config field `{field}`: {reason}")]
    Config {
        source_name: String,
        field: String,
        reason: String,
    },
    /// The `architecture` is none scalpel knows.
    #[error(
        "{source_name}: unknown architecture `{found}` (known: standard, topk, jumprelu, gated, \
         transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder, \
         topk_transcoder, topk_skip_transcoder)"
    )]
    UnknownArchitecture { source_name: String, found: String },
    /// A tensor the architecture needs is absent.
    #[error("{source_name}: missing tensor `{tensor}` (needed by a {architecture} dictionary)")]
    MissingTensor {
        source_name: String,
        tensor: String,
        architecture: String,
    },
    /// A tensor has the wrong shape.
    #[error("{source_name}: tensor `{tensor}` has shape {found:?}, expected {expected:?}{hint}")]
    Shape {
        source_name: String,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        hint: &'static str,
    },
    /// An input to `encode`/`decode` has the wrong shape.
    #[error("{what} has shape {found:?}, expected [n, {expected}]")]
    Input {
        what: &'static str,
        expected: usize,
        found: Vec<usize>,
    },
    /// A safetensors file could not be parsed or written.
    #[error("{}: {reason}", path.display())]
    Safetensors { path: PathBuf, reason: String },
    /// A hook name in the config is not a hook point.
    #[error("config field `{field}`: {source}")]
    Hook {
        field: &'static str,
        #[source]
        source: Box<scalpel_core::HookError>,
    },
    /// Training produced a non-finite loss or gradient; the parameters were left as they were
    /// before the step.
    #[error("training diverged at step {step} ({tokens} tokens): {what}")]
    Diverged {
        step: u64,
        tokens: u64,
        what: String,
    },
    /// Reading training data (an activation store, a corpus, a model) failed.
    #[error(transparent)]
    Data(#[from] scalpel_data::DataError),
    /// A dictionary's width differs from the width of the model's activation at its hook.
    #[error("the dictionary's {what} is {dict} but the model's `{hook}` has width {model}")]
    HookWidth {
        what: &'static str,
        hook: String,
        dict: usize,
        model: usize,
    },
    /// An evaluation cannot run on what it was given (no tokens, ragged contexts...).
    #[error("evaluation: {0}")]
    Eval(String),
    /// A forward pass of the model failed.
    #[error(transparent)]
    Model(#[from] scalpel_models::ModelError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T, E = DictError> = std::result::Result<T, E>;
