//! Model configuration: one strict internal [`Config`] whose enums describe every architectural
//! difference, and a lenient mirror of Hugging Face's `config.json` that converts into it.

use serde::{Deserialize, Serialize};

use crate::{ModelError, Result};

/// The residual-stream normaliser.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Norm {
    /// `x / sqrt(mean(x²) + eps) * w` (Llama, Mistral, Qwen2).
    RmsNorm,
    /// `(x - mean) / sqrt(var + eps) * w + b` (GPT-2).
    LayerNorm,
    /// No normaliser at all (toy models such as the grokking transformer): the norm hooks and
    /// weights do not exist.
    None,
}

/// Position information.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Pos {
    /// A learned table added to the token embedding (`hook_pos_embed`).
    Learned,
    /// Rotary embeddings on queries and keys, in Hugging Face's half-split layout.
    Rotary {
        /// Base of the frequencies (`rope_theta`).
        theta: f64,
        /// Frequency rescaling for long contexts, if any.
        scaling: Option<RopeScaling>,
    },
    /// No positional information at all (toy models that rely on the causal mask).
    None,
}

/// Rotary frequency rescaling.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RopeScaling {
    /// Every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3's piecewise rescaling of low frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Activation functions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Act {
    /// GELU, tanh approximation (GPT-2's `gelu_new`).
    GeluTanh,
    /// GELU, exact (erf).
    Gelu,
    /// SiLU / swish.
    Silu,
    /// ReLU.
    Relu,
}

/// The MLP sub-layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Mlp {
    /// `W_out act(W_in x + b_in) + b_out`.
    Standard { act: Act },
    /// `W_out (act(W_gate x) * W_up x)` (Llama's SwiGLU when act is SiLU).
    Gated { act: Act },
}

/// Everything that determines the shape and arithmetic of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Family name, for display only (`llama`, `qwen2`, `gpt2`, `toy`...). Never branched on.
    pub family: String,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when smaller than `n_heads`).
    pub n_kv_heads: usize,
    pub d_head: usize,
    /// Hidden size of the MLP; ignored when `mlp` is `None`.
    pub d_mlp: usize,
    pub d_vocab: usize,
    /// Longest sequence the model supports.
    pub n_ctx: usize,
    pub norm: Norm,
    pub norm_eps: f64,
    pub pos: Pos,
    /// `None` for attention-only models.
    pub mlp: Option<Mlp>,
    /// Biases on the query, key and value projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub attn_out_bias: bool,
    /// Biases on the MLP's linear maps.
    pub mlp_bias: bool,
    /// The unembedding is the transposed token embedding.
    pub tied_embeddings: bool,
    /// A normaliser before the unembedding.
    pub final_norm: bool,
}

impl Config {
    /// Checks internal consistency; every constructor calls this.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.d_model == 0 || self.n_layers == 0 || self.n_heads == 0 || self.d_vocab == 0 {
            return bad(format!(
                "d_model, n_layers, n_heads and d_vocab must be positive (got {}, {}, {}, {})",
                self.d_model, self.n_layers, self.n_heads, self.d_vocab
            ));
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "n_heads ({}) must be a multiple of n_kv_heads ({})",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.d_head == 0 {
            return bad("d_head must be positive".into());
        }
        if matches!(self.pos, Pos::Rotary { .. }) && !self.d_head.is_multiple_of(2) {
            return bad(format!("rotary needs an even d_head, got {}", self.d_head));
        }
        if self.mlp.is_some() && self.d_mlp == 0 {
            return bad("d_mlp must be positive for a model with an MLP".into());
        }
        if self.n_ctx == 0 {
            return bad("n_ctx must be positive".into());
        }
        if self.norm == Norm::None && self.final_norm {
            return bad("final_norm needs a normaliser (norm is none)".into());
        }
        Ok(())
    }

    /// A small attention-only or MLP transformer for toy experiments, with a sensible default
    /// shape: LayerNorm, learned positions, GELU, no biases on attention.
    pub fn toy(
        n_layers: usize,
        d_model: usize,
        n_heads: usize,
        d_vocab: usize,
        n_ctx: usize,
        attn_only: bool,
    ) -> Config {
        Config {
            family: "toy".into(),
            d_model,
            n_layers,
            n_heads,
            n_kv_heads: n_heads,
            d_head: d_model / n_heads.max(1),
            d_mlp: 4 * d_model,
            d_vocab,
            n_ctx,
            norm: Norm::LayerNorm,
            norm_eps: 1e-5,
            pos: Pos::Learned,
            mlp: if attn_only {
                None
            } else {
                Some(Mlp::Standard { act: Act::GeluTanh })
            },
            qkv_bias: true,
            attn_out_bias: true,
            mlp_bias: true,
            tied_embeddings: false,
            final_norm: true,
        }
    }

    /// Number of query heads sharing one key/value head.
    pub fn n_rep(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Config> {
        let hf: HfConfig = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("config.json is not valid: {e}")))?;
        hf.into_config()
    }
}

