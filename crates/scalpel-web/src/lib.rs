//! The place where a person looks inside a model: feature dashboards computed in one streaming
//! pass and kept in SQLite, and the web app that serves them with a prompt explorer, search,
//! a steering playground and patching heatmaps, plus Neuronpedia's inference protocol.

pub mod dashboards;
pub mod error;
pub mod neuronpedia;
pub mod server;
pub mod state;

pub use error::{ApiError, Error, Result};
