//! Grokking of modular addition (Power et al. 2022; Nanda et al. 2023, "Progress measures for
//! grokking via mechanistic interpretability", arXiv 2301.05217).
//!
//! A one-layer transformer without normalisers learns `a + b mod p` from 30% of all pairs, full
//! batch, AdamW with strong weight decay. It first memorises the training pairs (train accuracy
//! 1, test at chance), then, long after, generalises. Inside, the generalising circuit is sparse
//! in the Fourier basis of Z_p: a handful of key frequencies carry the embedding, and the logits
//! are built from cos(w_k(a + b − c)). The progress measures here follow the paper: restricted
//! loss (keep only the key-frequency part of the logits), excluded loss (remove it), Gini
//! coefficients of the Fourier spectra, and the total squared weight norm.

pub mod report;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::optim::AdamWConfig;
use crate::transformer::{per_row_loss, Init, Trainable};
use crate::{checkpoint, Result, ToyError};
use scalpel_models::config::{Act, Config, Mlp, Norm, Pos};

/// Settings of a grokking run. `Default` is the paper's setting (p = 113, 30% of pairs, d_model
/// 128, 4 heads, d_mlp 512, AdamW lr 1e-3, weight decay 1, betas (0.9, 0.98)) for 20,000 epochs
/// (the paper trains 40,000; it has grokked by ~14,000); [`GrokConfig::quick`] is a small one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrokConfig {
    /// The modulus; tokens are 0..p and "=" is token p.
    pub p: usize,
    /// Fraction of all p² pairs used for training.
    pub frac_train: f64,
    pub d_model: usize,
    pub n_heads: usize,
    pub d_mlp: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Linear learning-rate warm-up, in steps (the rate is 0 at step 0, as the reference).
    pub warmup: usize,
    /// Full-batch steps.
    pub epochs: usize,
    pub seed: u64,
    /// Evaluate the test set and the progress measures every this many epochs.
    pub eval_every: usize,
    /// Save a checkpoint every this many epochs (a multiple of `eval_every`).
    pub checkpoint_every: usize,
    /// Train on randomly permuted labels: nothing to generalise, only memorisation (the control
    /// for `scalpel diagnose`).
    pub shuffle_labels: bool,
}

impl Default for GrokConfig {
    fn default() -> Self {
        GrokConfig {
            p: 113,
            frac_train: 0.3,
            d_model: 128,
            n_heads: 4,
            d_mlp: 512,
            lr: 1e-3,
            weight_decay: 1.0,
            beta1: 0.9,
            beta2: 0.98,
            warmup: 10,
            epochs: 20_000,
            seed: 0,
            eval_every: 100,
            checkpoint_every: 500,
            shuffle_labels: false,
        }
    }
}

impl GrokConfig {
    /// A small run that memorises, then groks, in about 1,000 epochs (well under a minute on 2
    /// cores): p = 31, half the pairs for training, d_model 64, d_mlp 256, lr 2e-3.
    pub fn quick() -> Self {
        GrokConfig {
            p: 31,
            frac_train: 0.5,
            d_model: 64,
            n_heads: 4,
            d_mlp: 256,
            lr: 2e-3,
            epochs: 2000,
            eval_every: 25,
            checkpoint_every: 100,
            ..Default::default()
        }
    }

