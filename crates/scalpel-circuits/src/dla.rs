//! Direct logit attribution: which components write the answer directly.
//!
//! The final residual at a position is a sum: token embedding, positional embedding, every
//! head's output (`hook_result`), every attention output bias, every MLP output. With the final
//! normaliser's scale frozen at its value on this prompt, the normaliser is linear, so each part's
//! contribution to a logit (or a logit difference) is its normalised projection on the
//! unembedding direction; LayerNorm's mean subtraction is linear too and its bias is one more
//! part. The parts sum to the model's own logit (difference) exactly, up to f32 rounding.

use candle_core::{DType, Tensor};
use scalpel_core::{BlockHook, HookPoint};
use scalpel_models::config::Norm;
use scalpel_models::transformer::Model;
use serde::Serialize;

use crate::{CircuitError, Result};

/// One part of the residual and what it adds to the metric.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Part {
    /// `embed`, `pos_embed`, `L{l}H{h}`, `L{l} attn bias`, `L{l} mlp`, `ln_final bias`.
    pub name: String,
    pub value: f64,
}

/// The attribution of one metric at one position.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Attribution {
    pub position: usize,
    pub answer: u32,
    /// The token subtracted, for a logit difference.
    pub wrong: Option<u32>,
    pub parts: Vec<Part>,
    /// Σ parts.
    pub total: f64,
    /// The model's own logit (difference), for comparison with `total`.
    pub logit: f64,
}

impl Attribution {
    /// Parts sorted by absolute contribution, largest first.
    pub fn ranked(&self) -> Vec<&Part> {
        let mut v: Vec<&Part> = self.parts.iter().collect();
        v.sort_by(|a, b| b.value.abs().total_cmp(&a.value.abs()));
        v
    }
}

fn vec_at(t: &Tensor, idx: &[usize]) -> Result<Vec<f64>> {
    let mut x = t.clone();
    for &i in idx {
        x = x.get(i)?;
    }
    Ok(x.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// Attributes `logit(answer)` (minus `logit(wrong)` when given) at `position` (the last when
/// `None`) of `tokens` (`[1, p]` u32) to the parts of the final residual.
pub fn direct_logit_attribution(
    model: &Model,
    tokens: &Tensor,
    position: Option<usize>,
    answer: u32,
    wrong: Option<u32>,
) -> Result<Attribution> {
    let c = model.config();
    if tokens.dims().len() != 2 || tokens.dims()[0] != 1 {
        return Err(CircuitError::Input(format!(
            "direct logit attribution reads one prompt ([1, p] tokens), got shape {:?}",
            tokens.dims()
        )));
    }
    let p = tokens.dims()[1];
    let pos = position.unwrap_or(p.saturating_sub(1));
    if pos >= p {
        return Err(CircuitError::Input(format!(
            "position {pos} is past the prompt's {p} tokens"
        )));
    }
    for t in std::iter::once(answer).chain(wrong) {
        if t as usize >= c.d_vocab {
            return Err(CircuitError::Input(format!(
                "token {t} is outside the vocabulary of {}",
                c.d_vocab
            )));
        }
    }
    let mut wanted = vec![
        HookPoint::Embed,
        HookPoint::PosEmbed,
        HookPoint::LnFinalScale,
    ];
    for l in 0..c.n_layers {
        wanted.push(HookPoint::Block(l, BlockHook::Result));
        wanted.push(HookPoint::Block(l, BlockHook::MlpOut));
    }
    let filter = wanted.clone();
    let (logits, cache) = model.run_with_cache(tokens, move |hp| filter.contains(&hp))?;

    // The unembedding direction, folded with the final normaliser's weight.
    let w_u = model.w_u_rows();
    let mut dir = vec_at(w_u, &[answer as usize])?;
    if let Some(wr) = wrong {
        for (d, x) in dir.iter_mut().zip(vec_at(w_u, &[wr as usize])?) {
            *d -= x;
        }
    }
    let row = vec_at(&logits, &[0, pos])?;
    let logit = row[answer as usize] - wrong.map_or(0.0, |w| row[w as usize]);
    let ln = model.ln_final();
    let (scale, centre) = match (c.norm, ln) {
        (Norm::None, _) | (_, None) => (1.0, false),
        (norm, Some(_)) => {
            let s = cache.get(HookPoint::LnFinalScale).ok_or_else(|| {
                CircuitError::Input("the final norm's scale was not cached".into())
            })?;
            (vec_at(s, &[0, pos])?[0], norm == Norm::LayerNorm)
        }
    };
    let folded: Vec<f64> = match ln {
        Some(ln) if c.norm != Norm::None => {
            let w = ln.w.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            dir.iter().zip(&w).map(|(d, w)| d * w).collect()
        }
        _ => dir.clone(),
    };
    let project = |x: &[f64]| -> f64 {
        let mean = if centre {
            x.iter().sum::<f64>() / x.len() as f64
        } else {
            0.0
        };
        x.iter()
            .zip(&folded)
            .map(|(v, u)| (v - mean) * u)
            .sum::<f64>()
            / scale
    };

    let mut parts = Vec::new();
    let get = |hp: HookPoint| {
        cache
            .get(hp)
            .ok_or_else(|| CircuitError::Input(format!("{hp} was not cached")))
    };
    parts.push(Part {
        name: "embed".into(),
        value: project(&vec_at(get(HookPoint::Embed)?, &[0, pos])?),
    });
    if model.w_pos().is_some() {
        parts.push(Part {
            name: "pos_embed".into(),
            value: project(&vec_at(get(HookPoint::PosEmbed)?, &[0, pos])?),
        });
    }
    for (l, block) in model.blocks().iter().enumerate() {
        let result = get(HookPoint::Block(l, BlockHook::Result))?; // [1, p, h, d]
        for h in 0..c.n_heads {
            parts.push(Part {
                name: format!("L{l}H{h}"),
                value: project(&vec_at(result, &[0, pos, h])?),
            });
        }
        if let Some(b) = &block.attn.o.b {
            parts.push(Part {
                name: format!("L{l} attn bias"),
                value: project(&b.to_dtype(DType::F64)?.to_vec1::<f64>()?),
            });
        }
        if block.mlp.is_some() {
            parts.push(Part {
                name: format!("L{l} mlp"),
                value: project(&vec_at(
                    get(HookPoint::Block(l, BlockHook::MlpOut))?,
                    &[0, pos],
                )?),
            });
        }
    }
    if let (Some(ln), Norm::LayerNorm) = (ln, c.norm) {
        if let Some(b) = &ln.b {
            let b = b.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            parts.push(Part {
                name: "ln_final bias".into(),
                value: b.iter().zip(&dir).map(|(b, u)| b * u).sum(),
            });
        }
    }
    let total = parts.iter().map(|p| p.value).sum();
    Ok(Attribution {
        position: pos,
        answer,
        wrong,
        parts,
        total,
        logit,
    })
}
