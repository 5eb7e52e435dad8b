//! The SAELens `cfg.json`: read in its 6.x nested form and in the flat pre-6 form (as SAELens's
//! own `handle_pre_6_0_config` does), always written in the 6.x form.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{DictError, Result};

/// The dictionary architecture (SAELens's `architecture` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// ReLU encoder.
    Standard,
    /// Keeps the `k` largest ReLU pre-activations.
    Topk,
    /// `relu(pre) * (pre > threshold)`.
    Jumprelu,
    /// A gate path (`W_enc`, `b_gate`) times a magnitude path (`W_enc * exp(r_mag)`, `b_mag`).
    Gated,
    /// Reads `hook_name` (`d_in`), writes `hook_name_out` (`d_out`).
    Transcoder,
    /// A transcoder plus a linear skip `x @ W_skip^T`.
    SkipTranscoder,
    /// A transcoder with a JumpReLU encoder.
    JumpreluTranscoder,
    /// A JumpReLU transcoder plus a linear skip.
    JumpreluSkipTranscoder,
    /// A transcoder with a TopK encoder (scalpel's name: SAELens 6.54 has no TopK transcoder).
    TopkTranscoder,
    /// A TopK transcoder plus a linear skip (scalpel's name, as `topk_transcoder`).
    TopkSkipTranscoder,
}

impl Architecture {
    const ALL: [(&'static str, Architecture); 10] = [
        ("standard", Architecture::Standard),
        ("topk", Architecture::Topk),
        ("jumprelu", Architecture::Jumprelu),
        ("gated", Architecture::Gated),
        ("transcoder", Architecture::Transcoder),
        ("skip_transcoder", Architecture::SkipTranscoder),
        ("jumprelu_transcoder", Architecture::JumpreluTranscoder),
        (
            "jumprelu_skip_transcoder",
            Architecture::JumpreluSkipTranscoder,
        ),
        ("topk_transcoder", Architecture::TopkTranscoder),
        ("topk_skip_transcoder", Architecture::TopkSkipTranscoder),
    ];

    /// The SAELens name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, a)| *a == self)
            .map_or("?", |(n, _)| n)
    }

    /// True for architectures whose output lives at a different hook (and width) than the input.
    pub fn is_transcoder(self) -> bool {
        matches!(
            self,
            Architecture::Transcoder
                | Architecture::SkipTranscoder
                | Architecture::JumpreluTranscoder
                | Architecture::JumpreluSkipTranscoder
                | Architecture::TopkTranscoder
                | Architecture::TopkSkipTranscoder
        )
    }

    /// True for the TopK encoders (which need `k`).
    pub fn is_topk(self) -> bool {
        matches!(
            self,
            Architecture::Topk | Architecture::TopkTranscoder | Architecture::TopkSkipTranscoder
        )
    }

    /// True for the JumpReLU encoders (which have a `threshold`).
    pub fn is_jumprelu(self) -> bool {
        matches!(
            self,
            Architecture::Jumprelu
                | Architecture::JumpreluTranscoder
                | Architecture::JumpreluSkipTranscoder
        )
    }

    /// True for transcoders with a linear skip `x @ W_skip^T`.
    pub fn has_skip(self) -> bool {
        matches!(
            self,
            Architecture::SkipTranscoder
                | Architecture::JumpreluSkipTranscoder
                | Architecture::TopkSkipTranscoder
        )
    }
}

/// How inputs are normalised before encoding (SAELens's `normalize_activations`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormalizeActivations {
    #[default]
    None,
    /// Anthropic's "E‖x‖ = √d_in" scaling. SAELens applies nothing at run time: its
    /// `from_pretrained` folds the release's `norm_scaling_factor` (kept in SAELens's registry, not
    /// in the files) into `W_enc`, `W_dec`, `b_dec`. Scalpel does the same: nothing at run time.
    ExpectedAverageOnlyIn,
    /// Each input row is scaled to norm √d_in, and the output scaled back.
    ConstantNormRescale,
    /// Each input row is standardised (mean 0, unbiased std 1, eps 1e-5 on the std), and the
    /// output de-standardised.
    LayerNorm,
}

/// SAELens's `metadata`: how the dictionary was trained and where it applies. Unknown keys are
/// kept and written back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_class_name: Option<String>,
    /// The hook the dictionary reads (TransformerLens name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_name: Option<String>,
    /// The hook a transcoder writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_name_out: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_head_index: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepend_bos: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seqpos_slice: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_special_tokens: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_from_pretrained_kwargs: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neuronpedia_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sae_lens_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sae_lens_training_version: Option<String>,
    /// Every other key, kept as written.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// A dictionary's config, mirroring SAELens 6.x `cfg.json` (field names and defaults from