    /// Rejects settings that cannot run, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ToyError::Config(m));
        if self.p < 3 {
            return bad(format!("p must be at least 3, got {}", self.p));
        }
        if !(self.frac_train > 0.0 && self.frac_train < 1.0) {
            return bad(format!(
                "frac_train must lie in (0, 1), got {}",
                self.frac_train
            ));
        }
        if self.d_model == 0 || self.n_heads == 0 || self.d_mlp == 0 {
            return bad("d_model, n_heads and d_mlp must be positive".into());
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return bad(format!(
                "d_model ({}) must be a multiple of n_heads ({})",
                self.d_model, self.n_heads
            ));
        }
        if self.epochs == 0 || self.eval_every == 0 || self.checkpoint_every == 0 {
            return bad("epochs, eval_every and checkpoint_every must be positive".into());
        }
        checkpoint::check_cadence(self.eval_every, self.checkpoint_every)?;
        self.adam().validate()
    }

    fn adam(&self) -> AdamWConfig {
        AdamWConfig::new(self.lr, self.beta1, self.beta2, self.weight_decay)
    }

    /// The transformer: one layer, no normaliser, learned positions, ReLU MLP with biases,
    /// attention without biases, untied unembedding.
    pub fn model_config(&self) -> Config {
        Config {
            family: "toy".into(),
            d_model: self.d_model,
            n_layers: 1,
            n_heads: self.n_heads,
            n_kv_heads: self.n_heads,
            d_head: self.d_model / self.n_heads,
            d_mlp: self.d_mlp,
            d_vocab: self.p + 1,
            n_ctx: 3,
            norm: Norm::None,
            norm_eps: 1e-5,
            pos: Pos::Learned,
            mlp: Some(Mlp::Standard { act: Act::Relu }),
            qkv_bias: false,
            attn_out_bias: false,
            mlp_bias: true,
            tied_embeddings: false,
            final_norm: false,
        }
    }

    /// Builds the model from the seed (weights N(0, 1/d_model), biases 0) with its optimiser.
    pub fn build(&self) -> Result<Trainable> {
        let std = 1.0 / (self.d_model as f64).sqrt();
        Trainable::new(
            self.model_config(),
            self.seed,
            |name, _| {
                if name.ends_with(".b") {
                    Init::Zeros
                } else {
                    Init::Normal(std)
                }
            },
            self.adam(),
        )
    }
}

/// The data: every pair, split by a seeded shuffle.
pub struct Dataset {
    pub p: usize,
    /// `[n, 3]` token rows `a b =`, train then test.
    pub train_tokens: Tensor,
    pub test_tokens: Tensor,
    pub train_labels: Vec<u32>,
    pub test_labels: Vec<u32>,
    /// Pair index `a·p + b` of each row.
    pub train_pairs: Vec<usize>,
    pub test_pairs: Vec<usize>,
}

impl Dataset {
    /// All p² pairs, `frac_train` of them for training; with `shuffle_labels` the training
    /// labels are permuted among the training rows.
    pub fn new(cfg: &GrokConfig) -> Result<Self> {
        let p = cfg.p;
        let mut pairs: Vec<usize> = (0..p * p).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed ^ 0x5eed_da7a);
        pairs.shuffle(&mut rng);
        let n_train = ((p * p) as f64 * cfg.frac_train).round() as usize;
        let (train, test) = pairs.split_at(n_train.clamp(1, p * p - 1));
        let tokens = |rows: &[usize]| -> Result<Tensor> {
            let data: Vec<u32> = rows
                .iter()
                .flat_map(|&i| [(i / p) as u32, (i % p) as u32, p as u32])
                .collect();
            Ok(Tensor::from_vec(data, (rows.len(), 3), &Device::Cpu)?)
        };
        let labels = |rows: &[usize]| -> Vec<u32> {
            rows.iter().map(|&i| ((i / p + i % p) % p) as u32).collect()
        };
        let mut train_labels = labels(train);
        if cfg.shuffle_labels {
            train_labels.shuffle(&mut rng);
        }
        Ok(Dataset {
            p,
            train_tokens: tokens(train)?,
            test_tokens: tokens(test)?,
            train_labels,
            test_labels: labels(test),
            train_pairs: train.to_vec(),
            test_pairs: test.to_vec(),
        })
    }

    /// Every pair in order `a·p + b`, `[p², 3]`.
    pub fn all_tokens(&self) -> Result<Tensor> {
        let p = self.p;
        let data: Vec<u32> = (0..p * p)
            .flat_map(|i| [(i / p) as u32, (i % p) as u32, p as u32])
            .collect();
        Ok(Tensor::from_vec(data, (p * p, 3), &Device::Cpu)?)
    }
}

/// Logits at the last position, `[n, p]` (the "=" token's own logit column dropped).
pub fn answer_logits(model: &Trainable, tokens: &Tensor, p: usize) -> Result<Tensor> {
    let logits = model.model.forward(tokens)?; // [n, 3, p+1]
    Ok(logits.narrow(1, 2, 1)?.squeeze(1)?.narrow(1, 0, p)?)
}

