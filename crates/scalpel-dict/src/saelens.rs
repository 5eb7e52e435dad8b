//! SAELens's directory format:
//!
//! ```text
//! <dir>/cfg.json                  the config (6.x written; 6.x and pre-6 read)
//! <dir>/sae_weights.safetensors   W_enc, b_enc, W_dec, b_dec, ... (SAELens orientation)
//! <dir>/sparsity.safetensors      optional: {"sparsity": log10 feature density [d_sae]}
//! ```
//!
//! Writes go through a temporary file and a rename, so a reader never sees half a file.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use scalpel_models::files::{write_atomically, TempPath};

use crate::{DictConfig, DictError, Result, Sae};

/// The config file name.
pub const CFG_FILENAME: &str = "cfg.json";
/// The weights file name.
pub const WEIGHTS_FILENAME: &str = "sae_weights.safetensors";
/// The optional feature-density file name.
pub const SPARSITY_FILENAME: &str = "sparsity.safetensors";

/// Reads the dictionary in `dir` onto `device`, checking every tensor's shape against the config.
pub fn load(dir: &Path, device: &Device) -> Result<Sae> {
    let cfg_path = dir.join(CFG_FILENAME);
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| DictError::Io {
        path: cfg_path.clone(),
        source,
    })?;
    let cfg = DictConfig::from_json(&text, &cfg_path.display().to_string())?;
    let weights_path = dir.join(WEIGHTS_FILENAME);
    let tensors = read_safetensors(&weights_path, device)?;
    let mut sae = Sae::from_tensors(cfg, tensors, &weights_path.display().to_string())?;
    let sparsity_path = dir.join(SPARSITY_FILENAME);
    if sparsity_path.exists() {
        let mut t = read_safetensors(&sparsity_path, device)?;
        let source = sparsity_path.display().to_string();
        let s = t
            .remove("sparsity")
            .ok_or_else(|| DictError::MissingTensor {
                source_name: source.clone(),
                tensor: "sparsity".into(),
                architecture: sae.cfg.architecture.name().into(),
            })?;
        if s.dims() != [sae.cfg.d_sae] {
            return Err(DictError::Shape {
                source_name: source,
                tensor: "sparsity".into(),
                expected: vec![sae.cfg.d_sae],
                found: s.dims().to_vec(),
                hint: "",
            });
        }
        sae.sparsity = Some(s.to_dtype(DType::F32)?);
    }
    tracing::debug!(
        "loaded {} dictionary d_in {} d_sae {} from {}",
        sae.cfg.architecture.name(),
        sae.cfg.d_in,
        sae.cfg.d_sae,
        dir.display()
    );
    Ok(sae)
}

/// Writes `sae` into `dir` (created if needed) in SAELens 6.x form; `load` reads it back
/// bit-exactly. Weights are written as f32.
pub fn save(sae: &Sae, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| DictError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let weights: HashMap<String, Tensor> = sae
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    write_safetensors(&weights, &dir.join(WEIGHTS_FILENAME))?;
    if let Some(s) = &sae.sparsity {
        let map = HashMap::from([("sparsity".to_string(), s.clone())]);
        write_safetensors(&map, &dir.join(SPARSITY_FILENAME))?;
    }
    let body = sae.cfg.to_json();
    write_atomically(&dir.join(CFG_FILENAME), |w| w.write_all(body.as_bytes()))
        .map_err(|(path, source)| DictError::Io { path, source })
}

/// All tensors of a safetensors file; a missing or unreadable file is named.
pub(crate) fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(DictError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
        });
    }
    candle_core::safetensors::load(path, device).map_err(|e| DictError::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

pub(crate) fn write_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = TempPath::beside(path);
    candle_core::safetensors::save(tensors, tmp.path()).map_err(|e| DictError::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    tmp.persist(path).map_err(|source| DictError::Io {
        path: path.to_path_buf(),
        source,
    })
}
