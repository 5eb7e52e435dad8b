//! A run's checkpoint: `<out>/checkpoints/` holds `state.json` (the config, the data position,
//! the normalisation factors and `b_dec`'s initial values) and one trainer checkpoint plus the
//! training log per dictionary. It is written whole into a temporary directory and renamed into
//! place, so a kill at any point leaves the previous checkpoint or the new one.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::{config_err, RunConfig};
use super::data::Position;
use super::LogRow;
use crate::train::Trainer;
use crate::{DictError, Result};

const DIR: &str = "checkpoints";
/// Where the previous checkpoint waits while the new one is renamed into place.
const OLD: &str = "checkpoints.old";
const STATE: &str = "state.json";
const LOG: &str = "training_log.jsonl";
/// Bumped when the layout changes.
pub(super) const FORMAT: u32 = 1;

/// Everything but the trainers.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct State {
    pub format: u32,
    pub config: RunConfig,
    pub position: Position,
    /// Per hook: the factor batches are multiplied by (absent: 1).
    pub norm_factors: BTreeMap<String, f32>,
    /// Per dictionary: `b_dec` at the start of training.
    pub b_dec_init: BTreeMap<String, Vec<f32>>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DictError + '_ {
    move |source| DictError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The last complete checkpoint under `out`, if any (`checkpoints.old` when a kill came between
/// the two renames).
pub fn find(out: &Path) -> Option<PathBuf> {
    [DIR, OLD]
        .iter()
        .map(|d| out.join(d))
        .find(|p| p.join(STATE).is_file())
}

/// Writes a checkpoint of `trainers` (named as `names`) and their logs.
pub fn save(
    out: &Path,
    state: &State,
    names: &[String],
    trainers: &[Trainer],
    logs: &[Vec<LogRow>],
) -> Result<()> {
    let tmp = out.join(format!("checkpoints.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    for ((name, trainer), log) in names.iter().zip(trainers).zip(logs) {
        let dir = tmp.join(name);
        trainer.save_checkpoint(&dir)?;
        let path = dir.join(LOG);
        fs::write(&path, log_jsonl(log)).map_err(io(&path))?;
    }
    let body =
        serde_json::to_string_pretty(state).map_err(|e| config_err("(state)", e.to_string()))?;
    let path = tmp.join(STATE);
    fs::write(&path, body).map_err(io(&path))?;
    let (dir, old) = (out.join(DIR), out.join(OLD));
    if old.exists() && dir.exists() {
        fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    if dir.exists() {
        fs::rename(&dir, &old).map_err(io(&dir))?;
    }
    fs::rename(&tmp, &dir).map_err(io(&tmp))?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(())
}

/// Reads the checkpoint in `dir`: the state (refused when written by a config other than `now`),
/// then each dictionary's trainer and log.
pub fn load(
    dir: &Path,
    names: &[String],
    now: &RunConfig,
) -> Result<(State, Vec<Trainer>, Vec<Vec<LogRow>>)> {
    let path = dir.join(STATE);
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    let state: State = serde_json::from_str(&text).map_err(|e| DictError::Config {
        source_name: path.display().to_string(),
        field: "(json)".into(),
        reason: e.to_string(),
    })?;
    if state.format != FORMAT {
        return Err(DictError::Config {
            source_name: path.display().to_string(),
            field: "format".into(),
            reason: format!(
                "checkpoint format {}, this scalpel reads {FORMAT}",
                state.format
            ),
        });
    }
    check_same_config(&state.config, now, dir)?;
    let mut trainers = Vec::with_capacity(names.len());
    let mut logs = Vec::with_capacity(names.len());
    for name in names {
        trainers.push(Trainer::load_checkpoint(&dir.join(name))?);
        let path = dir.join(name).join(LOG);
        let text = fs::read_to_string(&path).map_err(io(&path))?;
        let rows = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<std::result::Result<Vec<LogRow>, _>>()
            .map_err(|e| DictError::Config {
                source_name: path.display().to_string(),
                field: "(json)".into(),
                reason: e.to_string(),
            })?;
        logs.push(rows);
    }
    Ok((state, trainers, logs))
}

/// The log as JSON lines.
pub fn log_jsonl(rows: &[LogRow]) -> String {
    rows.iter()
        .filter_map(|r| serde_json::to_string(r).ok())
        .map(|l| l + "\n")
        .collect()
}

/// The config fields whose change makes a checkpoint unusable: everything but where the output
/// goes and how often the run reports or checkpoints.
fn identity(cfg: &RunConfig) -> Result<serde_json::Map<String, Value>> {
    let Value::Object(mut map) =
        serde_json::to_value(cfg).map_err(|e| config_err("(config)", e.to_string()))?
    else {
        return Err(config_err("(config)", "not an object"));
    };
    for key in ["out", "checkpoint_every_tokens", "log_every_steps"] {
        map.remove(key);
    }
    Ok(map)
}

/// Refuses to resume a checkpoint written by a different config, naming the first field that
/// differs.
pub fn check_same_config(saved: &RunConfig, now: &RunConfig, dir: &Path) -> Result<()> {
    let (a, b) = (identity(saved)?, identity(now)?);
    if let Some(key) = b.keys().chain(a.keys()).find(|k| a.get(*k) != b.get(*k)) {
        let show = |m: &serde_json::Map<String, Value>| {
            m.get(key).map_or("(absent)".to_string(), Value::to_string)
        };
        return Err(config_err(
            key.clone(),
            format!(
                "{} holds a checkpoint of a different run ({key} was {}, is now {}); use \
                 another `out` or delete it",
                dir.display(),
                show(&a),
                show(&b)
            ),
        ));
    }
    Ok(())
}
