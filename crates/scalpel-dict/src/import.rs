//! Importers for dictionaries saved by other tools, each producing a [`Sae`] in SAELens
//! orientation with a [`DictConfig`] naming TransformerLens hooks:
//!
//! - [`sparsify`]: EleutherAI sparsify (<https://github.com/EleutherAI/sparsify>),
//!   `<hookpoint>/cfg.json` + `sae.safetensors` (`sparsify/sparse_coder.py`).
//! - [`gemma_scope`]: Gemma Scope `params.npz` (a zip of `.npy` files).
//! - [`circuit_tracer`]: circuit-tracer transcoder sets (<https://github.com/safety-research/circuit-tracer>),
//!   `config.yaml` + per-layer safetensors (`circuit_tracer/transcoder/single_layer_transcoder.py`).
//!
//! Every tensor's shape is checked against the source's own orientation before it is converted, so
//! a transposed tensor is reported with the file and the tensor's name in that file.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use scalpel_core::HookPoint;
use serde_json::Value;

use crate::saelens::read_safetensors;
use crate::{Architecture, DictConfig, DictError, Result, Sae};

/// Reads a sparsify sparse coder from its hookpoint directory (`cfg.json`, `sae.safetensors`).
///
/// The directory name is the Hugging Face module path the coder was trained on and becomes the
/// hook (see [`hf_module_to_hook`]); pass `hook_name` to override it (e.g. for a directory that
/// was renamed). sparsify's TopK is `topk(relu((x - b_dec) @ encoder.weight^T + encoder.bias))`,
/// which is SAELens's `topk` architecture; a transcoder (`transcode: true`) reads `x` as is and
/// becomes a TopK dictionary with `apply_b_dec_to_input` false and a `hook_name_out`.
///
/// # Shapes
/// `encoder.weight [d_sae, d_in]` (becomes `W_enc [d_in, d_sae]`), `encoder.bias [d_sae]`,
/// `W_dec [d_sae, d_in]`, `b_dec [d_in]`.
pub fn sparsify(dir: &Path, hook_name: Option<&str>, device: &Device) -> Result<Sae> {
    let cfg_path = dir.join("cfg.json");
    let cfg_src = cfg_path.display().to_string();
    let text = read_text(&cfg_path)?;
    let cfg: Value =
        serde_json::from_str(&text).map_err(|e| config_err(&cfg_src, "(json)", e.to_string()))?;
    let get_usize = |field: &str| -> Result<Option<usize>> {
        match cfg.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                config_err(&cfg_src, field, format!("expected an integer, found {v}"))
            }),
        }
    };
    let get_bool = |field: &str| cfg.get(field).and_then(Value::as_bool).unwrap_or(false);
    let d_in = get_usize("d_in")?.ok_or_else(|| config_err(&cfg_src, "d_in", "missing".into()))?;
    // sparsify: `num_latents or d_in * expansion_factor` (defaults 0 and 32).
    let d_sae = match get_usize("num_latents")? {
        Some(n) if n > 0 => n,
        _ => d_in * get_usize("expansion_factor")?.unwrap_or(32),
    };
    let k = get_usize("k")?.unwrap_or(32);
    if let Some(act) = cfg.get("activation").and_then(Value::as_str) {
        if act != "topk" {
            return Err(config_err(
                &cfg_src,
                "activation",
                format!("`{act}` is not supported (only \"topk\")"),
            ));
        }
    }
    if get_bool("skip_connection") {
        return Err(config_err(
            &cfg_src,
            "skip_connection",
            "a TopK coder with a skip connection has no SAELens architecture".into(),
        ));
    }
    let transcode = get_bool("transcode");

    let weights_path = dir.join("sae.safetensors");
    let src = weights_path.display().to_string();
    let mut t = read_safetensors(&weights_path, device)?;
    let w_enc = take(&mut t, &src, "sparsify", "encoder.weight", &[d_sae, d_in])?.t()?; // [d_in, d_sae]
    let tensors = HashMap::from([
        ("W_enc".to_string(), w_enc.contiguous()?),
        (
            "b_enc".into(),
            take(&mut t, &src, "sparsify", "encoder.bias", &[d_sae])?,
        ),
        (
            "W_dec".into(),
            take(&mut t, &src, "sparsify", "W_dec", &[d_sae, d_in])?,
        ),
        (
            "b_dec".into(),
            take(&mut t, &src, "sparsify", "b_dec", &[d_in])?,
        ),
    ]);

    let module = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let (hook, hook_out) = match hook_name {
        Some(h) => (h.to_string(), None),
        None => {
            let out = hf_module_to_hook(module).ok_or_else(|| {
                config_err(
                    &cfg_src,
                    "hookpoint",
                    format!(
                        "directory name `{module}` is no Hugging Face module path scalpel knows \
                         (`layers.N`, `layers.N.mlp`, `layers.N.self_attn`); pass the hook name"
                    ),
                )
            })?;
            // A transcoder on a module reads that module's input.
            let input = if transcode {
                hf_module_input_hook(module)
            } else {
                None
            };
            match input {
                Some(i) => (i, Some(out)),
                None => (out, None),
            }
        }
    };
    let mut dc = DictConfig::new(Architecture::Topk, d_in, d_sae);
    dc.k = Some(k);
    dc.apply_b_dec_to_input = !transcode;
    dc.metadata.hook_name = Some(check_hook(&hook, "hook_name")?);
    if transcode {
        let out = hook_out.unwrap_or_else(|| hook.clone());
        dc.metadata.hook_name_out = Some(check_hook(&out, "hook_name_out")?);
    }
    dc.metadata
        .extra
        .insert("imported_from".into(), Value::from("sparsify"));
    dc.metadata
        .extra
        .insert("sparsify_hookpoint".into(), Value::from(module));
    Sae::from_tensors(dc, tensors, &src)
}

