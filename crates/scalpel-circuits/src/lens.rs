//! The logit lens: what the model would predict if the residual stream after each block went
//! straight to the final normaliser and the unembedding.

use candle_core::{DType, Tensor};
use scalpel_core::HookPoint;
use scalpel_models::transformer::Model;
use serde::Serialize;

use crate::{CircuitError, Result};

/// A token and its probability.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub token: u32,
    pub prob: f64,
}

/// A chosen token's probability and rank (0 = the top prediction).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    pub token: u32,
    pub prob: f64,
    pub rank: usize,
}

/// The lens at one depth and position.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cell {
    /// 0: the embeddings (`blocks.0.hook_resid_pre`); `l ≥ 1`: after block `l − 1`
    /// (`blocks.{l-1}.hook_resid_post`).
    pub depth: usize,
    pub position: usize,
    pub top: Vec<Prediction>,
    pub targets: Vec<Target>,
}

/// The lens over every depth and position of one prompt, depth-major.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lens {
    pub depths: usize,
    pub positions: usize,
    pub cells: Vec<Cell>,
}

impl Lens {
    /// The cell at `depth`, `position`.
    pub fn cell(&self, depth: usize, position: usize) -> Option<&Cell> {
        (depth < self.depths && position < self.positions)
            .then(|| &self.cells[depth * self.positions + position])
    }
}

/// The hook whose residual is read at `depth`.
pub fn depth_hook(depth: usize) -> HookPoint {
    if depth == 0 {
        HookPoint::resid_pre(0)
    } else {
        HookPoint::resid_post(depth - 1)
    }
}

/// The logit lens of `tokens` (`[1, p]` u32): the `top_k` predictions and the probability and
/// rank of each of `targets` at every depth and position.
pub fn logit_lens(model: &Model, tokens: &Tensor, top_k: usize, targets: &[u32]) -> Result<Lens> {
    let c = model.config();
    if tokens.dims().len() != 2 || tokens.dims()[0] != 1 {
        return Err(CircuitError::Input(format!(
            "the logit lens reads one prompt ([1, p] tokens), got shape {:?}",
            tokens.dims()
        )));
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= c.d_vocab) {
        return Err(CircuitError::Input(format!(
            "target token {t} is outside the vocabulary of {}",
            c.d_vocab
        )));
    }
    let depths = c.n_layers + 1;
    let points: Vec<HookPoint> = (0..depths).map(depth_hook).collect();
    let wanted = points.clone();
    let (_, cache) = model.run_with_cache(tokens, move |hp| wanted.contains(&hp))?;
    let p = tokens.dims()[1];
    let mut cells = Vec::with_capacity(depths * p);
    for (depth, hp) in points.iter().enumerate() {
        let resid = cache
            .get(*hp)
            .ok_or_else(|| CircuitError::Input(format!("{hp} was not cached")))?;
        let logits = model
            .unembed_residual(resid)?
            .squeeze(0)?
            .to_dtype(DType::F64)?;
        for (position, row) in logits.to_vec2::<f64>()?.into_iter().enumerate() {
            let probs = softmax(&row);
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            let top = order
                .iter()
                .take(top_k)
                .map(|&i| Prediction {
                    token: i as u32,
                    prob: probs[i],
                })
                .collect();
            let targets = targets
                .iter()
                .map(|&t| Target {
                    token: t,
                    prob: probs[t as usize],
                    rank: probs.iter().filter(|&&q| q > probs[t as usize]).count(),
                })
                .collect();
            cells.push(Cell {
                depth,
                position,
                top,
                targets,
            });
        }
    }
    Ok(Lens {
        depths,
        positions: p,
        cells,
    })
}

fn softmax(row: &[f64]) -> Vec<f64> {
    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row.iter().map(|x| (x - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}