/// Loss and accuracy of `[n, p]` logits against labels.
pub fn loss_and_accuracy(logits: &Tensor, labels: &[u32]) -> Result<(f64, f64)> {
    let losses = per_row_loss(logits, labels)?;
    let pred = logits.argmax(1)?.to_vec1::<u32>()?;
    let n = labels.len().max(1) as f64;
    let correct = pred.iter().zip(labels).filter(|(a, b)| a == b).count() as f64;
    Ok((losses.iter().sum::<f64>() / n, correct / n))
}

/// The real Fourier basis of Z_p, one unit-norm basis function per row `[p, p]`: the constant,
/// then cos(w_k x) and sin(w_k x) for k = 1..=(p−1)/2 (w_k = 2πk/p), in that interleaved order.
pub fn fourier_basis(p: usize) -> Vec<Vec<f64>> {
    let mut rows = vec![vec![1.0 / (p as f64).sqrt(); p]];
    for k in 1..=(p - 1) / 2 {
        for f in [f64::cos, f64::sin] {
            let v: Vec<f64> = (0..p)
                .map(|x| f(2.0 * std::f64::consts::PI * (k * x) as f64 / p as f64))
                .collect();
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            rows.push(v.into_iter().map(|x| x / n).collect());
        }
    }
    // An even p has a last cos(πx) component.
    if p.is_multiple_of(2) {
        let v: Vec<f64> = (0..p)
            .map(|x| if x % 2 == 0 { 1.0 } else { -1.0 } / (p as f64).sqrt())
            .collect();
        rows.push(v);
    }
    rows
}

/// The energy `‖cos_k‖² + ‖sin_k‖²` of each frequency k = 1..=(p−1)/2 in a matrix whose rows are
/// indexed by residues (`m: [p][cols]`), in the Fourier basis over the rows.
pub fn frequency_energy(m: &[Vec<f64>], p: usize) -> Vec<f64> {
    let basis = fourier_basis(p);
    let cols = m.first().map_or(0, |r| r.len());
    let coeff_norm2 = |b: &[f64]| -> f64 {
        (0..cols)
            .map(|c| {
                let s: f64 = b.iter().zip(m).map(|(bx, row)| bx * row[c]).sum();
                s * s
            })
            .sum()
    };
    (1..=(p - 1) / 2)
        .map(|k| coeff_norm2(&basis[2 * k - 1]) + coeff_norm2(&basis[2 * k]))
        .collect()
}

/// Gini coefficient of non-negative values (0 = all equal, → 1 = one value holds everything).
pub fn gini(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().map(|x| x.abs()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let total: f64 = v.iter().sum();
    if v.is_empty() || total == 0.0 {
        return 0.0;
    }
    let weighted: f64 = v
        .iter()
        .enumerate()
        .map(|(i, x)| (i as f64 + 1.0) * x)
        .sum();
    (2.0 * weighted) / (n * total) - (n + 1.0) / n
}

/// Frequencies (1-based k) ordered by energy, with each one's share of the total.
pub fn ranked_frequencies(energy: &[f64]) -> Vec<(usize, f64)> {
    let total: f64 = energy.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    let mut v: Vec<(usize, f64)> = energy
        .iter()
        .enumerate()
        .map(|(i, e)| (i + 1, e / total))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// The key frequencies of an embedding spectrum: those holding at least `factor` times the
/// share a flat spectrum would give each frequency (3× by default), most energetic first.
pub fn key_frequencies(energy: &[f64], factor: f64) -> Vec<usize> {
    let flat = 1.0 / energy.len().max(1) as f64;
    ranked_frequencies(energy)
        .into_iter()
        .filter(|&(_, s)| s >= factor * flat)
        .map(|(k, _)| k)
        .collect()
}

/// Rows of a `[rows, cols]` tensor as f64 vectors.
fn rows_f64(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_vec2::<f64>()?)
}

/// What the model computes, measured from the inside at one checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    /// Energy of each frequency k = 1..=(p−1)/2 in the token embedding of the residues.
    pub embed_energy: Vec<f64>,
    /// Same for the neuron→logit map `W_out W_U` over the output residue.
    pub logit_map_energy: Vec<f64>,
    pub gini_embed: f64,
    pub gini_logit_map: f64,
    /// Share of the embedding energy in the `top_k` strongest frequencies.
    pub top_share: f64,
    pub top_k: usize,
    /// Train loss with the logits restricted to the key frequencies' directions (plus the mean).
    pub restricted_loss: f64,
    /// Train loss with the key frequencies' directions removed from the logits.
    pub excluded_loss: f64,
    /// Σ of every parameter squared.
    pub weight_norm2: f64,
}