/// The TransformerLens hook for a Hugging Face module's output: `layers.10` (a block) is
/// `blocks.10.hook_resid_post`, `layers.10.mlp` is `blocks.10.hook_mlp_out`,
/// `layers.10.self_attn` (or `.attn`, `.attention`) is `blocks.10.hook_attn_out`. A model prefix
/// (`model.`, `gpt_neox.`, `transformer.h.`) is ignored.
pub fn hf_module_to_hook(module: &str) -> Option<String> {
    let (layer, rest) = hf_layer(module)?;
    let suffix = match rest {
        "" => "hook_resid_post",
        "mlp" => "hook_mlp_out",
        "self_attn" | "attn" | "attention" => "hook_attn_out",
        _ => return None,
    };
    Some(format!("blocks.{layer}.{suffix}"))
}

/// The hook a transcoder on `module` reads: an MLP's input (after `ln2`) is `blocks.N.hook_mlp_in`.
fn hf_module_input_hook(module: &str) -> Option<String> {
    match hf_layer(module)? {
        (layer, "mlp") => Some(format!("blocks.{layer}.hook_mlp_in")),
        _ => None,
    }
}

/// `(layer, rest)` of `[prefix.]layers.N[.rest]` or `[prefix.]h.N[.rest]`.
fn hf_layer(module: &str) -> Option<(usize, &str)> {
    let parts: Vec<&str> = module.split('.').collect();
    let i = parts
        .iter()
        .position(|p| *p == "layers" || *p == "h" || *p == "layer")?;
    let layer = parts.get(i + 1)?.parse().ok()?;
    let rest_start = parts[..i + 2].iter().map(|p| p.len() + 1).sum::<usize>();
    Some((layer, module.get(rest_start..).unwrap_or("")))
}

