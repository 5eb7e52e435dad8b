//! Feature dashboards: what each latent of a dictionary means, computed in one streaming pass
//! over an activation store or a corpus, kept in SQLite, exported for Neuronpedia and as HTML.

pub mod compute;
pub mod db;
pub mod export;
pub mod types;

pub use db::DashboardDb;
pub use types::*;