/// Progress measures of `model` on `data`, with `key` the key frequencies (1-based).
pub fn progress(
    model: &Trainable,
    data: &Dataset,
    key: &[usize],
    top_k: usize,
) -> Result<Progress> {
    let p = data.p;
    let w_e = model.model.w_e().narrow(0, 0, p)?; // [p, d]
    let embed_energy = frequency_energy(&rows_f64(&w_e)?, p);
    // Neuron → logit map over the residues: W_U[:p] W_out, as [p (output), d_mlp].
    let mlp = model.model.blocks()[0]
        .mlp
        .as_ref()
        .ok_or_else(|| ToyError::Config("grokking model without an MLP".into()))?;
    let w_u = model.model.w_u_rows().narrow(0, 0, p)?; // [p, d]
    let w_l = w_u.matmul(&mlp.w_out.w)?; // [p, d_mlp]
    let logit_map_energy = frequency_energy(&rows_f64(&w_l)?, p);
    let ranked = ranked_frequencies(&embed_energy);
    let top_share = ranked.iter().take(top_k).map(|x| x.1).sum();

    let all = answer_logits(model, &data.all_tokens()?, p)?;
    let all = rows_f64(&all)?; // [p², p]
    let (restricted, excluded) = split_logits(&all, p, key);
    let train_rows = |m: &[Vec<f64>]| -> f64 {
        let mut s = 0.0;
        for (&i, &t) in data.train_pairs.iter().zip(&data.train_labels) {
            let row = &m[i];
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = row.iter().map(|x| (x - max).exp()).sum::<f64>().ln() + max;
            s += lse - row[t as usize];
        }
        s / data.train_pairs.len().max(1) as f64
    };
    let mut weight_norm2 = 0.0;
    for (_, v) in model.opt.vars() {
        weight_norm2 += v.as_tensor().sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(Progress {
        gini_embed: gini(&embed_energy.iter().map(|e| e.sqrt()).collect::<Vec<_>>()),
        gini_logit_map: gini(
            &logit_map_energy
                .iter()
                .map(|e| e.sqrt())
                .collect::<Vec<_>>(),
        ),
        embed_energy,
        logit_map_energy,
        top_share,
        top_k,
        restricted_loss: train_rows(&restricted),
        excluded_loss: train_rows(&excluded),
        weight_norm2,
    })
}

/// Splits logits over all pairs (`[p²][p]`, row `a·p + b`) into the part along the directions
/// cos(w_k(a+b)), sin(w_k(a+b)) of the key frequencies plus each column's mean (restricted), and
/// everything else (excluded).
pub fn split_logits(all: &[Vec<f64>], p: usize, key: &[usize]) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let n = p * p;
    let mut along = vec![vec![0.0; p]; n];
    for &k in key {
        for f in [f64::cos, f64::sin] {
            let dir: Vec<f64> = (0..n)
                .map(|i| {
                    f(2.0 * std::f64::consts::PI * (k * ((i / p + i % p) % p)) as f64 / p as f64)
                })
                .collect();
            let nn: f64 = dir.iter().map(|x| x * x).sum();
            for c in 0..p {
                let coef: f64 = dir.iter().zip(all).map(|(d, row)| d * row[c]).sum::<f64>() / nn;
                for i in 0..n {
                    along[i][c] += coef * dir[i];
                }
            }
        }
    }
    let mean: Vec<f64> = (0..p)
        .map(|c| all.iter().map(|r| r[c]).sum::<f64>() / n as f64)
        .collect();
    let restricted = along
        .iter()
        .map(|r| r.iter().zip(&mean).map(|(a, m)| a + m).collect())
        .collect();
    let excluded = all
        .iter()
        .zip(&along)
        .map(|(r, a)| r.iter().zip(a).map(|(x, y)| x - y).collect())
        .collect();
    (restricted, excluded)
}