/// `sae_lens.saes.sae.SAEConfig` and its subclasses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DictConfig {
    pub architecture: Architecture,
    pub d_in: usize,
    pub d_sae: usize,
    /// Output width of a transcoder (absent otherwise: the output width is `d_in`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d_out: Option<usize>,
    /// TopK only: features kept per row (SAELens default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k: Option<usize>,
    /// TopK only: rank `pre · ‖W_dec row‖` instead of `pre` (SAELens default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rescale_acts_by_decoder_norm: Option<bool>,
    #[serde(default = "default_dtype")]
    pub dtype: String,
    #[serde(default = "default_device")]
    pub device: String,
    /// Subtract `b_dec` from the input before encoding (never for transcoders).
    #[serde(default = "default_true")]
    pub apply_b_dec_to_input: bool,
    #[serde(default)]
    pub normalize_activations: NormalizeActivations,
    /// "none" or "hook_z" (the SAE reads `[.., n_heads, d_head]` flattened).
    #[serde(default = "default_none")]
    pub reshape_activations: String,
    #[serde(default)]
    pub metadata: Metadata,
}

fn default_dtype() -> String {
    "float32".into()
}
fn default_device() -> String {
    "cpu".into()
}
fn default_none() -> String {
    "none".into()
}
fn default_true() -> bool {
    true
}

impl DictConfig {
    /// A config with SAELens's defaults for `architecture`.
    pub fn new(architecture: Architecture, d_in: usize, d_sae: usize) -> Self {
        DictConfig {
            architecture,
            d_in,
            d_sae,
            d_out: architecture.is_transcoder().then_some(d_in),
            k: architecture.is_topk().then_some(100),
            rescale_acts_by_decoder_norm: (architecture == Architecture::Topk).then_some(false),
            dtype: default_dtype(),
            device: default_device(),
            apply_b_dec_to_input: !architecture.is_transcoder(),
            normalize_activations: NormalizeActivations::None,
            reshape_activations: default_none(),
            metadata: Metadata {
                sae_lens_version: Some(FORMAT_VERSION.into()),
                ..Metadata::default()
            },
        }
    }

    /// Output width: `d_out` for transcoders, `d_in` otherwise.
    pub fn d_out(&self) -> usize {
        self.d_out.unwrap_or(self.d_in)
    }

    /// TopK's `k` (SAELens default 100).
    pub fn k(&self) -> usize {
        self.k.unwrap_or(100)
    }

