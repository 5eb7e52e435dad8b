//! Training checkpoints: parameters, AdamW moments, the step count and the run's own metadata in
//! one safetensors file, written atomically so an interrupted save never leaves a torn file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use scalpel_models::files::TempPath;

use crate::optim::AdamW;
use crate::{Result, ToyError};

const META_KEY: &str = "scalpel_toy";
const STEP_KEY: &str = "adam_t";

fn file_err(path: &Path, msg: impl std::fmt::Display) -> ToyError {
    ToyError::File {
        path: path.display().to_string(),
        msg: msg.to_string(),
    }
}

/// Resumes a run from the newest `checkpoint-*.safetensors` in `dir`, if any: checks that it was
/// made with `cfg` (`extend` copies the run's length from `cfg` into the saved config, the one
/// setting that may change), restores the optimiser and returns the step and the saved
/// evaluation points.
pub fn resume<C, P>(
    dir: &Path,
    cfg: &C,
    extend: impl Fn(C) -> C,
    opt: &mut AdamW,
) -> Result<Option<(usize, Vec<P>)>>
where
    C: serde::de::DeserializeOwned + PartialEq,
    P: serde::de::DeserializeOwned,
{
    let Some((step, path)) = list(dir)?.pop() else {
        return Ok(None);
    };
    let ck = load(&path)?;
    let unreadable =
        |what: &str, e: serde_json::Error| file_err(&path, format!("no readable {what}: {e}"));
    let saved: C =
        serde_json::from_value(ck.meta["config"].clone()).map_err(|e| unreadable("config", e))?;
    if &extend(saved) != cfg {
        return Err(ToyError::Config(format!(
            "{} holds checkpoints of a different configuration; use a new folder or the same settings",
            dir.display()
        )));
    }
    ck.restore(opt)?;
    let points = serde_json::from_value(ck.meta["points"].clone())
        .map_err(|e| unreadable("evaluation points", e))?;
    Ok(Some((step, points)))
}

/// The `checkpoint-{step}.safetensors` files in `dir`, by step (none when `dir` does not exist).
pub fn list(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(file_err(dir, e)),
    };
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.strip_suffix(".safetensors"))
            .and_then(|s| s.parse::<usize>().ok())
        {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Checks that checkpoints fall on evaluation steps (`checkpoint_every` a multiple of
/// `eval_every`), so each checkpoint carries the evaluation of its own step.
pub fn check_cadence(eval_every: usize, checkpoint_every: usize) -> Result<()> {
    if eval_every == 0 || !checkpoint_every.is_multiple_of(eval_every) {
        return Err(ToyError::Config(format!(
            "checkpoint_every ({checkpoint_every}) must be a multiple of eval_every ({eval_every})"
        )));
    }
    Ok(())
}

/// Writes the optimiser's parameters and moments with `meta` (any JSON: the config, the step,
/// metrics) to `path`.
pub fn save(path: &Path, opt: &AdamW, meta: &serde_json::Value) -> Result<()> {
    let state = opt.state()?;
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = state
        .iter()
        .map(|(k, t)| -> Result<_> {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Ok((k.clone(), bytes, t.dims().to_vec()))
        })
        .collect::<Result<_>>()?;
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(k, b, s)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| file_err(path, e))
        })
        .collect::<Result<_>>()?;
    let mut md = HashMap::new();
    md.insert(META_KEY.to_string(), meta.to_string());
    md.insert(STEP_KEY.to_string(), opt.t().to_string());
    let bytes = safetensors::serialize(views, &Some(md)).map_err(|e| file_err(path, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    }
    let tmp = TempPath::beside(path);
    std::fs::write(tmp.path(), &bytes).map_err(|e| file_err(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| file_err(path, e))
}

/// A checkpoint read back: named tensors, the optimiser's step count and the metadata.
pub struct Checkpoint {
    pub tensors: HashMap<String, Tensor>,
    pub t: u64,
    pub meta: serde_json::Value,
}

impl Checkpoint {
    /// Puts the saved parameters and moments back into `opt`.
    pub fn restore(&self, opt: &mut AdamW) -> Result<()> {
        opt.restore(&self.tensors, self.t)
    }

    /// The parameters alone (moments dropped), for analysis.
    pub fn params(&self) -> HashMap<String, Tensor> {
        self.tensors
            .iter()
            .filter(|(k, _)| !k.ends_with(".adam_m") && !k.ends_with(".adam_v"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Reads a checkpoint written by [`save`]; a torn or foreign file is an error naming it.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
    let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| file_err(path, e))?;
    let md = md.metadata().clone().unwrap_or_default();
    let meta_text = md
        .get(META_KEY)
        .ok_or_else(|| file_err(path, "not a scalpel toy checkpoint (no metadata)"))?;
    let meta: serde_json::Value = serde_json::from_str(meta_text).map_err(|e| file_err(path, e))?;
    let t = md
        .get(STEP_KEY)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| file_err(path, "checkpoint has no step count"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| file_err(path, e))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(file_err(path, format!("tensor {name} is not f32")));
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        tensors.insert(name, Tensor::from_vec(data, view.shape(), &Device::Cpu)?);
    }
    Ok(Checkpoint { tensors, t, meta })
}
