//! `/api/explore` (the prompt explorer: next-token predictions, the logit-lens grid and the
//! latents that fire on each token, from one forward pass) and `/api/attention` (one layer's
//! attention patterns).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use candle_core::{DType, Device, Tensor};
use scalpel_circuits::lens::depth_hook;
use scalpel_core::{BlockHook, HookPoint, Hooks};
use scalpel_models::transformer::RunOptions;
use serde::{Deserialize, Serialize};

use super::extract::{check_count, model_error, ApiJson, Tok, TokProb};
use crate::state::AppState;
use crate::ApiError;

/// Most predictions per position a request may ask for.
const MAX_TOP_K: usize = 50;
/// Latents listed per position.
const LATENTS_PER_POSITION: usize = 5;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExploreRequest {
    text: String,
    #[serde(default = "default_top_k")]
    top_k: usize,
    /// Dictionary ids; all loaded ones when absent.
    dicts: Option<Vec<String>>,
}

fn default_top_k() -> usize {
    5
}

#[derive(Serialize)]
pub struct Explore {
    tokens: Vec<Tok>,
    /// Per position, the `top_k` most likely next tokens, best first.
    predictions: Vec<Vec<TokProb>>,
    lens: LensGrid,
    /// Per position, the strongest latents across the chosen dictionaries (activation > 0).
    latents: Vec<Vec<LatentAct>>,
}

/// The logit lens's top token at every depth (row) and position (column).
#[derive(Serialize)]
pub struct LensGrid {
    labels: Vec<String>,
    cells: Vec<Vec<TokProb>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatentAct {
    dict: String,
    latent: u32,
    act: f32,
}

pub async fn explore(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<ExploreRequest>,
) -> Result<Json<Explore>, ApiError> {
    let ids = state.tokenize(&req.text)?;
    let top_k = check_count("top_k", req.top_k, MAX_TOP_K)?;
    let dicts: Vec<usize> = match &req.dicts {
        None => (0..state.dicts.len()).collect(),
        Some(names) => {
            let mut chosen = Vec::new();
            for n in names {
                let i = state.dict_index(n)?;
                if !chosen.contains(&i) {
                    chosen.push(i);
                }
            }
            chosen
        }
    };
    let out = state
        .run_model(move |s| explore_job(s, &ids, top_k, &dicts).map_err(model_error))
        .await?;
    Ok(Json(out))
}

fn explore_job(s: &AppState, ids: &[u32], top_k: usize, dicts: &[usize]) -> crate::Result<Explore> {
    let c = s.model.config();
    let seq = ids.len();
    let depths: Vec<HookPoint> = (0..=c.n_layers).map(depth_hook).collect();
    let mut wanted = depths.clone();
    wanted.extend(s.dict_hooks(dicts)?);
    let input = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?; // [1, p]
    let (logits, cache) = s.model.run_with_cache(&input, |p| wanted.contains(&p))?;

    let logits = logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec2::<f32>()?; // [p, v]
                                                                             // Next-token predictions: the top logits, and their probabilities against the row's sum.
    let predictions = logits
        .iter()
        .map(|row| {
            let max = row_max(row);
            let sum = row_sum_exp(row, max) as f64;
            top_indices(row, top_k)
                .into_iter()
                .map(|i| s.tok_prob(i as u32, ((row[i] - max) as f64).exp() / sum))
                .collect()
        })
        .collect();

    // The lens: every depth's residual through the final norm, then the unembedding in blocks
    // small enough to stay in cache, each row keeping only its top token and probability.
    // The last depth, the final residual, is what the forward pass already unembedded: its row
    // of the grid comes from the logits.
    let (last, inner) = depths.split_last().expect("a model has at least one depth");
    let mut normed = Vec::with_capacity(inner.len() * seq * c.d_model);
    for hp in inner {
        let resid = cache
            .get(*hp)
            .ok_or_else(|| crate::Error::msg(format!("{hp} was not recorded")))?;
        let n = s.model.final_norm(resid)?.to_dtype(DType::F32)?;
        normed.extend(n.flatten_all()?.to_vec1::<f32>()?);
    }
    // The unembedding is read in place (it is 113 MB for SmolLM2); a copy only when it is not
    // contiguous f32 on the CPU.
    let w = s.model.w_u_rows();
    let mut tops = {
        let (storage, layout) = w.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((a, b))) => {
                lens_tops(&normed, &data[a..b], c.d_model, c.d_vocab)
            }
            _ => {
                drop(storage);
                let copy = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                lens_tops(&normed, &copy, c.d_model, c.d_vocab)
            }
        }
    };
    debug_assert_eq!(*last, depth_hook(c.n_layers));
    tops.extend(logits.iter().map(|row| {
        let max = row_max(row);
        let id = row.iter().position(|&x| x == max).unwrap_or(0);
        (id, 1.0 / row_sum_exp(row, max) as f64)
    }));
    let cells = tops
        .chunks(seq)
        .map(|row| {
            row.iter()
                .map(|&(id, prob)| s.tok_prob(id as u32, prob))
                .collect()
        })
        .collect();
    let mut labels = vec!["resid_pre 0".to_string()];
    labels.extend((0..c.n_layers).map(|l| format!("resid_post {l}")));

    let codes = s.encode_cached(&cache, seq, dicts)?;
    let mut latents: Vec<Vec<LatentAct>> = vec![Vec::new(); seq];
    for (&d, code) in dicts.iter().zip(&codes) {
        let id = &s.dicts[d].id;
        for (pos, row) in code.to_vec2::<f32>()?.iter().enumerate() {
            for i in top_indices(row, LATENTS_PER_POSITION) {
                if row[i] > 0.0 {
                    latents[pos].push(LatentAct {
                        dict: id.clone(),
                        latent: i as u32,
                        act: row[i],
                    });
                }
            }
        }
    }
    for l in &mut latents {
        l.sort_by(|a, b| b.act.total_cmp(&a.act));
        l.truncate(LATENTS_PER_POSITION);
    }
    Ok(Explore {
        tokens: s.toks(ids),
        predictions,
        lens: LensGrid { labels, cells },
        latents,
    })
}