    /// Parses a `cfg.json` body, 6.x or pre-6; `source` names the file in errors.
    pub fn from_json(text: &str, source: &str) -> Result<Self> {
        let err = |field: &str, reason: String| DictError::Config {
            source_name: source.to_string(),
            field: field.to_string(),
            reason,
        };
        let value: Value = serde_json::from_str(text).map_err(|e| err("(json)", e.to_string()))?;
        let Value::Object(mut map) = value else {
            return Err(err("(json)", "expected a JSON object".into()));
        };
        let version = map
            .get("sae_lens_version")
            .or_else(|| map.get("metadata").and_then(|m| m.get("sae_lens_version")))
            .and_then(Value::as_str)
            .map(str::to_string);
        let major = version
            .as_deref()
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse::<u64>().ok());
        if major.is_none_or(|m| m < 6) {
            pre_6_to_6(&mut map);
        }
        let arch = match map.get("architecture") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(err(
                    "architecture",
                    format!("expected a string, found {other}"),
                ))
            }
            None => "standard".into(),
        };
        let Some(&(_, architecture)) = Architecture::ALL.iter().find(|(n, _)| *n == arch) else {
            return Err(DictError::UnknownArchitecture {
                source_name: source.to_string(),
                found: arch,
            });
        };
        if architecture.is_transcoder() && !map.contains_key("apply_b_dec_to_input") {
            map.insert("apply_b_dec_to_input".into(), Value::Bool(false));
        }
        if architecture.is_topk() {
            map.entry("k").or_insert(Value::from(100));
            map.entry("rescale_acts_by_decoder_norm")
                .or_insert(Value::Bool(false));
        } else {
            // SAELens ignores fields of other architectures; so do we.
            map.remove("k");
            map.remove("rescale_acts_by_decoder_norm");
        }
        if !architecture.is_transcoder() {
            map.remove("d_out");
        }
        // Name the field for the errors serde reports without one.
        for (field, known) in [
            ("normalize_activations", &NORMALIZATIONS[..]),
            ("reshape_activations", &["none", "hook_z"][..]),
        ] {
            if let Some(v) = map.get(field) {
                if !v.as_str().is_some_and(|s| known.contains(&s)) {
                    return Err(err(field, format!("{v} is not one of {known:?}")));
                }
            }
        }
        let cfg: DictConfig = serde_json::from_value(Value::Object(map)).map_err(|e| {
            let msg = e.to_string();
            let field = match msg.strip_prefix("missing field `") {
                Some(rest) => rest.split('`').next().unwrap_or("(config)").to_string(),
                None => "(config)".to_string(),
            };
            err(&field, msg)
        })?;
        cfg.validate(source)?;
        Ok(cfg)
    }

    /// The 6.x `cfg.json` body.
    pub fn to_json(&self) -> String {
        // Serialising plain data into a string cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks the values the architecture needs.
    pub fn validate(&self, source: &str) -> Result<()> {
        let err = |field: &str, reason: String| DictError::Config {
            source_name: source.to_string(),
            field: field.to_string(),
            reason,
        };
        if self.d_in == 0 || self.d_sae == 0 {
            return Err(err(
                "d_in",
                format!(
                    "d_in {} and d_sae {} must be positive",
                    self.d_in, self.d_sae
                ),
            ));
        }
        if self.architecture.is_topk() {
            let k = self.k();
            if k == 0 || k > self.d_sae {
                return Err(err(
                    "k",
                    format!("k = {k} must be in 1..={} (d_sae)", self.d_sae),
                ));
            }
        }
        if self.architecture.is_transcoder() {
            if self.apply_b_dec_to_input {
                return Err(err(
                    "apply_b_dec_to_input",
                    "not supported for transcoders (b_dec has width d_out)".into(),
                ));
            }
            if self.d_out.is_none() {
                return Err(err("d_out", "required for transcoders".into()));
            }
        }
        if self.reshape_activations != "none" && self.reshape_activations != "hook_z" {
            return Err(err(
                "reshape_activations",
                format!(
                    "`{}` is neither \"none\" nor \"hook_z\"",
                    self.reshape_activations
                ),
            ));
        }
        Ok(())
    }
}

/// The values of `normalize_activations` scalpel applies (SAELens 6.54 also has
/// "covariance_whitening", folded into the weights on training and not supported here).
const NORMALIZATIONS: [&str; 4] = [
    "none",
    "expected_average_only_in",
    "constant_norm_rescale",
    "layer_norm",
];

/// The `sae_lens_version` scalpel gives a config it converted from pre-6 or created itself: the
/// oldest 6.x, so that SAELens (which picks the reader by this field) reads the 6.x form.
pub const FORMAT_VERSION: &str = "6.0.0";

/// The keys SAELens moves into `metadata` (its `LLM_METADATA_KEYS`).
const METADATA_KEYS: [&str; 17] = [
    "model_name",
    "hook_name",
    "model_class_name",
    "hook_head_index",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
    "context_size",
    "seqpos_slice",
    "dataset_path",
    "sae_lens_version",
    "sae_lens_training_version",
    "hook_name_out",
    "hook_head_index_out",
    "hf_hook_name",
    "hf_hook_name_out",
];