/// Reads a Gemma Scope `params.npz` (`W_enc [d_model, d_sae]`, `W_dec [d_sae, d_model]`,
/// `b_enc`, `b_dec`, `threshold`) as a JumpReLU dictionary at `hook_name` (the file does not say
/// where it applies). Gemma Scope encodes `x @ W_enc + b_enc` without subtracting `b_dec`, so
/// `apply_b_dec_to_input` is false. With `hook_name_out`, the file is a Gemma Scope transcoder
/// (`jumprelu_transcoder`, `W_dec [d_sae, d_out]`).
pub fn gemma_scope(
    path: &Path,
    hook_name: &str,
    hook_name_out: Option<&str>,
    device: &Device,
) -> Result<Sae> {
    let src = path.display().to_string();
    let mut t = read_npz(path, device)?;
    let enc_dims = t
        .get("W_enc")
        .map(|w| w.dims().to_vec())
        .ok_or_else(|| missing(&src, "W_enc", "Gemma Scope"))?;
    let [d_in, d_sae] = enc_dims[..] else {
        return Err(shape_err(
            &src,
            "W_enc",
            vec![0, 0],
            enc_dims,
            " (expected a matrix)",
        ));
    };
    let d_out = match t.get("b_dec") {
        Some(b) if hook_name_out.is_some() && b.rank() == 1 => b.dims()[0],
        _ => d_in,
    };
    let arch = if hook_name_out.is_some() {
        Architecture::JumpreluTranscoder
    } else {
        Architecture::Jumprelu
    };
    let mut dc = DictConfig::new(arch, d_in, d_sae);
    if arch.is_transcoder() {
        dc.d_out = Some(d_out);
    }
    dc.apply_b_dec_to_input = false;
    dc.metadata.hook_name = Some(check_hook(hook_name, "hook_name")?);
    if let Some(out) = hook_name_out {
        dc.metadata.hook_name_out = Some(check_hook(out, "hook_name_out")?);
    }
    dc.metadata
        .extra
        .insert("imported_from".into(), Value::from("gemma_scope"));
    let tensors = HashMap::from([
        (
            "W_enc".to_string(),
            take(&mut t, &src, "Gemma Scope", "W_enc", &[d_in, d_sae])?,
        ),
        (
            "b_enc".into(),
            take(&mut t, &src, "Gemma Scope", "b_enc", &[d_sae])?,
        ),
        (
            "W_dec".into(),
            take(&mut t, &src, "Gemma Scope", "W_dec", &[d_sae, d_out])?,
        ),
        (
            "b_dec".into(),
            take(&mut t, &src, "Gemma Scope", "b_dec", &[d_out])?,
        ),
        (
            "threshold".into(),
            take(&mut t, &src, "Gemma Scope", "threshold", &[d_sae])?,
        ),
    ]);
    Sae::from_tensors(dc, tensors, &src)
}

/// A circuit-tracer transcoder set's `config.yaml`: the keys scalpel reads.
#[derive(Debug, Clone, PartialEq)]
pub struct TranscoderSetConfig {
    pub model_name: Option<String>,
    /// `feature_input_hook`, relative to a block (`mlp.hook_in`, `hook_resid_mid`, ...).
    pub feature_input_hook: String,
    /// `feature_output_hook`, relative to a block (`hook_mlp_out`, `mlp.hook_out`).
    pub feature_output_hook: String,
    pub scan: Option<String>,
    /// `activation` (`relu`, `topk`; absent: from the weights, JumpReLU when a threshold is there).
    pub activation: Option<String>,
    pub k: Option<usize>,
    /// Per-layer files, layer 0 first, as written (relative to the config's directory).
    pub transcoders: Vec<String>,
}

impl TranscoderSetConfig {
    /// Parses the few keys of a circuit-tracer `config.yaml` (top-level `key: value` scalars and
    /// the `transcoders:` list, as `- path` items or `N: path` entries). `source` names the file.
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let mut scalars: HashMap<String, String> = HashMap::new();
        let mut files: Vec<(usize, String)> = Vec::new();
        let mut in_list = false;
        for (n, raw) in text.lines().enumerate() {
            let line = strip_comment(raw);
            if line.trim().is_empty() {
                continue;
            }
            let indented = line.starts_with(' ') || line.starts_with('\t');
            let line = line.trim();
            if in_list && (indented || line.starts_with("- ")) {
                let entry = if let Some(item) = line.strip_prefix('-') {
                    (files.len(), unquote(item))
                } else {
                    let (key, value) = line.split_once(':').ok_or_else(|| {
                        config_err(source, "transcoders", format!("line {}: `{line}`", n + 1))
                    })?;
                    let layer = unquote(key).parse().map_err(|_| {
                        config_err(source, "transcoders", format!("line {}: `{line}`", n + 1))
                    })?;
                    (layer, unquote(value))
                };
                files.push(entry);
                continue;
            }
            in_list = false;
            if indented {
                continue; // a nested mapping scalpel does not read
            }
            let Some((key, value)) = line.split_once(':') else {
                return Err(config_err(
                    source,
                    "(yaml)",
                    format!("line {}: `{line}`", n + 1),
                ));
            };
            let (key, value) = (key.trim(), unquote(value));
            if key == "transcoders" {
                if !value.is_empty() {
                    return Err(config_err(
                        source,
                        "transcoders",
                        "expected a block list of files".into(),
                    ));
                }
                in_list = true;
            } else {
                scalars.insert(key.to_string(), value);
            }
        }
        let kind = scalars.get("model_kind").map(String::as_str);
        if kind != Some("transcoder_set") {
            return Err(config_err(
                source,
                "model_kind",
                format!("{kind:?} is not \"transcoder_set\" (cross-layer transcoders are not supported)"),
            ));
        }
        let required = |key: &str| {
            scalars
                .get(key)
                .cloned()
                .ok_or_else(|| config_err(source, key, "missing".into()))
        };
        files.sort_by_key(|(l, _)| *l);
        for (i, (l, _)) in files.iter().enumerate() {
            if *l != i {
                return Err(config_err(
                    source,
                    "transcoders",
                    format!(
                        "layers must be 0..{} without gaps, found layer {l}",
                        files.len()
                    ),
                ));
            }
        }
        if files.is_empty() {
            return Err(config_err(source, "transcoders", "no files listed".into()));
        }
        let k = match scalars.get("k") {
            Some(k) => Some(
                k.parse()
                    .map_err(|_| config_err(source, "k", format!("`{k}` is not an integer")))?,
            ),
            None => None,
        };
        Ok(TranscoderSetConfig {
            model_name: scalars.get("model_name").cloned(),
            feature_input_hook: required("feature_input_hook")?,
            feature_output_hook: required("feature_output_hook")?,
            scan: scalars.get("scan").cloned(),
            activation: scalars.get("activation").cloned(),
            k,
            transcoders: files.into_iter().map(|(_, f)| f).collect(),
        })
    }
}

