//! The canonical hooked transformer: one implementation whose architectural variants (normaliser,
//! positions, MLP kind, biases, grouped-query attention, tied embeddings) come from [`Config`]
//! enums. Every activation passes through a named hook point (TransformerLens's names, see
//! `shared/reference/hook-points.md`), so analysis code reads and edits the forward pass without
//! touching this file.
//!
//! Weights are stored in `nn.Linear` orientation (`[out, in]`) under canonical names (see
//! [`names`]); the loaders translate each checkpoint format into them.
//!
//! Two code paths per operation: fused candle kernels (softmax, RMSNorm, LayerNorm, rotary) when
//! nothing needs their intermediate values or gradients, and plain differentiable compositions
//! otherwise (the fused CPU kernels have no backward pass). `tests/parity.rs` checks both against
//! Hugging Face `transformers`.

use candle_core::{DType, Device, Tensor, D};
use scalpel_core::{ActivationCache, BlockHook, HookPoint, Hooks};

use crate::config::{Act, Config, Mlp, Norm, Pos, RopeScaling};
use crate::{ModelError, Result};

/// Canonical weight names, shared by every loader.
pub mod names {
    pub const EMBED: &str = "embed.w";
    pub const POS_EMBED: &str = "pos_embed.w";
    pub const LN_FINAL_W: &str = "ln_final.w";
    pub const LN_FINAL_B: &str = "ln_final.b";
    pub const UNEMBED_W: &str = "unembed.w";
    /// `blocks.{l}.{suffix}`, suffixes: `ln1.w ln1.b attn.q.w attn.q.b attn.k.w attn.k.b attn.v.w
    /// attn.v.b attn.o.w attn.o.b ln2.w ln2.b mlp.gate.w mlp.in.w mlp.in.b mlp.out.w mlp.out.b`.
    pub fn block(l: usize, suffix: &str) -> String {
        format!("blocks.{l}.{suffix}")
    }
}

/// Anything that can hand out the weights of a model by canonical name and expected shape.
pub trait WeightSource {
    /// The tensor called `name`, as f32 on `device`, checked to have `shape`.
    fn get(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor>;
}

/// A linear map `y = x Wᵀ + b` with `W` stored `[out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub w: Tensor,
    pub b: Option<Tensor>,
}

impl Linear {
    fn load(
        src: &mut dyn WeightSource,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
        dev: &Device,
    ) -> Result<Self> {
        let w = src.get(&format!("{name}.w"), &[out, inp], dev)?;
        let b = if bias {
            Some(src.get(&format!("{name}.b"), &[out], dev)?)
        } else {
            None
        };
        Ok(Linear { w, b })
    }

    /// # Shapes
    /// `x: [n, in]` → `[n, out]`
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = frozen_matmul(x, &self.w)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// `x [m, k] · wᵀ` for `w [n, k]`. When `x` carries gradients and `w` does not (gradients
/// with respect to activations of a frozen model), the backward pass skips the weight's
/// gradient.
fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let frozen = x.track_op()
        && !w.track_op()
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && w.is_contiguous();
    Ok(if frozen {
        x.contiguous()?
            .apply_op1(crate::kernels::FrozenLinear { w: w.clone() })?
    } else {
        x.matmul(&w.t()?)?
    })
}

/// True when `x` carries gradients, `w` does not, and both are f32 on the CPU: the case the
/// differentiable kernels with a frozen weight cover.
fn frozen_cpu(x: &Tensor, w: Option<&Tensor>) -> bool {
    x.track_op()
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.is_none_or(|w| !w.track_op() && w.dtype() == DType::F32)
}

/// Normaliser weights.
#[derive(Debug, Clone)]
pub struct NormW {
    pub w: Tensor,
    pub b: Option<Tensor>,
}

/// Attention weights of one block.
#[derive(Debug, Clone)]
pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// q, k and v stacked into one matrix (`q`, `k`, `v` are then views into it), so that one
    /// larger matmul replaces three. Absent for trainable weights, which must stay separate
    /// variables.
    qkv: Option<Linear>,
}

/// MLP weights of one block. `gate` is present for gated MLPs.
#[derive(Debug, Clone)]
pub struct MlpW {
    pub gate: Option<Linear>,
    pub w_in: Linear,
    pub w_out: Linear,
    /// Gated MLPs with frozen weights: gate and up stacked (`[2·d_mlp, d_model]`).
    gate_up: Option<Linear>,
}

/// Stacks the rows of several linear maps into one and returns it with views of each part.
/// Trainable (variable) weights are left alone.
fn stack(parts: &[&Linear]) -> Result<Option<(Linear, Vec<Linear>)>> {
    if parts.iter().any(|l| l.w.is_variable()) {
        return Ok(None);
    }
    let ws: Vec<&Tensor> = parts.iter().map(|l| &l.w).collect();
    let w = Tensor::cat(&ws, 0)?;
    let b = if parts.iter().all(|l| l.b.is_some()) {
        let bs: Vec<&Tensor> = parts.iter().filter_map(|l| l.b.as_ref()).collect();
        Some(Tensor::cat(&bs, 0)?)
    } else if parts.iter().all(|l| l.b.is_none()) {
        None
    } else {
        return Ok(None);
    };
    let mut views = Vec::with_capacity(parts.len());
    let mut start = 0;
    for l in parts {
        let n = l.w.dim(0)?;
        views.push(Linear {
            w: w.narrow(0, start, n)?,
            b: b.as_ref().map(|b| b.narrow(0, start, n)).transpose()?,
        });
        start += n;
    }
    Ok(Some((Linear { w, b }, views)))
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    /// Absent when the model has no normaliser (`Norm::None`).
    pub ln1: Option<NormW>,
    pub attn: Attention,
    pub ln2: Option<NormW>,
    pub mlp: Option<MlpW>,
}

