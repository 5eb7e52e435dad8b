//! The dashboard database: one SQLite file (bundled library), one row per latent, indexed by
//! latent and by token so a server reads one latent, or the latents that fire most on a token,
//! without loading the rest.
//!
//! Tables: `meta` (a format marker), `dictionaries` (one JSON [`DictInfo`] per id), `latents`
//! (dict, latent, the [`LatentDashboard`] as deflate-compressed JSON; primary key (dict,
//! latent)) and `token_index` (dict, token_id, latent, max_act), filled from the peak token of
//! every top context, indexed on (dict, token_id, max_act).

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, OptionalExtension};

use super::types::{DictInfo, LatentDashboard};
use crate::{Error, Result};

pub use super::types::TokenHit;

/// An open dashboard database. `Send + Sync`: the connection is behind a mutex.
pub struct DashboardDb {
    conn: Mutex<rusqlite::Connection>,
}

const FORMAT: &str = "scalpel-dashboards-1";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dictionaries (id TEXT PRIMARY KEY, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS latents (
    dict TEXT NOT NULL, latent INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (dict, latent)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS token_index (
    dict TEXT NOT NULL, token_id INTEGER NOT NULL, latent INTEGER NOT NULL, max_act REAL NOT NULL,
    PRIMARY KEY (dict, token_id, latent)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS token_index_by_act ON token_index (dict, token_id, max_act DESC);
CREATE INDEX IF NOT EXISTS token_index_by_latent ON token_index (dict, latent);
";

fn compress(json: &[u8]) -> Result<Vec<u8>> {
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(json)?;
    Ok(e.finish()?)
}

fn decompress(blob: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::DeflateDecoder::new(blob).read_to_end(&mut out)?;
    Ok(out)
}

impl DashboardDb {
    /// Opens an existing database (error if missing or not a dashboard database).
    pub fn open(path: &Path) -> Result<DashboardDb> {
        if !path.is_file() {
            return Err(Error::msg(format!(
                "no dashboard database at {} (make one with `scalpel dashboards`)",
                path.display()
            )));
        }
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let format: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'format'", [], |r| {
                r.get(0)
            })
            .optional()
            .unwrap_or(None);
        if format.as_deref() != Some(FORMAT) {
            return Err(Error::msg(format!(
                "{} is not a scalpel dashboard database",
                path.display()
            )));
        }
        Ok(DashboardDb {
            conn: Mutex::new(conn),
        })
    }

    /// Opens or creates a database for writing.
    pub fn create(path: &Path) -> Result<DashboardDb> {
        let conn = rusqlite::Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let format: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'format'", [], |r| {
                r.get(0)
            })
            .optional()
            .unwrap_or(None);
        if let Some(f) = format {
            if f != FORMAT {
                return Err(Error::msg(format!(
                    "{} holds dashboards of format {f}, not {FORMAT}",
                    path.display()
                )));
            }
        } else {
            let tables: i64 = conn.query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
                [],
                |r| r.get(0),
            )?;
            if tables > 0 {
                return Err(Error::msg(format!(
                    "{} is an SQLite database but not a dashboard database; choose another --out",
                    path.display()
                )));
            }
        }
        conn.execute_batch(SCHEMA)?;
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('format', ?1)",
            [FORMAT],
        )?;
        Ok(DashboardDb {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, rusqlite::Connection>> {
        self.conn
            .lock()
            .map_err(|_| Error::msg("the dashboard database lock was poisoned"))
    }

    /// The dictionaries held.
    pub fn dictionaries(&self) -> Result<Vec<DictInfo>> {
        let conn = self.conn()?;
        let mut st = conn.prepare("SELECT info FROM dictionaries ORDER BY id")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        rows.map(|r| Ok(serde_json::from_str(&r?)?)).collect()
    }

    /// One latent's dashboard, or `None` when the dictionary or the latent is unknown.
    pub fn latent(&self, dict: &str, latent: u32) -> Result<Option<LatentDashboard>> {
        let conn = self.conn()?;
        let blob: Option<Vec<u8>> = conn
            .query_row(
                "SELECT data FROM latents WHERE dict = ?1 AND latent = ?2",
                params![dict, latent],
                |r| r.get(0),
            )
            .optional()?;
        drop(conn);
        match blob {
            Some(b) => Ok(Some(serde_json::from_slice(&decompress(&b)?)?)),
            None => Ok(None),
        }
    }

    /// The latents of `dict` whose top contexts fire most on `token_id`, strongest first.
    pub fn latents_for_token(&self, dict: &str, token_id: u32, k: usize) -> Result<Vec<TokenHit>> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached(
            "SELECT latent, max_act FROM token_index WHERE dict = ?1 AND token_id = ?2 \
             ORDER BY max_act DESC, latent LIMIT ?3",
        )?;
        let rows = st.query_map(params![dict, token_id, k as i64], |r| {
            Ok(TokenHit {
                latent: r.get(0)?,
                max_act: r.get::<_, f64>(1)? as f32,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Adds or replaces a dictionary's description.
    pub fn put_dict(&self, info: &DictInfo) -> Result<()> {
        self.conn()?.execute(
            "INSERT OR REPLACE INTO dictionaries (id, info) VALUES (?1, ?2)",
            params![info.id, serde_json::to_string(info)?],
        )?;
        Ok(())
    }

    /// Adds or replaces latents (in one transaction). Their token-index rows are replaced too.
    pub fn put_latents(&self, latents: &[LatentDashboard]) -> Result<()> {
        // Compress outside the lock.
        let blobs: Vec<Vec<u8>> = latents
            .iter()
            .map(|l| compress(&serde_json::to_vec(l)?))
            .collect::<Result<_>>()?;
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        {
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO latents (dict, latent, data) VALUES (?1, ?2, ?3)",
            )?;
            let mut clear =
                tx.prepare_cached("DELETE FROM token_index WHERE dict = ?1 AND latent = ?2")?;
            let mut index = tx.prepare_cached(
                "INSERT INTO token_index (dict, token_id, latent, max_act) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (dict, token_id, latent) DO UPDATE SET max_act = \
                 max(max_act, excluded.max_act)",
            )?;
            for (l, blob) in latents.iter().zip(&blobs) {
                put.execute(params![l.dict, l.latent, blob])?;
                clear.execute(params![l.dict, l.latent])?;
                for c in &l.top_contexts {
                    if let Some(&tok) = c.token_ids.get(c.peak) {
                        index.execute(params![l.dict, tok, l.latent, c.peak_act as f64])?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Ids of the latents of `dict` held, in order (for exports).
    pub fn latent_ids(&self, dict: &str) -> Result<Vec<u32>> {
        let conn = self.conn()?;
        let mut st = conn.prepare("SELECT latent FROM latents WHERE dict = ?1 ORDER BY latent")?;
        let rows = st.query_map([dict], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Removes a dictionary and its latents (before it is computed again).
    pub fn delete_dict(&self, dict: &str) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM token_index WHERE dict = ?1", [dict])?;
        tx.execute("DELETE FROM latents WHERE dict = ?1", [dict])?;
        tx.execute("DELETE FROM dictionaries WHERE id = ?1", [dict])?;
        tx.commit()?;
        Ok(())
    }
}