/// The lens works on tiles of `LENS_TILE_ROWS` rows × `LENS_TILE_VOCAB` tokens, shared out over
/// the cores; within a tile, products of `LENS_BLOCK_VOCAB` tokens leave a `[512, 512]` block of
/// logits (1 MiB) in cache while its rows' running maxima and sums are updated.
const LENS_TILE_ROWS: usize = 512;
const LENS_TILE_VOCAB: usize = 4096;
const LENS_BLOCK_VOCAB: usize = 512;

/// The largest logit of a tile row, where it is, and `Σ exp(logit − max)` over the tile.
#[derive(Clone, Copy)]
struct Partial {
    id: usize,
    max: f32,
    sum: f64,
}

impl Partial {
    const EMPTY: Partial = Partial {
        id: 0,
        max: f32::NEG_INFINITY,
        sum: 0.0,
    };

    /// Both partials summed against the larger maximum (ties keep the lower token id).
    fn merge(self, o: Partial) -> Partial {
        let (hi, lo) = if o.max > self.max || (o.max == self.max && o.id < self.id) {
            (o, self)
        } else {
            (self, o)
        };
        let scaled = if lo.max.is_finite() {
            lo.sum * ((lo.max - hi.max) as f64).exp()
        } else {
            0.0
        };
        Partial {
            id: hi.id,
            max: hi.max,
            sum: hi.sum + scaled,
        }
    }
}

/// Largest value of a row, in 16 independent lanes the compiler can vectorise.
fn row_max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for l in 0..16 {
            acc[l] = acc[l].max(c[l]);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    acc.iter().copied().fold(tail, f32::max)
}