fn strip_comment(line: &str) -> &str {
    // A `#` starts a comment at the line start or after whitespace, outside quotes.
    let mut quote = None;
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if prev_space => return &line[..i],
            _ => {}
        }
        prev_space = c.is_whitespace();
    }
    line
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    let inner = s
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .or_else(|| s.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')));
    inner.unwrap_or(s).to_string()
}

/// The TransformerLens hook for a circuit-tracer block-relative hook at `layer`:
/// `mlp.hook_in` is `blocks.{layer}.hook_mlp_in` and `mlp.hook_out` is `blocks.{layer}.hook_mlp_out`
/// (circuit-tracer's replacement model adds these to the MLP); others (`hook_resid_mid`,
/// `ln2.hook_normalized`, `hook_mlp_out`) are TransformerLens names already.
pub fn circuit_tracer_hook(hook: &str, layer: usize) -> String {
    let suffix = match hook {
        "mlp.hook_in" => "hook_mlp_in",
        "mlp.hook_out" => "hook_mlp_out",
        other => other,
    };
    format!("blocks.{layer}.{suffix}")
}

/// Reads a circuit-tracer transcoder set from its `config.yaml`: one transcoder per layer, in
/// layer order. Files are resolved against the config's directory; an `hf://repo/file` entry is
/// looked for by its file name there.
///
/// circuit-tracer encodes `act(x @ W_enc^T + b_enc)` and decodes `f @ W_dec + b_dec
/// (+ x @ W_skip^T)`; a file with `activation_function.threshold` is a `jumprelu_transcoder`
/// (circuit-tracer's JumpReLU is `pre * (pre > threshold)`, equal to SAELens's
/// `relu(pre) * (pre > threshold)` for non-negative thresholds), one with `W_skip` a
/// `skip_transcoder`, otherwise a ReLU `transcoder`. `activation: topk` with `k` gives a TopK
/// dictionary with `apply_b_dec_to_input` false.
///
/// # Shapes
/// `W_enc [d_sae, d_model]` (becomes `W_enc [d_model, d_sae]`), `W_dec [d_sae, d_model]`,
/// `b_enc [d_sae]`, `b_dec [d_model]`, `activation_function.threshold [d_sae]`,
/// `W_skip [d_model, d_model]`.
pub fn circuit_tracer(config_path: &Path, device: &Device) -> Result<Vec<Sae>> {
    let cfg_src = config_path.display().to_string();
    let cfg = TranscoderSetConfig::parse(&read_text(config_path)?, &cfg_src)?;
    let dir = config_path.parent().unwrap_or(Path::new("."));
    let mut saes = Vec::with_capacity(cfg.transcoders.len());
    for (layer, file) in cfg.transcoders.iter().enumerate() {
        let path = match file.strip_prefix("hf://") {
            Some(uri) => dir.join(uri.rsplit('/').next().unwrap_or(uri)),
            None => dir.join(file),
        };
        saes.push(circuit_tracer_layer(&cfg, layer, &path, device)?);
    }
    Ok(saes)
}

