//! Head detectors: previous-token, duplicate-token and induction (prefix-matching) scores of
//! every head, on sequences of a random half repeated once (TransformerLens's conventions; the
//! toy-model experiments use the same definitions).

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use scalpel_core::{BlockHook, HookPoint};
use scalpel_models::transformer::Model;
use serde::Serialize;

use crate::{CircuitError, Result};

/// Attention patterns `[b, h, p, p]` as f32 data with their dims.
fn pattern_data(pattern: &Tensor) -> Result<(Vec<f32>, usize, usize, usize)> {
    let (b, h, p, pk) = pattern.dims4()?;
    if p != pk {
        return Err(CircuitError::Input(format!(
            "attention pattern must be square in positions, got [{b}, {h}, {p}, {pk}]"
        )));
    }
    let data = pattern
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((data, b, h, p))
}

/// Mean over the batch and `queries` of the attention from query `i` to key `key(i)`, per head.
fn mean_attention(
    pattern: &Tensor,
    queries: std::ops::Range<usize>,
    key: impl Fn(usize) -> usize,
) -> Result<Vec<f64>> {
    let (data, b, h, p) = pattern_data(pattern)?;
    if queries.end > p || queries.is_empty() {
        return Err(CircuitError::Input(format!(
            "query positions {queries:?} do not fit a pattern over {p} positions"
        )));
    }
    let n = (b * queries.len()) as f64;
    Ok((0..h)
        .map(|hh| {
            let mut s = 0.0;
            for bb in 0..b {
                let base = (bb * h + hh) * p * p;
                for i in queries.clone() {
                    s += data[base + i * p + key(i)] as f64;
                }
            }
            s / n
        })
        .collect())
}

/// Previous-token score of each head of a pattern `[b, h, p, p]`: mean attention from position
/// `i` to `i − 1` over `i ≥ 1`.
pub fn prev_token_scores(pattern: &Tensor) -> Result<Vec<f64>> {
    let p = pattern.dim(2)?;
    mean_attention(pattern, 1..p, |i| i - 1)
}

/// Induction (prefix-matching) score of each head of a pattern `[b, h, 2·half, 2·half]`: mean,
/// over second-half queries `i ∈ half..2·half`, of the attention to `i − (half − 1)`, the token
/// after the previous occurrence of the current token (TransformerLens's convention).
pub fn induction_scores(pattern: &Tensor, half: usize) -> Result<Vec<f64>> {
    let p = pattern.dim(2)?;
    if p != 2 * half || half < 2 {
        return Err(CircuitError::Input(format!(
            "an induction pattern over {p} positions needs half = p/2 ≥ 2, got half = {half}"
        )));
    }
    mean_attention(pattern, half..p, |i| i - (half - 1))
}

/// The scores of uniform causal attention (query `i` gives `1/(i+1)` to each key): the chance
/// level of the previous-token and the induction score for sequences of `2·half`.
pub fn chance_scores(half: usize) -> (f64, f64) {
    let p = 2 * half;
    let prev = (1..p).map(|i| 1.0 / (i + 1) as f64).sum::<f64>() / (p - 1) as f64;
    let ind = (half..p).map(|i| 1.0 / (i + 1) as f64).sum::<f64>() / half as f64;
    (prev, ind)
}

/// Duplicate-token score of each head of a pattern `[b, h, 2·half, 2·half]`: mean, over
/// second-half queries `i`, of the attention to `i − half`, the earlier copy of the same token.
pub fn duplicate_token_scores(pattern: &Tensor, half: usize) -> Result<Vec<f64>> {
    let p = pattern.dim(2)?;
    if p != 2 * half || half < 2 {
        return Err(CircuitError::Input(format!(
            "a repeated-sequence pattern over {p} positions needs half = p/2 ≥ 2, got half = {half}"
        )));
    }
    mean_attention(pattern, half..p, |i| i - half)
}

/// `n` rows of `half` tokens drawn uniformly from `lo..hi`, each followed by itself: `[n, 2·half]`.
pub fn repeated_random_tokens(
    lo: u32,
    hi: u32,
    half: usize,
    n: usize,
    seed: u64,
) -> Result<Tensor> {
    if hi <= lo + 1 || half < 2 || n == 0 {
        return Err(CircuitError::Input(format!(
            "need a token range of at least 2 ids, half ≥ 2 and n ≥ 1 (got {lo}..{hi}, {half}, {n})"
        )));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = Vec::with_capacity(n * 2 * half);
    for _ in 0..n {
        let row: Vec<u32> = (0..half).map(|_| rng.gen_range(lo..hi)).collect();
        data.extend_from_slice(&row);
        data.extend_from_slice(&row);
    }
    Ok(Tensor::from_vec(data, (n, 2 * half), &Device::Cpu)?)
}

/// Every head's scores, `[layer][head]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeadScores {
    pub previous_token: Vec<Vec<f64>>,
    pub duplicate_token: Vec<Vec<f64>>,
    pub induction: Vec<Vec<f64>>,
    /// What uniform causal attention scores (previous-token, induction).
    pub chance: (f64, f64),
}

/// The scores of every head of `model` on `tokens` (`[n, 2·half]`, a half repeated once).
pub fn head_scores(model: &Model, tokens: &Tensor, half: usize) -> Result<HeadScores> {
    let l = model.config().n_layers;
    let points: Vec<HookPoint> = (0..l)
        .map(|i| HookPoint::Block(i, BlockHook::Pattern))
        .collect();
    let wanted = points.clone();
    let (_, cache) = model.run_with_cache(tokens, move |hp| wanted.contains(&hp))?;
    let mut out = HeadScores {
        previous_token: Vec::new(),
        duplicate_token: Vec::new(),
        induction: Vec::new(),
        chance: chance_scores(half),
    };
    for hp in points {
        let pat = cache
            .get(hp)
            .ok_or_else(|| CircuitError::Input(format!("{hp} was not cached")))?;
        out.previous_token.push(prev_token_scores(pat)?);
        out.duplicate_token.push(duplicate_token_scores(pat, half)?);
        out.induction.push(induction_scores(pat, half)?);
    }
    Ok(out)
}