/// `Σ exp(x − max)` over a row (every `x ≤ max`), in 16 lanes.
fn row_sum_exp(row: &[f32], max: f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for l in 0..16 {
            acc[l] += exp_nonpositive(c[l] - max);
        }
    }
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|&x| exp_nonpositive(x - max))
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// The top token and its probability for each row of `x [rows, d]` through the unembedding
/// `w_u [v, d]`: `p(top) = 1 / Σ exp(logit − max)`, with the maximum and the sum kept running
/// over vocabulary blocks and merged across tiles, so the `[rows, v]` logits are never held at
/// once.
fn lens_tops(x: &[f32], w_u: &[f32], d: usize, v: usize) -> Vec<(usize, f64)> {
    use rayon::prelude::*;
    let rows = x.len() / d;
    let row_tiles = rows.div_ceil(LENS_TILE_ROWS);
    let vocab_tiles = v.div_ceil(LENS_TILE_VOCAB);
    let tiles: Vec<Vec<Partial>> = (0..row_tiles * vocab_tiles)
        .into_par_iter()
        .map(|t| {
            let (rt, vt) = (t / vocab_tiles, t % vocab_tiles);
            let r0 = rt * LENS_TILE_ROWS;
            let m = LENS_TILE_ROWS.min(rows - r0);
            let xb = &x[r0 * d..(r0 + m) * d];
            let mut part = vec![Partial::EMPTY; m];
            let mut logits = vec![0f32; m * LENS_BLOCK_VOCAB];
            let end = ((vt + 1) * LENS_TILE_VOCAB).min(v);
            for v0 in (vt * LENS_TILE_VOCAB..end).step_by(LENS_BLOCK_VOCAB) {
                let n = LENS_BLOCK_VOCAB.min(end - v0);
                let wb = &w_u[v0 * d..(v0 + n) * d];
                let out = &mut logits[..m * n];
                // out[i, j] = Σ_k xb[i, k] · wb[j, k]
                scalpel_core::gemm::matmul(
                    m,
                    n,
                    d,
                    out,
                    false,
                    (xb, 1, d as isize),
                    (wb, d as isize, 1),
                );
                for (p, row) in part.iter_mut().zip(out.chunks(n)) {
                    let max = row_max(row);
                    let id = v0 + row.iter().position(|&x| x == max).unwrap_or(0);
                    let block = Partial {
                        id,
                        max,
                        sum: row_sum_exp(row, max) as f64,
                    };
                    *p = p.merge(block);
                }
            }
            part
        })
        .collect();
    (0..rows)
        .map(|r| {
            let (rt, i) = (r / LENS_TILE_ROWS, r % LENS_TILE_ROWS);
            let p = (0..vocab_tiles)
                .map(|vt| tiles[rt * vocab_tiles + vt][i])
                .fold(Partial::EMPTY, Partial::merge);
            (p.id, 1.0 / p.sum)
        })
        .collect()
}

/// Probabilities of a row of logits, in f64.
#[cfg(test)]
fn softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = row.iter().map(|&x| (x as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|x| x / sum).collect()
}

/// `e^x` for `x ≤ 0` to about 2e-7 relative error, in plain arithmetic the compiler vectorises
/// (the library `exp` is a call per element, and the lens sums tens of millions of them).
/// `e^x = 2^n · e^r` with `n = round(x / ln 2)` and `|r| ≤ ln(2) / 2`; `e^r` by its Taylor series
/// to degree 6 (remainder below `0.35^7 / 7! ≈ 1.3e-7`); `2^n` written into the exponent bits.
fn exp_nonpositive(x: f32) -> f32 {
    // Below this, e^x is under f32's smallest normal number: call it 0.
    const FLOOR: f32 = -87.0;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer without a library call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(FLOOR);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    // ln 2 in two parts (the first, 355/512, exact in a few bits) so `n · ln 2` loses nothing
    // to rounding.
    let r = (x - n * (355.0 / 512.0)) - n * -2.121_944_4e-4;
    let p = 1.0
        + r * (1.0
            + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r / 720.0)))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