fn circuit_tracer_layer(
    cfg: &TranscoderSetConfig,
    layer: usize,
    path: &Path,
    device: &Device,
) -> Result<Sae> {
    let src = path.display().to_string();
    let mut t = read_safetensors(path, device)?;
    let dims = |t: &HashMap<String, Tensor>, name: &str| {
        t.get(name)
            .map(|x| x.dims().to_vec())
            .ok_or_else(|| missing(&src, name, "circuit-tracer"))
    };
    // circuit-tracer itself reads the widths from the biases.
    let d_sae = match dims(&t, "b_enc")?[..] {
        [d] => d,
        ref found => return Err(shape_err(&src, "b_enc", vec![0], found.to_vec(), "")),
    };
    let d_model = match dims(&t, "b_dec")?[..] {
        [d] => d,
        ref found => return Err(shape_err(&src, "b_dec", vec![0], found.to_vec(), "")),
    };
    let threshold = t.contains_key("activation_function.threshold");
    let skip = t.contains_key("W_skip");
    let topk = cfg.activation.as_deref() == Some("topk");
    let arch = match (topk, threshold, skip) {
        (true, _, false) => Architecture::TopkTranscoder,
        (true, _, true) => Architecture::TopkSkipTranscoder,
        (false, true, false) => Architecture::JumpreluTranscoder,
        (false, true, true) => Architecture::JumpreluSkipTranscoder,
        (false, false, true) => Architecture::SkipTranscoder,
        (false, false, false) => Architecture::Transcoder,
    };
    let w_enc = take(&mut t, &src, "circuit-tracer", "W_enc", &[d_sae, d_model])?.t()?; // [d_model, d_sae]
    let mut tensors = HashMap::from([
        ("W_enc".to_string(), w_enc.contiguous()?),
        (
            "b_enc".into(),
            take(&mut t, &src, "circuit-tracer", "b_enc", &[d_sae])?,
        ),
        (
            "W_dec".into(),
            take(&mut t, &src, "circuit-tracer", "W_dec", &[d_sae, d_model])?,
        ),
        (
            "b_dec".into(),
            take(&mut t, &src, "circuit-tracer", "b_dec", &[d_model])?,
        ),
    ]);
    if threshold {
        let thr = take(
            &mut t,
            &src,
            "circuit-tracer",
            "activation_function.threshold",
            &[d_sae],
        )?;
        tensors.insert("threshold".into(), thr);
    }
    if skip {
        let w = take(
            &mut t,
            &src,
            "circuit-tracer",
            "W_skip",
            &[d_model, d_model],
        )?;
        tensors.insert("W_skip".into(), w);
    }
    let mut dc = DictConfig::new(arch, d_model, d_sae);
    if arch.is_topk() {
        let k = cfg
            .k
            .ok_or_else(|| config_err(&src, "k", "required by `activation: topk`".into()))?;
        dc.k = Some(k);
    }
    dc.d_out = Some(d_model);
    dc.apply_b_dec_to_input = false;
    let hook_in = circuit_tracer_hook(&cfg.feature_input_hook, layer);
    let hook_out = circuit_tracer_hook(&cfg.feature_output_hook, layer);
    dc.metadata.hook_name = Some(check_hook(&hook_in, "feature_input_hook")?);
    dc.metadata.hook_name_out = Some(check_hook(&hook_out, "feature_output_hook")?);
    dc.metadata.model_name = cfg.model_name.clone();
    let extra = &mut dc.metadata.extra;
    extra.insert("imported_from".into(), Value::from("circuit_tracer"));
    if let Some(scan) = &cfg.scan {
        extra.insert("scan".into(), Value::from(scan.as_str()));
    }
    Sae::from_tensors(dc, tensors, &src)
}

/// Reads every array of an `.npz` (a zip of `.npy` files; stored or deflated) by its name
/// without the `.npy` suffix.
pub fn read_npz(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let src = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| DictError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| npy_err(path, "(zip)", e.to_string()))?;
    let mut out = HashMap::new();
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| npy_err(path, "(zip)", e.to_string()))?;
        let name = entry.name().trim_end_matches(".npy").to_string();
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| npy_err(path, &name, e.to_string()))?;
        let t = parse_npy(&bytes, device).map_err(|reason| npy_err(path, &name, reason))?;
        out.insert(name, t);
    }
    tracing::debug!("{src}: read {} arrays", out.len());
    Ok(out)
}