/// SAELens's `handle_pre_6_0_config`: renames, defaults, topk detection, boolean
/// `normalize_activations`, and the metadata split.
fn pre_6_to_6(map: &mut serde_json::Map<String, Value>) {
    for (old, new) in [
        ("hook_point", "hook_name"),
        ("hook_point_head_index", "hook_head_index"),
        ("activation_fn_str", "activation_fn"),
    ] {
        if let Some(v) = map.remove(old) {
            map.insert(new.into(), v);
        }
    }
    map.entry("prepend_bos").or_insert(Value::Bool(true));
    map.entry("apply_b_dec_to_input")
        .or_insert(Value::Bool(true));
    map.entry("architecture").or_insert(Value::from("standard"));
    if !map.contains_key("reshape_activations") {
        let z = map
            .get("hook_name")
            .and_then(Value::as_str)
            .is_some_and(|h| h.contains("hook_z"));
        map.insert(
            "reshape_activations".into(),
            Value::from(if z { "hook_z" } else { "none" }),
        );
    }
    let k = map
        .get("activation_fn_kwargs")
        .and_then(|kw| kw.get("k"))
        .filter(|k| !k.is_null())
        .cloned();
    if map.get("activation_fn").and_then(Value::as_str) == Some("topk") {
        if let Some(k) = k {
            map.insert("architecture".into(), Value::from("topk"));
            map.insert("k".into(), k);
        }
    }
    match map.get("normalize_activations") {
        Some(Value::Bool(b)) => {
            let n = if *b {
                "expected_average_only_in"
            } else {
                "none"
            };
            map.insert("normalize_activations".into(), Value::from(n));
        }
        Some(Value::Null) | None => {
            map.insert("normalize_activations".into(), Value::from("none"));
        }
        _ => {}
    }
    // Old configs wrote torch dtype names.
    if let Some(Value::String(d)) = map.get_mut("dtype") {
        if let Some(s) = d.strip_prefix("torch.") {
            *d = s.to_string();
        }
    }
    // A 6.x-shaped config without a version keeps its metadata.
    let mut metadata = match map.remove("metadata") {
        Some(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    for key in METADATA_KEYS {
        if let Some(v) = map.remove(key) {
            if !v.is_null() {
                metadata.insert(key.into(), v);
            }
        }
    }
    // The training version stays as provenance; `sae_lens_version` says which config format
    // this is, and the config is now 6.x: written back with the old version, SAELens (and this
    // reader) would take it for a flat pre-6 config again and lose its metadata.
    if let Some(v) = metadata.get("sae_lens_version").cloned() {
        metadata.entry("sae_lens_training_version").or_insert(v);
    }
    metadata.insert("sae_lens_version".into(), Value::from(FORMAT_VERSION));
    map.insert("metadata".into(), Value::Object(metadata));
    // Keep only SAEConfig's fields (SAELens's filter_valid_dataclass_fields).
    const FIELDS: [&str; 12] = [
        "architecture",
        "d_in",
        "d_sae",
        "d_out",
        "k",
        "rescale_acts_by_decoder_norm",
        "dtype",
        "device",
        "apply_b_dec_to_input",
        "normalize_activations",
        "reshape_activations",
        "metadata",
    ];
    map.retain(|k, _| FIELDS.contains(&k.as_str()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_6_topk_reads() {
        let cfg = DictConfig::from_json(
            r#"{"d_in": 8, "d_sae": 16, "hook_point": "blocks.2.hook_resid_pre",
                "hook_point_head_index": null, "activation_fn_str": "topk",
                "activation_fn_kwargs": {"k": 3}, "normalize_activations": true,
                "dtype": "torch.float32", "sae_lens_version": "3.0.0", "context_size": 64}"#,
            "cfg.json",
        )
        .unwrap();
        assert_eq!(cfg.architecture, Architecture::Topk);
        assert_eq!(cfg.k, Some(3));
        assert_eq!(
            cfg.normalize_activations,
            NormalizeActivations::ExpectedAverageOnlyIn
        );
        assert_eq!(
            cfg.metadata.hook_name.as_deref(),
            Some("blocks.2.hook_resid_pre")
        );
        assert_eq!(cfg.metadata.context_size, Some(64));
        assert_eq!(cfg.dtype, "float32");
        assert!(cfg.apply_b_dec_to_input);
        assert_eq!(
            cfg.metadata.sae_lens_training_version.as_deref(),
            Some("3.0.0")
        );
        // Written back, it reads as the same 6.x config.
        assert_eq!(DictConfig::from_json(&cfg.to_json(), "again").unwrap(), cfg);
    }

    #[test]
    fn bad_values_name_their_field() {
        let e = DictConfig::from_json(
            r#"{"d_in": 8, "d_sae": 16, "normalize_activations": "whiten",
                "metadata": {"sae_lens_version": "6.1.0"}}"#,
            "cfg.json",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("cfg.json") && e.contains("`normalize_activations`") && e.contains("whiten"),
            "{e}"
        );
        let e = DictConfig::from_json(r#"{"d_sae": 16, "architecture": "standard"}"#, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`d_in`"), "{e}");
    }

    #[test]
    fn missing_architecture_is_standard_and_6x_round_trips() {
        let cfg = DictConfig::from_json(
            r#"{"d_in": 8, "d_sae": 16, "metadata": {"hook_name": "blocks.0.hook_resid_pre"}}"#,
            "cfg.json",
        )
        .unwrap();
        assert_eq!(cfg.architecture, Architecture::Standard);
        assert_eq!(
            cfg.metadata.hook_name.as_deref(),
            Some("blocks.0.hook_resid_pre")
        );
        let mut cfg = DictConfig::new(Architecture::SkipTranscoder, 8, 16);
        cfg.d_out = Some(4);
        cfg.metadata.extra.insert("custom".into(), Value::from(1));
        let back = DictConfig::from_json(&cfg.to_json(), "x").unwrap();
        assert_eq!(back, cfg);
    }
}