pub(super) fn top_indices<T: PartialOrd + Copy>(values: &[T], k: usize) -> Vec<usize> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    let desc = |a: &usize, b: &usize| {
        values[*b]
            .partial_cmp(&values[*a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(b))
    };
    let mut idx: Vec<usize> = (0..values.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, desc);
        idx.truncate(k);
    }
    idx.sort_by(desc);
    idx
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionRequest {
    text: String,
    layer: usize,
}

#[derive(Serialize)]
pub struct Attention {
    tokens: Vec<Tok>,
    layer: usize,
    n_heads: usize,
    /// `[head][query][key]`: row `q` is how query `q` spreads its attention over keys `0..=q`.
    patterns: Vec<Vec<Vec<f32>>>,
}

pub async fn attention(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<AttentionRequest>,
) -> Result<Json<Attention>, ApiError> {
    let ids = state.tokenize(&req.text)?;
    let n_layers = state.model.config().n_layers;
    if req.layer >= n_layers {
        return Err(ApiError::bad_request(format!(
            "layer {} is out of range: the model has layers 0..={}",
            req.layer,
            n_layers - 1
        )));
    }
    let layer = req.layer;
    let out = state
        .run_model(move |s| attention_job(s, &ids, layer).map_err(model_error))
        .await?;
    Ok(Json(out))
}

fn attention_job(s: &AppState, ids: &[u32], layer: usize) -> crate::Result<Attention> {
    let hp = HookPoint::block(layer, BlockHook::Pattern);
    let input = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    let mut hooks = Hooks::new().with_cache_points([hp]);
    // Nothing above the layer is needed.
    let opts = RunOptions {
        stop_at_layer: Some(layer + 1),
        ..Default::default()
    };
    s.model.forward_with(&input, None, &mut hooks, opts)?;
    let pattern = hooks
        .take_cache()
        .remove(hp)
        .ok_or_else(|| crate::Error::msg(format!("{hp} was not recorded")))?;
    let patterns = pattern.squeeze(0)?.to_dtype(DType::F32)?.to_vec3::<f32>()?; // [h, q, k]
    Ok(Attention {
        tokens: s.toks(ids),
        layer,
        n_heads: patterns.len(),
        patterns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_nonpositive_matches_exp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -(i as f32) * 87.0 / 200_000.0;
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-1000.0), exp_nonpositive(-87.0));
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn lens_tops_equal_a_full_softmax() {
        // Rows across several row and vocabulary blocks (the last of each partial), with the
        // maximum landing in different blocks.
        use rand::{Rng, SeedableRng};
        let (rows, d, v) = (
            LENS_TILE_ROWS + 7,
            24,
            LENS_TILE_VOCAB + 2 * LENS_BLOCK_VOCAB + 300,
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let x: Vec<f32> = (0..rows * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let w: Vec<f32> = (0..v * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let tops = lens_tops(&x, &w, d, v);
        assert_eq!(tops.len(), rows);
        let mut blocks_of_top = std::collections::HashSet::new();
        for (r, &(top, p)) in tops.iter().enumerate() {
            let logits: Vec<f32> = (0..v)
                .map(|j| (0..d).map(|k| x[r * d + k] * w[j * d + k]).sum())
                .collect();
            let probs = softmax(&logits);
            let want = top_indices(&probs, 1)[0];
            assert_eq!(top, want, "row {r}");
            assert!(
                (p - probs[want]).abs() < 1e-5 * probs[want].max(1e-3),
                "row {r}: {p} vs {}",
                probs[want]
            );
            blocks_of_top.insert(top / LENS_BLOCK_VOCAB);
        }
        assert!(blocks_of_top.len() > 1, "every maximum fell in one block");
    }

    #[test]
    fn top_indices_orders_and_breaks_ties_by_index() {
        assert_eq!(top_indices(&[1.0, 5.0, 3.0, 5.0, 0.0], 3), vec![1, 3, 2]);
        assert_eq!(top_indices(&[1.0, 2.0], 5), vec![1, 0]);
        assert!(top_indices::<f32>(&[], 3).is_empty());
        assert!(top_indices(&[1.0], 0).is_empty());
    }
}
