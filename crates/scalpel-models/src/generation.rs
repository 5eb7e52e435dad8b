//! Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p, seed), stop
//! tokens, and hooks active at every step.

use candle_core::{Device, Tensor, D};
use rand::{Rng, SeedableRng};
use scalpel_core::Hooks;

use crate::transformer::{KvCache, Model};
use crate::{ModelError, Result};

/// How to choose each next token.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerateOptions {
    /// Most tokens to add.
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Sample only among the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities sum to `p` (nucleus).
    pub top_p: Option<f64>,
    /// Seed of the sampler; the same seed gives the same text.
    pub seed: u64,
    /// Generation ends after any of these tokens (it is included in the output).
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 32,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            stop_tokens: Vec::new(),
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// `max_new_tokens` were produced.
    Length,
    /// A stop token was produced.
    StopToken,
    /// The model's context is full.
    Context,
}

/// The result of [`generate`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    /// The new tokens only.
    pub tokens: Vec<u32>,
    pub stop_reason: StopReason,
}

/// Continues `prompt` (token ids). `on_token` sees each new token as soon as it is chosen (for
/// streaming output). Hook functions run at every step and see only that step's positions; their
/// `HookCtx::pos_offset` says where those positions start.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    opts: &GenerateOptions,
    hooks: &mut Hooks,
    mut on_token: impl FnMut(u32),
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(ModelError::Input(
            "empty prompt: generation needs at least one token".into(),
        ));
    }
    if opts.temperature < 0.0 || !opts.temperature.is_finite() {
        return Err(ModelError::Input(format!(
            "temperature must be a finite number >= 0, got {}",
            opts.temperature
        )));
    }
    if let Some(p) = opts.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ModelError::Input(format!(
                "top_p must be in (0, 1], got {p}"
            )));
        }
    }
    if opts.top_k == Some(0) {
        return Err(ModelError::Input("top_k must be at least 1".into()));
    }
    let n_ctx = model.config().n_ctx;
    if prompt.len() > n_ctx {
        return Err(ModelError::Input(format!(
            "prompt of {} tokens is longer than the model's context of {n_ctx}",
            prompt.len()
        )));
    }
    let dev: &Device = model.device();
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut cache = KvCache::default();
    let mut out = Vec::new();
    let mut input = Tensor::new(prompt, dev)?.unsqueeze(0)?;
    let mut stop_reason = StopReason::Length;
    while out.len() < opts.max_new_tokens {
        if cache.len() + input.dim(1)? > n_ctx {
            stop_reason = StopReason::Context;
            break;
        }
        let logits = model.forward_cached(&input, None, hooks, &mut cache)?;
        let last = logits.squeeze(0)?.get(logits.dim(1)? - 1)?; // [v]
        let next = choose(&last, opts, &mut rng)?;
        out.push(next);
        on_token(next);
        if opts.stop_tokens.contains(&next) {
            stop_reason = StopReason::StopToken;
            break;
        }
        input = Tensor::new(&[next], dev)?.unsqueeze(0)?;
    }
    Ok(Generation {
        tokens: out,
        stop_reason,
    })
}

/// Picks a token from logits `[v]`.
fn choose(logits: &Tensor, opts: &GenerateOptions, rng: &mut impl Rng) -> Result<u32> {
    if opts.temperature == 0.0 {
        return Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?);
    }
    let scaled: Vec<f32> = (logits / opts.temperature)?.to_vec1()?;
    let mut order: Vec<usize> = (0..scaled.len()).collect();
    order.sort_unstable_by(|&a, &b| scaled[b].total_cmp(&scaled[a]));
    if let Some(k) = opts.top_k {
        order.truncate(k.min(order.len()));
    }
    let max = scaled[order[0]];
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((scaled[i] - max) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = opts.top_p {
        // Keep the smallest prefix whose mass reaches top_p (always at least one token).
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let u: f64 = rng.gen();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return Ok(order[i] as u32);
        }
    }
    Ok(order[probs.len() - 1] as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(t: f64, k: Option<usize>, p: Option<f64>) -> GenerateOptions {
        GenerateOptions {
            temperature: t,
            top_k: k,
            top_p: p,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_is_argmax_and_top_k_1_is_greedy() {
        let l = Tensor::new(&[0.1f32, 3.0, 2.9, -1.0], &Device::Cpu).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        assert_eq!(choose(&l, &opts(0.0, None, None), &mut rng).unwrap(), 1);
        for _ in 0..20 {
            assert_eq!(choose(&l, &opts(1.0, Some(1), None), &mut rng).unwrap(), 1);
        }
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let l = Tensor::new(&[0.0f32, 3.0, 2.9, -1.0, 1.0], &Device::Cpu).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            seen.insert(choose(&l, &opts(1.0, Some(2), None), &mut rng).unwrap());
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 2]);
        // p(1) ≈ 0.49, p(2) ≈ 0.44: top_p 0.5 keeps tokens 1 and 2 only.
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            seen.insert(choose(&l, &opts(1.0, None, Some(0.5)), &mut rng).unwrap());
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 2]);
        // Sampling with no restriction reaches the tail.
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            seen.insert(choose(&l, &opts(1.0, None, None), &mut rng).unwrap());
        }
        assert_eq!(seen.len(), 5);
    }

    #[test]
    fn temperature_sharpens_the_distribution() {
        let l = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let count = |t: f64| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            (0..2000)
                .filter(|_| choose(&l, &opts(t, None, None), &mut rng).unwrap() == 1)
                .count()
        };
        // p(1) = 0.73 at T=1 and 0.99995 at T=0.1.
        let (warm, cold) = (count(1.0), count(0.1));
        assert!((1350..1570).contains(&warm), "{warm}");
        assert!(cold > 1990, "{cold}");
    }
}