/// One evaluation point of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_loss: f64,
    pub test_acc: f64,
    pub weight_norm2: f64,
}

/// What a run leaves behind.
pub struct Run {
    pub model: Trainable,
    pub data: Dataset,
    pub points: Vec<Point>,
    /// Checkpoint files in epoch order.
    pub checkpoints: Vec<(usize, PathBuf)>,
}

/// Callbacks while training: `(epoch, train loss)` after each step.
pub type OnStep<'a> = &'a mut dyn FnMut(usize, f64);

/// Trains from the seed (or resumes from the newest checkpoint in `dir`), evaluating every
/// `eval_every` epochs and checkpointing every `checkpoint_every` into `dir` (none when `dir` is
/// `None`). A resumed run must have been made with the same config.
pub fn train(cfg: &GrokConfig, dir: Option<&Path>, on_step: OnStep) -> Result<Run> {
    cfg.validate()?;
    let data = Dataset::new(cfg)?;
    let mut model = cfg.build()?;
    let mut points: Vec<Point> = Vec::new();
    let mut checkpoints = Vec::new();
    let mut start = 0;
    if let Some(dir) = dir {
        checkpoints = list_checkpoints(dir)?;
        let extend = |saved: GrokConfig| GrokConfig {
            epochs: cfg.epochs,
            ..saved
        };
        if let Some((epoch, saved)) = checkpoint::resume(dir, cfg, extend, &mut model.opt)? {
            points = saved;
            start = epoch;
        }
    }
    // Loss at the "=" position only.
    let tokens = data.train_tokens.flatten_all()?.to_vec1::<u32>()?;
    let n_train = data.train_labels.len();
    let targets: Vec<Option<u32>> = data
        .train_labels
        .iter()
        .flat_map(|&t| [None, None, Some(t)])
        .collect();
    for epoch in start..cfg.epochs {
        let lr = cfg.lr * (epoch as f64 / cfg.warmup.max(1) as f64).min(1.0);
        let value = model.train_step(&tokens, n_train, &targets, lr)?;
        on_step(epoch + 1, value);
        let done = epoch + 1;
        if done % cfg.eval_every == 0 || done == cfg.epochs {
            points.push(evaluate(&model, &data, done)?);
            if let Some(dir) = dir {
                if done % cfg.checkpoint_every == 0 || done == cfg.epochs {
                    let path = dir.join(format!("checkpoint-{done:07}.safetensors"));
                    let meta = serde_json::json!({"config": cfg, "epoch": done, "points": points});
                    checkpoint::save(&path, &model.opt, &meta)?;
                    checkpoints.push((done, path));
                }
            }
        }
    }
    Ok(Run {
        model,
        data,
        points,
        checkpoints,
    })
}

/// Train and test loss and accuracy now.
pub fn evaluate(model: &Trainable, data: &Dataset, epoch: usize) -> Result<Point> {
    let p = data.p;
    let (train_loss, train_acc) = loss_and_accuracy(
        &answer_logits(model, &data.train_tokens, p)?,
        &data.train_labels,
    )?;
    let (test_loss, test_acc) = loss_and_accuracy(
        &answer_logits(model, &data.test_tokens, p)?,
        &data.test_labels,
    )?;
    let mut weight_norm2 = 0.0;
    for (_, v) in model.opt.vars() {
        weight_norm2 += v.as_tensor().sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(Point {
        epoch,
        train_loss,
        train_acc,
        test_loss,
        test_acc,
        weight_norm2,
    })
}

/// The checkpoints in `dir`, by epoch.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    checkpoint::list(dir)
}

/// Loads a grokking checkpoint into a fresh model (with its config and dataset).
pub fn load(path: &Path) -> Result<(GrokConfig, Trainable, Dataset)> {
    let ck = checkpoint::load(path)?;
    let cfg: GrokConfig =
        serde_json::from_value(ck.meta["config"].clone()).map_err(|e| ToyError::File {
            path: path.display().to_string(),
            msg: format!("not a grokking checkpoint: {e}"),
        })?;
    cfg.validate()?;
    let mut model = cfg.build()?;
    model.set_params(&ck.params())?;
    let data = Dataset::new(&cfg)?;
    Ok((cfg, model, data))
}