/// Options of one forward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Stop before block `l` and return the residual stream entering it (`[b, p, d]`), as
    /// TransformerLens's `stop_at_layer`. `Some(0)` returns the embeddings.
    pub stop_at_layer: Option<usize>,
    /// Use differentiable compositions everywhere (needed for training and gradients; implied
    /// when hooks track gradients).
    pub differentiable: bool,
}

/// Keys and values of earlier positions, for generation.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per layer: rotated keys and values `[b, kv_heads, p_past, d_head]`.
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Per row: which past positions were real tokens.
    key_mask: Vec<Vec<bool>>,
    /// Per row: the position id the next token gets.
    next_pos: Vec<u32>,
}

impl KvCache {
    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.key_mask.first().map_or(0, |m| m.len())
    }

    /// True before the first forward.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `n` positions of this cache, each row repeated `repeat` times along the batch
    /// (row-major: the whole batch, then the whole batch again…). Used to run many variants of
    /// a prompt that share a prefix.
    pub fn prefix(&self, n: usize, repeat: usize) -> Result<KvCache> {
        if n > self.len() {
            return Err(ModelError::Input(format!(
                "a prefix of {n} positions from a cache of {}",
                self.len()
            )));
        }
        let rep = |t: &Tensor| -> Result<Tensor> {
            let t = t.narrow(2, 0, n)?;
            Ok(if repeat == 1 {
                t
            } else {
                Tensor::cat(&vec![&t; repeat], 0)?
            })
        };
        let layers = self
            .layers
            .iter()
            .map(|kv| {
                kv.as_ref()
                    .map(|(k, v)| Ok::<_, ModelError>((rep(k)?, rep(v)?)))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let mut key_mask = Vec::with_capacity(self.key_mask.len() * repeat);
        let mut next_pos = Vec::with_capacity(self.key_mask.len() * repeat);
        for _ in 0..repeat {
            for m in &self.key_mask {
                key_mask.push(m[..n].to_vec());
                next_pos.push(m[..n].iter().filter(|&&r| r).count() as u32);
            }
        }
        Ok(KvCache {
            layers,
            key_mask,
            next_pos,
        })
    }
}

/// Where a forward pass begins.
enum Input<'a> {
    /// Token ids `[b, p]`, from the embeddings.
    Tokens(&'a Tensor),
    /// The residual stream `[b, p, d_model]` entering block `layer`.
    Residual { layer: usize, x: &'a Tensor },
}

/// Per-forward tensors shared by all blocks.
struct Ctx {
    /// `[b, p, d_head/2]` each, rotary models only, as tensors and as plain data.
    cos_sin: Option<(Tensor, Tensor)>,
    cos_sin_data: Option<(Vec<f32>, Vec<f32>)>,
    /// Additive attention mask `[b or 1, 1, p, p_total]`, absent when nothing is masked.
    mask: Option<Tensor>,
    /// Per row: which of this forward's positions are real tokens.
    real: Vec<Vec<bool>>,
    grad: bool,
    /// Keys and values must be returned for a KV cache.
    caching: bool,
}

/// The hooked transformer.
#[derive(Debug, Clone)]
pub struct Model {
    cfg: Config,
    device: Device,
    /// `[d_vocab, d_model]`
    w_e: Tensor,
    /// `[n_ctx, d_model]`, learned positions only.
    w_pos: Option<Tensor>,
    blocks: Vec<Block>,
    ln_final: Option<NormW>,
    /// `[d_vocab, d_model]` (the same tensor as `w_e` when tied).
    w_u: Tensor,
    /// Rotary inverse frequencies, `d_head/2` of them.
    inv_freq: Option<Vec<f32>>,
}

impl Model {
    /// Builds a model from any weight source, checking every shape.
    pub fn load(cfg: Config, src: &mut dyn WeightSource, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let (d, dh, h, kvh) = (cfg.d_model, cfg.d_head, cfg.n_heads, cfg.n_kv_heads);
        let dev = device;
        let norm = |src: &mut dyn WeightSource, name: &str| -> Result<Option<NormW>> {
            if cfg.norm == Norm::None {
                return Ok(None);
            }
            let w = src.get(&format!("{name}.w"), &[d], dev)?;
            let b = match cfg.norm {
                Norm::LayerNorm => Some(src.get(&format!("{name}.b"), &[d], dev)?),
                Norm::RmsNorm | Norm::None => None,
            };
            Ok(Some(NormW { w, b }))
        };
        let w_e = src.get(names::EMBED, &[cfg.d_vocab, d], dev)?;
        let w_pos = match cfg.pos {
            Pos::Learned => Some(src.get(names::POS_EMBED, &[cfg.n_ctx, d], dev)?),
            _ => None,
        };
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let p = |s: &str| names::block(l, s);
            let ln1 = norm(src, &p("ln1"))?;
            let mut attn = Attention {
                q: Linear::load(src, &p("attn.q"), h * dh, d, cfg.qkv_bias, dev)?,
                k: Linear::load(src, &p("attn.k"), kvh * dh, d, cfg.qkv_bias, dev)?,
                v: Linear::load(src, &p("attn.v"), kvh * dh, d, cfg.qkv_bias, dev)?,
                o: Linear::load(src, &p("attn.o"), d, h * dh, cfg.attn_out_bias, dev)?,
                qkv: None,
            };
            if let Some((qkv, views)) = stack(&[&attn.q, &attn.k, &attn.v])? {
                let [q, k, v]: [Linear; 3] = views.try_into().expect("three views of three parts");
                attn = Attention {
                    q,
                    k,
                    v,
                    qkv: Some(qkv),
                    ..attn
                };
            }
            let (ln2, mlp) = match cfg.mlp {
                None => (None, None),
                Some(kind) => {
                    let m = cfg.d_mlp;
                    let gate = match kind {
                        Mlp::Gated { .. } => {
                            Some(Linear::load(src, &p("mlp.gate"), m, d, cfg.mlp_bias, dev)?)
                        }
                        Mlp::Standard { .. } => None,
                    };
                    let mut mlp = MlpW {
                        gate,
                        w_in: Linear::load(src, &p("mlp.in"), m, d, cfg.mlp_bias, dev)?,
                        w_out: Linear::load(src, &p("mlp.out"), d, m, cfg.mlp_bias, dev)?,
                        gate_up: None,
                    };
                    if let Some(g) = &mlp.gate {
                        if let Some((gu, views)) = stack(&[g, &mlp.w_in])? {
                            let [g, u]: [Linear; 2] =
                                views.try_into().expect("two views of two parts");
                            mlp = MlpW {
                                gate: Some(g),
                                w_in: u,
                                gate_up: Some(gu),
                                ..mlp
                            };
                        }
                    }
                    (norm(src, &p("ln2"))?, Some(mlp))
                }
            };
            blocks.push(Block {
                ln1,
                attn,
                ln2,
                mlp,
            });
        }
        let ln_final = if cfg.final_norm {
            norm(src, "ln_final")?
        } else {
            None
        };
        let w_u = if cfg.tied_embeddings {
            w_e.clone()
        } else {
            src.get(names::UNEMBED_W, &[cfg.d_vocab, d], dev)?
        };
        let inv_freq = match &cfg.pos {
            Pos::Rotary { theta, scaling } => Some(rotary_inv_freq(*theta, dh, scaling.as_ref())),
            _ => None,
        };
        Ok(Model {
            cfg,
            device: device.clone(),
            w_e,
            w_pos,
            blocks,
            ln_final,
            w_u,
            inv_freq,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The blocks (weights for analysis).
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Token embedding `W_E [d_vocab, d_model]`.
    pub fn w_e(&self) -> &Tensor {
        &self.w_e
    }

    /// Unembedding as stored, `[d_vocab, d_model]` (`W_U` is its transpose).
    pub fn w_u_rows(&self) -> &Tensor {
        &self.w_u
    }

    /// Learned positional embedding `W_pos [n_ctx, d_model]`, if the model has one.
    pub fn w_pos(&self) -> Option<&Tensor> {
        self.w_pos.as_ref()
    }

    /// Final normaliser weights, if the model has one.
    pub fn ln_final(&self) -> Option<&NormW> {
        self.ln_final.as_ref()
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn n_params(&self) -> usize {
        let lin = |l: &Linear| l.w.elem_count() + l.b.as_ref().map_or(0, |b| b.elem_count());
        let nrm = |n: &NormW| n.w.elem_count() + n.b.as_ref().map_or(0, |b| b.elem_count());
        let mut n = self.w_e.elem_count() + self.w_pos.as_ref().map_or(0, |t| t.elem_count());
        for b in &self.blocks {
            n += b.ln1.as_ref().map_or(0, nrm)
                + lin(&b.attn.q)
                + lin(&b.attn.k)
                + lin(&b.attn.v)
                + lin(&b.attn.o);
            n += b.ln2.as_ref().map_or(0, nrm);
            if let Some(m) = &b.mlp {
                n += m.gate.as_ref().map_or(0, lin) + lin(&m.w_in) + lin(&m.w_out);
            }
        }
        n += self.ln_final.as_ref().map_or(0, nrm);
        if !self.cfg.tied_embeddings {
            n += self.w_u.elem_count();
        }
        n
    }

    /// Every hook point this model has, in forward order.
    pub fn hook_points(&self) -> Vec<HookPoint> {
        let c = &self.cfg;
        let mut v = vec![HookPoint::Embed];
        if matches!(c.pos, Pos::Learned) {
            v.push(HookPoint::PosEmbed);
        }
        let rotary = matches!(c.pos, Pos::Rotary { .. });
        let gated = matches!(c.mlp, Some(Mlp::Gated { .. }));
        for l in 0..c.n_layers {
            for h in BlockHook::ALL {
                let keep = match h {
                    BlockHook::Ln1Scale
                    | BlockHook::Ln1Normalized
                    | BlockHook::Ln2Scale
                    | BlockHook::Ln2Normalized
                        if c.norm == Norm::None =>
                    {
                        false
                    }
                    BlockHook::RotQ | BlockHook::RotK => rotary,
                    BlockHook::MlpPreLinear => gated,
                    BlockHook::ResidMid => c.mlp.is_some(),
                    _ if h.is_mlp() => c.mlp.is_some(),
                    _ => true,
                };
                if keep {
                    v.push(HookPoint::Block(l, h));
                }
            }
        }
        if c.final_norm {
            v.extend([HookPoint::LnFinalScale, HookPoint::LnFinalNormalized]);
        }
        v.extend([HookPoint::UnembedIn, HookPoint::UnembedOut]);
        v
    }

    /// The shape of a hook's activation for a batch of `b` sequences of `p` tokens (and `pk`
    /// key positions, which equals `p` without a KV cache).
    pub fn hook_shape(&self, hp: HookPoint, b: usize, p: usize) -> Vec<usize> {
        let c = &self.cfg;
        let (d, h, kvh, dh) = (c.d_model, c.n_heads, c.n_kv_heads, c.d_head);
        match hp {
            HookPoint::Embed
            | HookPoint::PosEmbed
            | HookPoint::LnFinalNormalized
            | HookPoint::UnembedIn => vec![b, p, d],
            HookPoint::LnFinalScale => vec![b, p, 1],
            HookPoint::UnembedOut => vec![b, p, c.d_vocab],
            HookPoint::Block(_, bh) => match bh {
                BlockHook::Ln1Scale | BlockHook::Ln2Scale => vec![b, p, 1],
                BlockHook::Q | BlockHook::RotQ | BlockHook::Z => vec![b, p, h, dh],
                BlockHook::K | BlockHook::V | BlockHook::RotK => vec![b, p, kvh, dh],
                BlockHook::AttnScores | BlockHook::Pattern => vec![b, h, p, p],
                BlockHook::Result => vec![b, p, h, d],
                BlockHook::MlpPre | BlockHook::MlpPreLinear | BlockHook::MlpPost => {
                    vec![b, p, c.d_mlp]
                }
                _ => vec![b, p, d],
            },
        }
    }

    /// Resolves a hook name (canonical or shorthand) against this model's hooks.
    pub fn hook_point(&self, name: &str) -> Result<HookPoint> {
        Ok(HookPoint::parse_for(name, &self.hook_points())?)
    }

    /// The final normaliser and the unembedding applied to any residual stream `x [b, p, d]`:
    /// logits `[b, p, d_vocab]` as if `x` were the last block's output (the logit lens).
    pub fn unembed_residual(&self, x: &Tensor) -> Result<Tensor> {
        let (b, p, d) = x.dims3()?;
        if d != self.cfg.d_model {
            return Err(ModelError::Input(format!(
                "a residual of width {d} for a model of d_model {}",
                self.cfg.d_model
            )));
        }
        let x = self.final_norm(x)?;
        Ok(x.reshape((b * p, d))?
            .matmul(&self.w_u.t()?)?
            .reshape((b, p, self.cfg.d_vocab))?)
    }

    /// The final normaliser applied to a residual stream `x [.., d_model]` (the identity for
    /// models without one). Differentiable when `x` carries gradients.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        match &self.ln_final {
            Some(ln) => self.norm(
                Some(ln),
                x,
                &mut Hooks::new(),
                HookPoint::LnFinalScale,
                HookPoint::LnFinalNormalized,
                x.track_op(),
            ),
            None => Ok(x.clone()),
        }
    }

    /// Logits `[b, p, d_vocab]` for token ids `[b, p]` (u32), with no hooks.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        self.forward_with(tokens, None, &mut Hooks::new(), RunOptions::default())
    }

    /// Logits and the activations of every hook point for which `filter` is true.
    pub fn run_with_cache(
        &self,
        tokens: &Tensor,
        filter: impl Fn(HookPoint) -> bool,
    ) -> Result<(Tensor, ActivationCache)> {
        let mut hooks = Hooks::new().with_cache(filter);
        let logits = self.forward_with(tokens, None, &mut hooks, RunOptions::default())?;
        Ok((logits, hooks.take_cache()))
    }

    /// Logits with `hooks` active (they may read, replace and track activations).
    pub fn run_with_hooks(&self, tokens: &Tensor, hooks: &mut Hooks) -> Result<Tensor> {
        self.forward_with(tokens, None, hooks, RunOptions::default())
    }

    /// The general forward pass.
    ///
    /// # Shapes
    /// - `tokens`: `[b, p]` u32 ids.
    /// - `attention_mask`: `[b, p]` (1 = token, 0 = padding; any integer or float dtype), for
    ///   left- or right-padded batches. Position ids count only real tokens.
    /// - returns logits `[b, p, d_vocab]`, or the residual `[b, p, d_model]` with `stop_at_layer`.
    pub fn forward_with(
        &self,
        tokens: &Tensor,
        attention_mask: Option<&Tensor>,
        hooks: &mut Hooks,
        opts: RunOptions,
    ) -> Result<Tensor> {
        self.forward_impl(Input::Tokens(tokens), attention_mask, hooks, opts, None)
    }

    /// Runs blocks `layer..` on a residual stream `x [b, p, d_model]` entering block `layer`
    /// (no padding), as if everything before had produced it: the rest of a forward pass,
    /// for patching experiments that change nothing below a layer.
    ///
    /// With `prefix`, `x` continues the positions held in that cache (keys and values of
    /// blocks `layer..`, e.g. from [`KvCache::prefix`]), which the new positions attend to; the
    /// cache is extended. `opts.stop_at_layer`, when set, must be at least `layer`.
    pub fn forward_from(
        &self,
        layer: usize,
        x: &Tensor,
        prefix: Option<&mut KvCache>,
        hooks: &mut Hooks,
        opts: RunOptions,
    ) -> Result<Tensor> {
        self.forward_impl(Input::Residual { layer, x }, None, hooks, opts, prefix)
    }

    /// One step of cached decoding: runs `tokens` (`[b, p_new]`) after everything already in
    /// `cache`, appending to it. `attention_mask` covers only the new tokens.
    pub fn forward_cached(
        &self,
        tokens: &Tensor,
        attention_mask: Option<&Tensor>,
        hooks: &mut Hooks,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.forward_impl(
            Input::Tokens(tokens),
            attention_mask,
            hooks,
            RunOptions::default(),
            Some(cache),
        )
    }

    fn forward_impl(
        &self,
        input: Input,
        attention_mask: Option<&Tensor>,
        hooks: &mut Hooks,
        opts: RunOptions,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, p, first_layer) = match input {
            Input::Tokens(tokens) => {
                let (b, p) = tokens.dims2().map_err(|_| {
                    ModelError::Input(format!(
                        "tokens must be [batch, pos], got {:?}",
                        tokens.dims()
                    ))
                })?;
                (b, p, 0)
            }
            Input::Residual { layer, x } => {
                let (b, p, d) = x.dims3().map_err(|_| {
                    ModelError::Input(format!(
                        "a residual stream must be [batch, pos, d_model], got {:?}",
                        x.dims()
                    ))
                })?;
                if d != c.d_model {
                    return Err(ModelError::Input(format!(
                        "a residual of width {d} for a model of d_model {}",
                        c.d_model
                    )));
                }
                if layer > c.n_layers {
                    return Err(ModelError::Input(format!(
                        "cannot start at block {layer}: the model has {} blocks",
                        c.n_layers
                    )));
                }
                if opts.stop_at_layer.is_some_and(|s| s < layer) {
                    return Err(ModelError::Input(format!(
                        "stop_at_layer {:?} is before the starting block {layer}",
                        opts.stop_at_layer
                    )));
                }
                (b, p, layer)
            }
        };
        if b == 0 || p == 0 {
            return Err(ModelError::Input("empty input: no tokens to run".into()));
        }
        let ids = match input {
            Input::Tokens(tokens) => {
                let ids = tokens.to_dtype(DType::U32)?;
                if let Some(&bad) = ids
                    .flatten_all()?
                    .to_vec1::<u32>()?
                    .iter()
                    .find(|&&t| t as usize >= c.d_vocab)
                {
                    return Err(ModelError::Input(format!(
                        "token id {bad} is outside the vocabulary (size {})",
                        c.d_vocab
                    )));
                }
                Some(ids)
            }
            Input::Residual { .. } => None,
        };
        let mask_rows: Vec<Vec<bool>> = match attention_mask {
            Some(m) => {
                if m.dims() != [b, p] {
                    return Err(ModelError::Input(format!(
                        "attention mask has shape {:?}, tokens have [{b}, {p}]",
                        m.dims()
                    )));
                }
                m.to_dtype(DType::F32)?
                    .to_vec2::<f32>()?
                    .into_iter()
                    .map(|r| r.into_iter().map(|x| x != 0.0).collect())
                    .collect()
            }
            None => vec![vec![true; p]; b],
        };
        let past = cache.as_ref().map_or(0, |kv| kv.len());
        if let Some(kv) = cache.as_ref() {
            if !kv.is_empty() && kv.key_mask.len() != b {
                return Err(ModelError::Input(format!(
                    "batch of {b} does not match the KV cache's batch of {}",
                    kv.key_mask.len()
                )));
            }
        }
        if past + p > c.n_ctx {
            return Err(ModelError::Input(format!(
                "sequence of {} tokens is longer than the model's context of {}",
                past + p,
                c.n_ctx
            )));
        }
        if let Some(l) = opts.stop_at_layer {
            if l > c.n_layers {
                return Err(ModelError::Input(format!(
                    "stop_at_layer {l} is past the last block ({} blocks)",
                    c.n_layers
                )));
            }
        }
        hooks.set_pos_offset(past);
        let grad = opts.differentiable || hooks.needs_grad();

        // Position ids: count of real tokens before each one (left padding gets 0s).
        let start: Vec<u32> = match cache.as_ref() {
            Some(kv) if !kv.is_empty() => kv.next_pos.clone(),
            _ => vec![0; b],
        };
        let mut pos_ids = vec![0u32; b * p];
        let mut next_pos = start.clone();
        for (r, row) in mask_rows.iter().enumerate() {
            let mut n = start[r];
            for (i, &real) in row.iter().enumerate() {
                // Hugging Face's (cumsum(mask) - 1).clamp(0): a pad repeats the last real
                // position (or 0 before the first).
                pos_ids[r * p + i] = if real { n } else { n.saturating_sub(1) };
                n += real as u32;
            }
            next_pos[r] = n;
        }
        // Full key mask: cached positions then the new ones.
        let mut key_mask: Vec<Vec<bool>> = match cache.as_ref() {
            Some(kv) if !kv.is_empty() => kv.key_mask.clone(),
            _ => vec![Vec::new(); b],
        };
        for (r, row) in mask_rows.iter().enumerate() {
            key_mask[r].extend_from_slice(row);
        }
        let cos_sin_data = self.rotary_tables(&pos_ids);
        let cos_sin = match &cos_sin_data {
            Some((c, s)) => {
                let half = c.len() / (b * p);
                Some((
                    Tensor::from_slice(c, (b, p, half), &self.device)?,
                    Tensor::from_slice(s, (b, p, half), &self.device)?,
                ))
            }
            None => None,
        };
        let ctx = Ctx {
            cos_sin,
            cos_sin_data,
            mask: self.attention_mask(&key_mask, &mask_rows, past, p)?,
            real: mask_rows,
            grad,
            caching: cache.is_some(),
        };

        let mut x = match (&ids, input) {
            (Some(ids), _) => {
                let embed = self
                    .w_e
                    .embedding(&ids.flatten_all()?)?
                    .reshape((b, p, c.d_model))?;
                let mut x = hooks.apply(HookPoint::Embed, embed)?;
                if let Some(w_pos) = &self.w_pos {
                    let pos_t = Tensor::from_vec(pos_ids.clone(), b * p, &self.device)?;
                    let pe = w_pos.embedding(&pos_t)?.reshape((b, p, c.d_model))?;
                    let pe = hooks.apply(HookPoint::PosEmbed, pe)?;
                    x = (x + pe)?;
                }
                x
            }
            (None, Input::Residual { x, .. }) => x.clone(),
            (None, Input::Tokens(_)) => unreachable!("token input always has ids"),
        };

        let n_run = opts.stop_at_layer.unwrap_or(c.n_layers);
        let mut new_layers = vec![None; n_run];
        for (l, block) in self.blocks.iter().enumerate().take(n_run).skip(first_layer) {
            let past_kv = cache
                .as_ref()
                .and_then(|kv| kv.layers.get(l).cloned().flatten());
            let (y, kv) = self.block_forward(l, block, x, hooks, &ctx, past_kv)?;
            x = y;
            new_layers[l] = kv;
        }
        if let Some(kv) = cache {
            kv.layers = new_layers;
            kv.key_mask = key_mask;
            kv.next_pos = next_pos;
        }
        if opts.stop_at_layer.is_some() {
            return Ok(x);
        }

        if let Some(ln) = &self.ln_final {
            x = self.norm(
                Some(ln),
                &x,
                hooks,
                HookPoint::LnFinalScale,
                HookPoint::LnFinalNormalized,
                grad,
            )?;
        }
        let x = hooks.apply(HookPoint::UnembedIn, x)?;
        let logits = frozen_matmul(&x.reshape((b * p, c.d_model))?, &self.w_u)?
            .reshape((b, p, c.d_vocab))?;
        Ok(hooks.apply(HookPoint::UnembedOut, logits)?)
    }

    /// cos and sin tables `[b, p, d_head/2]` for the given position ids.
    fn rotary_tables(&self, pos_ids: &[u32]) -> Option<(Vec<f32>, Vec<f32>)> {
        let inv = self.inv_freq.as_ref()?;
        let mut cos = Vec::with_capacity(pos_ids.len() * inv.len());
        let mut sin = Vec::with_capacity(pos_ids.len() * inv.len());
        for &pos in pos_ids {
            for &f in inv {
                // f32 product, as Hugging Face computes it, so angles agree bit for bit.
                let a = pos as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Some((cos, sin))
    }

    /// Additive mask `[b, 1, p, past + p]`: 0 where a query may look, -inf elsewhere. A padding
    /// query sees only itself so that its softmax stays finite. `None` when nothing is masked.
    fn attention_mask(
        &self,
        key_mask: &[Vec<bool>],
        query_real: &[Vec<bool>],
        past: usize,
        p: usize,
    ) -> Result<Option<Tensor>> {
        let b = key_mask.len();
        let pk = past + p;
        let all_real = key_mask.iter().all(|r| r.iter().all(|&x| x));
        if p == 1 && all_real {
            return Ok(None);
        }
        let rows = if all_real { 1 } else { b };
        let mut m = vec![0f32; rows * p * pk];
        for r in 0..rows {
            for i in 0..p {
                let qpos = past + i;
                for j in 0..pk {
                    let visible = if query_real[r][i] {
                        j <= qpos && key_mask[r][j]
                    } else {
                        j == qpos
                    };
                    if !visible {
                        m[(r * p + i) * pk + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (rows, 1, p, pk), &self.device)?))
    }

    /// A normaliser with its two hooks. Fused kernel unless its scale is wanted or gradients
    /// are needed.
    fn norm(
        &self,
        ln: Option<&NormW>,
        x: &Tensor,
        hooks: &mut Hooks,
        scale_hp: HookPoint,
        norm_hp: HookPoint,
        grad: bool,
    ) -> Result<Tensor> {
        let Some(ln) = ln else {
            return Ok(x.clone());
        };
        let eps = self.cfg.norm_eps;
        let out = if !grad && !hooks.wants(scale_hp) {
            let x = x.contiguous()?;
            match (&self.cfg.norm, &ln.b) {
                (Norm::RmsNorm, _) => candle_nn::ops::rms_norm(&x, &ln.w, eps as f32)?,
                (Norm::LayerNorm, Some(b)) => candle_nn::ops::layer_norm(&x, &ln.w, b, eps as f32)?,
                (Norm::LayerNorm, None) => unreachable!("LayerNorm weights always carry a bias"),
                (Norm::None, _) => unreachable!("no weights are loaded without a normaliser"),
            }
        } else if matches!(self.cfg.norm, Norm::RmsNorm)
            && ln.b.is_none()
            && !hooks.wants(scale_hp)
            && frozen_cpu(x, Some(&ln.w))
        {
            x.contiguous()?.apply_op1(crate::kernels::RmsNormGrad {
                w: ln.w.clone(),
                eps: eps as f32,
            })?
        } else {
            let xc = match self.cfg.norm {
                Norm::LayerNorm => x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?,
                Norm::RmsNorm | Norm::None => x.clone(),
            };
            let scale = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?; // [b, p, 1]
            let scale = hooks.apply(scale_hp, scale)?;
            let y = xc.broadcast_div(&scale)?.broadcast_mul(&ln.w)?;
            match &ln.b {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        };
        Ok(hooks.apply(norm_hp, out)?)
    }

    fn block_forward(
        &self,
        l: usize,
        block: &Block,
        x: Tensor,
        hooks: &mut Hooks,
        ctx: &Ctx,
        past_kv: Option<(Tensor, Tensor)>,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let hp = |h| HookPoint::Block(l, h);
        let resid_pre = hooks.apply(hp(BlockHook::ResidPre), x)?;
        let n1 = self.norm(
            block.ln1.as_ref(),
            &resid_pre,
            hooks,
            hp(BlockHook::Ln1Scale),
            hp(BlockHook::Ln1Normalized),
            ctx.grad,
        )?;
        let (attn_out, kv) = self.attention(l, &block.attn, &n1, hooks, ctx, past_kv)?;
        let resid = (resid_pre + attn_out)?;
        let out = match &block.mlp {
            Some(mlp) => {
                let resid_mid = hooks.apply(hp(BlockHook::ResidMid), resid)?;
                let n2 = self.norm(
                    block.ln2.as_ref(),
                    &resid_mid,
                    hooks,
                    hp(BlockHook::Ln2Scale),
                    hp(BlockHook::Ln2Normalized),
                    ctx.grad,
                )?;
                let mlp_in = hooks.apply(hp(BlockHook::MlpIn), n2)?;
                let mlp_out = self.mlp(l, mlp, &mlp_in, hooks)?;
                (resid_mid + mlp_out)?
            }
            None => resid,
        };
        Ok((hooks.apply(hp(BlockHook::ResidPost), out)?, kv))
    }

    /// # Shapes
    /// `x: [b, p, d]` → `[b, p, d]`, plus, when a KV cache is kept, this layer's full keys and
    /// values `[b, kv_heads, p_total, d_head]`.
    fn attention(
        &self,
        l: usize,
        a: &Attention,
        x: &Tensor,
        hooks: &mut Hooks,
        ctx: &Ctx,
        past_kv: Option<(Tensor, Tensor)>,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let c = &self.cfg;
        let (h, kvh, dh, d) = (c.n_heads, c.n_kv_heads, c.d_head, c.d_model);
        let hp = |bh| HookPoint::Block(l, bh);
        let (b, p, _) = x.dims3()?;
        let x2 = x.reshape((b * p, d))?;
        // Hooks on values that exist only inside the attention computation.
        let internals_wanted = BlockHook::ALL
            .into_iter()
            .filter(|bh| bh.is_attention())
            .filter(|bh| {
                !matches!(
                    bh,
                    BlockHook::Ln1Scale
                        | BlockHook::Ln1Normalized
                        | BlockHook::Z
                        | BlockHook::Result
                        | BlockHook::AttnOut
                )
            })
            .any(|bh| hooks.wants(hp(bh)));
        if let (Some(qkv), false, false, false, true) = (
            &a.qkv,
            ctx.grad,
            ctx.caching,
            internals_wanted,
            x.device().is_cpu(),
        ) {
            // Fast path: one fused kernel from the q/k/v projection to z.
            let y = qkv.forward(&x2)?.reshape((b, p, h + 2 * kvh, dh))?;
            let z = y.apply_op1_no_bwd(&crate::kernels::CausalAttention {
                n_heads: h,
                n_kv_heads: kvh,
                scale: 1.0 / (dh as f32).sqrt(),
                cos_sin: ctx
                    .cos_sin_data
                    .as_ref()
                    .map(|(c, s)| (c.as_slice(), s.as_slice())),
                real: &ctx.real,
            })?;
            let z = hooks.apply(hp(BlockHook::Z), z)?;
            return Ok((self.attention_output(l, a, z, hooks)?, None));
        }
        if let (Some(qkv), true, false, false) = (&a.qkv, ctx.grad, ctx.caching, internals_wanted) {
            let frozen = !qkv.w.track_op() && qkv.b.is_none();
            if frozen && x.device().is_cpu() && x.dtype() == DType::F32 {
                // Gradients that need no attention internals: the fused kernel forward, with
                // a backward pass of its own.
                let y = qkv.forward(&x2)?.reshape((b, p, h + 2 * kvh, dh))?;
                let z = y.apply_op1(crate::kernels::CausalAttentionGrad {
                    n_heads: h,
                    n_kv_heads: kvh,
                    scale: 1.0 / (dh as f32).sqrt(),
                    cos_sin: ctx.cos_sin_data.as_ref().map(|(c, s)| {
                        (
                            std::sync::Arc::new(c.clone()),
                            std::sync::Arc::new(s.clone()),
                        )
                    }),
                    real: std::sync::Arc::new(ctx.real.clone()),
                })?;
                let z = hooks.apply(hp(BlockHook::Z), z)?;
                return Ok((self.attention_output(l, a, z, hooks)?, None));
            }
        }
        let (q, k, v) = match &a.qkv {
            Some(qkv) => {
                // One matmul; q, k, v are head-slices of its output, [b, p, heads, dh] views.
                let y = qkv.forward(&x2)?.reshape((b, p, h + 2 * kvh, dh))?;
                (
                    y.narrow(2, 0, h)?,
                    y.narrow(2, h, kvh)?,
                    y.narrow(2, h + kvh, kvh)?,
                )
            }
            None => (
                a.q.forward(&x2)?.reshape((b, p, h, dh))?,
                a.k.forward(&x2)?.reshape((b, p, kvh, dh))?,
                a.v.forward(&x2)?.reshape((b, p, kvh, dh))?,
            ),
        };
        let q = hooks.apply(hp(BlockHook::Q), q)?;
        let k = hooks.apply(hp(BlockHook::K), k)?;
        let v = hooks.apply(hp(BlockHook::V), v)?;
        // Heads-major layout for the matmuls: [b, heads, p, dh].
        let mut q = q.transpose(1, 2)?.contiguous()?;
        let mut k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        if let (Some((cos, sin)), Some((cd, sd))) = (&ctx.cos_sin, &ctx.cos_sin_data) {
            let rope = |t: &Tensor| -> Result<Tensor> {
                if ctx.grad && frozen_cpu(t, None) {
                    Ok(t.apply_op1(crate::kernels::RopeGrad {
                        cos: std::sync::Arc::new(cd.clone()),
                        sin: std::sync::Arc::new(sd.clone()),
                        inverse: false,
                    })?)
                } else {
                    rotate(t, cos, sin, ctx.grad)
                }
            };
            q = rope(&q)?;
            k = rope(&k)?;
            for (t, bh) in [(&mut q, BlockHook::RotQ), (&mut k, BlockHook::RotK)] {
                if hooks.wants(hp(bh)) {
                    let r = hooks.apply(hp(bh), t.transpose(1, 2)?)?;
                    *t = r.transpose(1, 2)?.contiguous()?;
                }
            }
        }
        let (k, v) = match past_kv {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        let pk = k.dim(2)?;
        // Grouped-query attention without copying keys: the n_rep query heads that share a
        // key/value head are stacked along the position axis.
        let g = h / kvh;
        let qg = q.reshape((b, kvh, g * p, dh))?;
        let scores = (qg.matmul(&k.t()?)? * (1.0 / (dh as f64).sqrt()))?.reshape((b, h, p, pk))?;
        let scores = match &ctx.mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let scores = hooks.apply(hp(BlockHook::AttnScores), scores)?;
        let pattern = if ctx.grad && frozen_cpu(&scores, None) {
            scores
                .contiguous()?
                .apply_op1(crate::kernels::SoftmaxGrad)?
        } else if ctx.grad {
            softmax_differentiable(&scores)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let pattern = hooks.apply(hp(BlockHook::Pattern), pattern)?;
        let z = pattern
            .reshape((b, kvh, g * p, pk))?
            .matmul(&v)?
            .reshape((b, h, p, dh))?
            .transpose(1, 2)?; // [b, p, h, dh]
        let z = hooks.apply(hp(BlockHook::Z), z)?;
        let kv = if ctx.caching { Some((k, v)) } else { None };
        Ok((self.attention_output(l, a, z, hooks)?, kv))
    }

    /// The output projection of `z [b, p, h, dh]`, through per-head results when they are wanted.
    fn attention_output(
        &self,
        l: usize,
        a: &Attention,
        z: Tensor,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (h, dh, d) = (c.n_heads, c.d_head, c.d_model);
        let hp = |bh| HookPoint::Block(l, bh);
        let (b, p, _, _) = z.dims4()?;
        let out = if hooks.wants(hp(BlockHook::Result)) {
            // Per-head contributions: result[b,p,h,:] = z[b,p,h,:] W_O[:, h*dh..(h+1)*dh]ᵀ.
            let zh = z.permute((2, 0, 1, 3))?.reshape((h, b * p, dh))?;
            let wo =
                a.o.w
                    .reshape((d, h, dh))?
                    .permute((1, 2, 0))?
                    .contiguous()?; // [h, dh, d]
            let result = zh
                .matmul(&wo)?
                .reshape((h, b, p, d))?
                .permute((1, 2, 0, 3))?; // [b, p, h, d]
            let result = hooks.apply(hp(BlockHook::Result), result)?;
            let summed = result.sum(2)?;
            match &a.o.b {
                Some(bias) => summed.broadcast_add(bias)?,
                None => summed,
            }
        } else {
            a.o.forward(&z.reshape((b * p, h * dh))?)?
                .reshape((b, p, d))?
        };
        Ok(hooks.apply(hp(BlockHook::AttnOut), out)?)
    }

    /// # Shapes
    /// `x: [b, p, d]` → `[b, p, d]`
    fn mlp(&self, l: usize, m: &MlpW, x: &Tensor, hooks: &mut Hooks) -> Result<Tensor> {
        let c = &self.cfg;
        let hp = |bh| HookPoint::Block(l, bh);
        let (b, p, d) = x.dims3()?;
        let x2 = x.reshape((b * p, d))?;
        let act = match c.mlp {
            Some(Mlp::Gated { act } | Mlp::Standard { act }) => act,
            None => unreachable!("mlp() is only called for models with an MLP"),
        };
        let hooked = hooks.wants(hp(BlockHook::MlpPre)) || hooks.wants(hp(BlockHook::MlpPreLinear));
        let post = match (&m.gate_up, &m.gate) {
            (Some(gu), _)
                if act == Act::Silu
                    && !hooked
                    && (!x2.track_op() || frozen_cpu(&x2, Some(&gu.w))) =>
            {
                let y = gu.forward(&x2)?; // [b·p, 2·d_mlp]: gate then up
                let y = if y.track_op() {
                    y.apply_op1(crate::kernels::SwiGlu)?
                } else {
                    y.apply_op1_no_bwd(&crate::kernels::SwiGlu)?
                };
                y.reshape((b, p, c.d_mlp))?
            }
            (_, Some(gate)) => {
                let pre = gate.forward(&x2)?.reshape((b, p, c.d_mlp))?;
                let pre = hooks.apply(hp(BlockHook::MlpPre), pre)?;
                let lin = m.w_in.forward(&x2)?.reshape((b, p, c.d_mlp))?;
                let lin = hooks.apply(hp(BlockHook::MlpPreLinear), lin)?;
                (activation(&pre, act)? * lin)?
            }
            (_, None) => {
                let pre = m.w_in.forward(&x2)?.reshape((b, p, c.d_mlp))?;
                let pre = hooks.apply(hp(BlockHook::MlpPre), pre)?;
                activation(&pre, act)?
            }
        };
        let post = hooks.apply(hp(BlockHook::MlpPost), post)?;
        let out = m
            .w_out
            .forward(&post.reshape((b * p, c.d_mlp))?)?
            .reshape((b, p, d))?;
        Ok(hooks.apply(hp(BlockHook::MlpOut), out)?)
    }
}

fn activation(x: &Tensor, act: Act) -> Result<Tensor> {
    Ok(match act {
        Act::GeluTanh => x.gelu()?,
        Act::Gelu => x.gelu_erf()?,
        Act::Silu => x.silu()?,
        Act::Relu => x.relu()?,
    })
}

/// Softmax over the last axis from differentiable ops. Rows may hold -inf (masked) entries.
fn softmax_differentiable(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Rotary embedding in the half-split layout: `[x1, x2] → [x1 cos − x2 sin, x2 cos + x1 sin]`.
///
/// # Shapes
/// `x: [b, heads, p, dh]`, `cos`, `sin`: `[b, p, dh/2]`.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, grad: bool) -> Result<Tensor> {
    if !grad {
        return Ok(candle_nn::rotary_emb::rope(x, cos, sin)?);
    }
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let b = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Ok(Tensor::cat(&[&a, &b], D::Minus1)?)
}

/// Rotary inverse frequencies `θ^(−2i/dh)`, with optional rescaling, in f32 as Hugging Face
/// computes them.
pub fn rotary_inv_freq(theta: f64, d_head: usize, scaling: Option<&RopeScaling>) -> Vec<f32> {
    let base = theta as f32;
    let mut inv: Vec<f32> = (0..d_head / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / d_head as f32))
        .collect();
    match scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => {
            for f in &mut inv {
                *f /= *factor as f32;
            }
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = *original_max_position_embeddings as f32;
            let (factor, lo, hi) = (
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
            );
            let low_wavelen = old / lo;
            let high_wavelen = old / hi;
            for f in &mut inv {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - lo) / (hi - lo);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
    }
    inv
}
