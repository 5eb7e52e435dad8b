//! The dashboard database: one SQLite file (bundled library), one row per latent, indexed by
//! latent and by token so a server reads one latent, or the latents that fire most on a token,
//! without loading the rest.

use std::path::Path;
use std::sync::Mutex;

use super::types::{DictInfo, LatentDashboard};
use crate::{Error, Result};

/// A latent that fired on a token, with its largest activation there.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenHit {
    pub latent: u32,
    pub max_act: f32,
}

/// An open dashboard database. `Send + Sync`: the connection is behind a mutex.
pub struct DashboardDb {
    conn: Mutex<rusqlite::Connection>,
}

impl DashboardDb {
    /// Opens an existing database (error if missing or not a dashboard database).
    pub fn open(path: &Path) -> Result<DashboardDb> {
        let _ = path;
        Err(Error::msg("not yet implemented"))
    }

    /// Opens or creates a database for writing.
    pub fn create(path: &Path) -> Result<DashboardDb> {
        let _ = path;
        Err(Error::msg("not yet implemented"))
    }

    /// The dictionaries held.
    pub fn dictionaries(&self) -> Result<Vec<DictInfo>> {
        let _ = &self.conn;
        Err(Error::msg("not yet implemented"))
    }

    /// One latent's dashboard, or `None` when the dictionary or the latent is unknown.
    pub fn latent(&self, dict: &str, latent: u32) -> Result<Option<LatentDashboard>> {
        let _ = (dict, latent);
        Err(Error::msg("not yet implemented"))
    }

    /// The latents of `dict` whose top contexts fire most on `token_id`, strongest first.
    pub fn latents_for_token(&self, dict: &str, token_id: u32, k: usize) -> Result<Vec<TokenHit>> {
        let _ = (dict, token_id, k);
        Err(Error::msg("not yet implemented"))
    }

    /// Adds or replaces a dictionary's description.
    pub fn put_dict(&self, info: &DictInfo) -> Result<()> {
        let _ = info;
        Err(Error::msg("not yet implemented"))
    }

    /// Adds or replaces latents (in one transaction).
    pub fn put_latents(&self, latents: &[LatentDashboard]) -> Result<()> {
        let _ = latents;
        Err(Error::msg("not yet implemented"))
    }
}