fn act_from_hf(name: &str) -> Result<Act> {
    Ok(match name {
        "silu" | "swish" => Act::Silu,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" | "gelu_tanh" => Act::GeluTanh,
        "gelu" => Act::Gelu,
        "relu" => Act::Relu,
        other => {
            return Err(ModelError::Config(format!(
                "unsupported activation `{other}`"
            )))
        }
    })
}

/// Hugging Face `config.json`, read leniently: unknown keys are ignored, GPT-2's names are
/// aliases of Llama's.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    #[serde(alias = "n_embd")]
    hidden_size: Option<usize>,
    #[serde(alias = "n_layer")]
    num_hidden_layers: Option<usize>,
    #[serde(alias = "n_head")]
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(alias = "n_inner")]
    intermediate_size: Option<usize>,
    vocab_size: Option<usize>,
    #[serde(alias = "n_positions")]
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    layer_norm_epsilon: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5 keeps `rope_theta` and the scaling in one object.
    rope_parameters: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    #[serde(alias = "activation_function")]
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
}

impl HfConfig {
    fn into_config(self) -> Result<Config> {
        let family = self
            .model_type
            .clone()
            .ok_or_else(|| ModelError::Config("config.json has no `model_type`".into()))?;
        if !matches!(family.as_str(), "llama" | "mistral" | "qwen2" | "gpt2") {
            return Err(ModelError::Config(format!(
                "unsupported model_type `{family}` (supported: llama, mistral, qwen2, gpt2)"
            )));
        }
        let need = |v: Option<usize>, k: &str| {
            v.ok_or_else(|| ModelError::Config(format!("config.json lacks `{k}`")))
        };
        let d_model = need(self.hidden_size, "hidden_size")?;
        let n_layers = need(self.num_hidden_layers, "num_hidden_layers")?;
        let n_heads = need(self.num_attention_heads, "num_attention_heads")?;
        let d_vocab = need(self.vocab_size, "vocab_size")?;
        if n_heads == 0 {
            return Err(ModelError::Config("num_attention_heads is 0".into()));
        }
        let d_head = self.head_dim.unwrap_or(d_model / n_heads);
        let cfg = match family.as_str() {
            "llama" | "mistral" | "qwen2" => {
                let qwen = family == "qwen2";
                let attention_bias = self.attention_bias.unwrap_or(false);
                Config {
                    family: family.clone(),
                    d_model,
                    n_layers,
                    n_heads,
                    n_kv_heads: self.num_key_value_heads.unwrap_or(n_heads),
                    d_head,
                    d_mlp: need(self.intermediate_size, "intermediate_size")?,
                    d_vocab,
                    n_ctx: self.max_position_embeddings.unwrap_or(4096),
                    norm: Norm::RmsNorm,
                    norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
                    pos: Pos::Rotary {
                        theta: self
                            .rope_theta
                            .or_else(|| {
                                self.rope_parameters
                                    .as_ref()
                                    .and_then(|r| r.get("rope_theta")?.as_f64())
                            })
                            .unwrap_or(10_000.0),
                        scaling: parse_rope_scaling(
                            self.rope_scaling.as_ref().or(self.rope_parameters.as_ref()),
                        )?,
                    },
                    mlp: Some(Mlp::Gated {
                        act: act_from_hf(self.hidden_act.as_deref().unwrap_or("silu"))?,
                    }),
                    // Qwen2 always has q/k/v biases and no output bias.
                    qkv_bias: qwen || attention_bias,
                    attn_out_bias: !qwen && attention_bias,
                    mlp_bias: self.mlp_bias.unwrap_or(false),
                    tied_embeddings: self.tie_word_embeddings.unwrap_or(qwen),
                    final_norm: true,
                }
            }
            "gpt2" => Config {
                family: family.clone(),
                d_model,
                n_layers,
                n_heads,
                n_kv_heads: n_heads,
                d_head,
                d_mlp: self.intermediate_size.unwrap_or(4 * d_model),
                d_vocab,
                n_ctx: self.max_position_embeddings.unwrap_or(1024),
                norm: Norm::LayerNorm,
                norm_eps: self.layer_norm_epsilon.unwrap_or(1e-5),
                pos: Pos::Learned,
                mlp: Some(Mlp::Standard {
                    act: act_from_hf(self.hidden_act.as_deref().unwrap_or("gelu_new"))?,
                }),
                qkv_bias: true,
                attn_out_bias: true,
                mlp_bias: true,
                tied_embeddings: self.tie_word_embeddings.unwrap_or(true),
                final_norm: true,
            },
            _ => unreachable!("family checked above"),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Hugging Face's `rope_scaling` object (`rope_type` or the older `type`).
pub(crate) fn parse_rope_scaling(v: Option<&serde_json::Value>) -> Result<Option<RopeScaling>> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|k| k.as_str())
        .unwrap_or("default");
    let num = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| ModelError::Config(format!("rope_scaling of type `{kind}` lacks `{k}`")))
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        other => {
            return Err(ModelError::Config(format!(
                "unsupported rope scaling `{other}` (supported: linear, llama3)"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_like_config() {
        let c = Config::from_hf_json(
            r#"{"model_type":"llama","hidden_size":576,"num_hidden_layers":30,
            "num_attention_heads":9,"num_key_value_heads":3,"intermediate_size":1536,
            "vocab_size":49152,"rms_norm_eps":1e-5,"rope_theta":100000,"tie_word_embeddings":true,
            "max_position_embeddings":8192,"hidden_act":"silu","unknown_key":1}"#,
        )
        .unwrap();
        assert_eq!(c.d_head, 64);
        assert_eq!(c.n_rep(), 3);
        assert!(c.tied_embeddings);
        assert_eq!(c.mlp, Some(Mlp::Gated { act: Act::Silu }));
    }

    #[test]
    fn rope_parameters_of_transformers_5() {
        let c = Config::from_hf_json(
            r#"{"model_type":"llama","hidden_size":64,"num_hidden_layers":1,
            "num_attention_heads":4,"intermediate_size":8,"vocab_size":10,
            "rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64}}"#,
        )
        .unwrap();
        match c.pos {
            Pos::Rotary { theta, scaling } => {
                assert_eq!(theta, 500000.0);
                assert!(matches!(scaling, Some(RopeScaling::Llama3 { .. })));
            }
            other => panic!("expected rotary, got {other:?}"),
        }
    }

    #[test]
    fn bad_configs_are_refused_with_reasons() {
        let e = Config::from_hf_json(r#"{"model_type":"bert","hidden_size":8}"#).unwrap_err();
        assert!(e.to_string().contains("bert"), "{e}");
        let e = Config::from_hf_json(r#"{"model_type":"llama"}"#).unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
        let e = Config::from_hf_json("{not json").unwrap_err();
        assert!(e.to_string().contains("config.json"), "{e}");
        let e = Config::from_hf_json(
            r#"{"model_type":"llama","hidden_size":8,"num_hidden_layers":1,"num_attention_heads":3,
            "num_key_value_heads":2,"intermediate_size":8,"vocab_size":10}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
        let e = Config::from_hf_json(
            r#"{"model_type":"llama","hidden_size":8,"num_hidden_layers":1,"num_attention_heads":2,
            "intermediate_size":8,"vocab_size":10,"rope_scaling":{"rope_type":"yarn","factor":2}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
    }
}