/// Parses one `.npy` (format 1.0–3.0): little-endian `f2`, `f4` or `f8`, C order.
pub fn parse_npy(bytes: &[u8], device: &Device) -> std::result::Result<Tensor, String> {
    let rest = bytes
        .strip_prefix(b"\x93NUMPY")
        .ok_or("not an .npy array (no \\x93NUMPY magic)")?;
    let (major, rest) = rest.split_first().ok_or("truncated header")?;
    let rest = rest.get(1..).ok_or("truncated header")?;
    let (len, rest) = match major {
        1 => {
            let b = rest.get(..2).ok_or("truncated header")?;
            (u16::from_le_bytes([b[0], b[1]]) as usize, &rest[2..])
        }
        2 | 3 => {
            let b = rest.get(..4).ok_or("truncated header")?;
            (
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
                &rest[4..],
            )
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = rest.get(..len).ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let data = &rest[len..];
    let descr = header_value(header, "descr")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let dtype = match descr {
        "<f4" => DType::F32,
        "<f2" => DType::F16,
        "<f8" => DType::F64,
        d => {
            return Err(format!(
                "dtype `{d}` is not supported (expected '<f4', '<f2' or '<f8')"
            ))
        }
    };
    if header_value(header, "fortran_order")? != "False" {
        return Err("fortran_order arrays are not supported".into());
    }
    let shape_text = header_value(header, "shape")?;
    let shape: Vec<usize> = shape_text
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| format!("bad shape `{shape_text}`")))
        .collect::<std::result::Result<_, _>>()?;
    let want = shape.iter().product::<usize>() * dtype.size_in_bytes();
    if data.len() != want {
        return Err(format!(
            "{} data bytes for shape {shape:?} of `{descr}`, expected {want}",
            data.len()
        ));
    }
    Tensor::from_raw_buffer(data, dtype, &shape, device).map_err(|e| e.to_string())
}

/// The text of `key`'s value in a numpy header dict `{'descr': '<f4', 'fortran_order': False,
/// 'shape': (16, 32), }`.
fn header_value<'a>(header: &'a str, key: &str) -> std::result::Result<&'a str, String> {
    let pat = format!("'{key}':");
    let start = header
        .find(&pat)
        .map(|i| i + pat.len())
        .ok_or_else(|| format!("header has no `{key}`: {}", header.trim()))?;
    let rest = header[start..].trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')').map(|i| i + 1)
    } else {
        rest.find([',', '}'])
    }
    .ok_or_else(|| format!("header value of `{key}` is unterminated: {}", header.trim()))?;
    Ok(rest[..end].trim())
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| DictError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Removes `name` from `t` (a file of `kind`), checking its shape in the source's orientation.
fn take(
    t: &mut HashMap<String, Tensor>,
    src: &str,
    kind: &str,
    name: &str,
    shape: &[usize],
) -> Result<Tensor> {
    let x = t.remove(name).ok_or_else(|| missing(src, name, kind))?;
    if x.dims() != shape {
        let transposed = shape.len() == 2 && x.dims() == [shape[1], shape[0]];
        return Err(shape_err(
            src,
            name,
            shape.to_vec(),
            x.dims().to_vec(),
            if transposed {
                " (transposed? the expected shape is this format's own orientation)"
            } else {
                ""
            },
        ));
    }
    Ok(x.to_dtype(DType::F32)?)
}

/// `kind` is the source format, named in "needed by a {kind} dictionary".
fn missing(src: &str, tensor: &str, kind: &str) -> DictError {
    DictError::MissingTensor {
        source_name: src.to_string(),
        tensor: tensor.to_string(),
        architecture: kind.to_string(),
    }
}

fn shape_err(
    src: &str,
    tensor: &str,
    expected: Vec<usize>,
    found: Vec<usize>,
    hint: &'static str,
) -> DictError {
    DictError::Shape {
        source_name: src.to_string(),
        tensor: tensor.to_string(),
        expected,
        found,
        hint,
    }
}

fn config_err(src: &str, field: &str, reason: String) -> DictError {
    DictError::Config {
        source_name: src.to_string(),
        field: field.to_string(),
        reason,
    }
}

fn npy_err(path: &Path, array: &str, reason: String) -> DictError {
    DictError::Safetensors {
        path: PathBuf::from(format!("{}:{array}", path.display())),
        reason,
    }
}

/// Checks that `name` is a hook point scalpel knows, returning its canonical name.
fn check_hook(name: &str, field: &'static str) -> Result<String> {
    HookPoint::parse(name)
        .map(|h| h.to_string())
        .map_err(|e| DictError::Hook {
            field,
            source: Box::new(e),
        })
}
