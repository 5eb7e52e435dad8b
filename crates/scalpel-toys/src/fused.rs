//! A hand-written forward and backward pass of the core transformer, for the small models the
//! toys grow.
//!
//! Training a 1- or 2-layer model through candle's autograd spends most of its time outside the
//! arithmetic: a tensor allocation, a graph node and a thread hand-off per element-wise op. Here
//! one step is a few dozen `gemm` calls plus loops over rows, and the last layer computes only
//! the rows the loss reads (for modular addition, the "=" position: two thirds of the model's
//! work is skipped). The function is the same as `scalpel_models::transformer::Model` on the same
//! weights; `tests/fused.rs` checks logits against the model, gradients against candle's
//! autograd through the model's differentiable path, and both against finite differences.
//!
//! Supported: LayerNorm or no normaliser, learned or no positions, multi-head attention without
//! grouped keys (biases optional), no MLP or a ReLU MLP (biases optional), final normaliser
//! optional, untied unembedding. Anything else reports [`Fused::supports`] false and trains
//! through autograd.

use std::collections::HashMap;

use candle_core::{CpuStorage, Storage};
use rayon::prelude::*;
use scalpel_core::gemm::{matmul, matmul_strided};
use scalpel_models::config::{Act, Config, Mlp, Norm, Pos};

use crate::optim::AdamW;
use crate::transformer::row_loss_grad;
use crate::{Result, ToyError};

/// The fused trainer for one model shape.
pub struct Fused {
    cfg: Config,
    pool: Pool,
}

/// Below this many tokens a step runs as one pass.
const PARALLEL_TOKENS: usize = 256;

/// Buffers kept from one step to the next. Allocating and freeing the same large vectors every
/// step costs page faults and TLB shoot-downs that, in the profile, outweighed the arithmetic.
#[derive(Default)]
struct Pool(std::sync::Mutex<Vec<Vec<f32>>>);

impl Pool {
    /// A zero-filled vector of length `n`, reusing the smallest free buffer that fits.
    fn zeros(&self, n: usize) -> Vec<f32> {
        let mut v = self.take(n);
        v.clear();
        v.resize(n, 0.0);
        v
    }

    /// The smallest free buffer that holds `n` values (or a new one), contents as left.
    fn take(&self, n: usize) -> Vec<f32> {
        {
            let mut free = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, v)| v.capacity() >= n)
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i);
            match best {
                Some(i) => free.swap_remove(i),
                None => Vec::with_capacity(n),
            }
        }
    }

    /// A vector of length `n` with unspecified contents, for outputs written in full.
    fn scratch(&self, n: usize) -> Vec<f32> {
        let mut v = self.take(n);
        // Grow with zeros only past the old length; the caller overwrites everything.
        if v.len() < n {
            v.resize(n, 0.0);
        } else {
            v.truncate(n);
        }
        v
    }

    /// A copy of `x` in a pooled buffer.
    fn copy(&self, x: &[f32]) -> Vec<f32> {
        let mut v = self.scratch(x.len());
        v.copy_from_slice(x);
        v
    }

    fn give(&self, v: Vec<f32>) {
        if v.capacity() > 0 {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(v);
        }
    }
}

/// `dst [m, n] = a [m, k] · wᵀ` with `w [n, k]` (a linear map stored `[out, in]`).
fn mm_nt(dst: &mut [f32], a: &[f32], w: &[f32], m: usize, k: usize, n: usize, acc: bool) {
    matmul(m, n, k, dst, acc, (a, 1, k as isize), (w, k as isize, 1));
}

/// `dst [m, n] = a [m, k] · w` with `w [k, n]`.
fn mm_nn(dst: &mut [f32], a: &[f32], w: &[f32], m: usize, k: usize, n: usize, acc: bool) {
    matmul(m, n, k, dst, acc, (a, 1, k as isize), (w, 1, n as isize));
}

/// `dst [m, n] += gᵀ · x` with `g [r, m]`, `x [r, n]` (a weight gradient).
fn mm_tn(dst: &mut [f32], g: &[f32], x: &[f32], r: usize, m: usize, n: usize) {
    matmul(m, n, r, dst, true, (g, m as isize, 1), (x, 1, n as isize));
}

/// `dst[j] += Σ_rows g[row, j]` (a bias gradient).
fn sum_rows(dst: &mut [f32], g: &[f32]) {
    for row in g.chunks_exact(dst.len()) {
        for (d, x) in dst.iter_mut().zip(row) {
            *d += x;
        }
    }
}

/// LayerNorm forward over rows of width `d`: returns (y, x̂, 1/σ).
fn ln_fwd(
    pool: &Pool,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    d: usize,
    eps: f64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = x.len() / d;
    let mut y = pool.scratch(x.len());
    let mut xhat = pool.scratch(x.len());
    let mut rstd = pool.scratch(rows);
    y.par_chunks_mut(d)
        .zip(xhat.par_chunks_mut(d))
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(d))
        .for_each(|(((y, xh), rs), x)| {
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            let r = 1.0 / (var + eps).sqrt();
            *rs = r as f32;
            for j in 0..d {
                xh[j] = ((x[j] as f64 - mean) * r) as f32;
                y[j] = xh[j] * w[j] + b[j];
            }
        });
    (y, xhat, rstd)
}

/// LayerNorm backward: adds into `dw`, `db`, returns dx.
fn ln_bwd(
    pool: &Pool,
    dy: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    w: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
) -> Vec<f32> {
    let d = w.len();
    for (dyr, xh) in dy.chunks_exact(d).zip(xhat.chunks_exact(d)) {
        for j in 0..d {
            dw[j] += dyr[j] * xh[j];
            db[j] += dyr[j];
        }
    }
    let mut dx = pool.scratch(dy.len());
    dx.par_chunks_mut(d)
        .zip(dy.par_chunks(d))
        .zip(xhat.par_chunks(d))
        .zip(rstd.par_iter())
        .for_each(|(((dx, dy), xh), &r)| {
            let mut m1 = 0f32;
            let mut m2 = 0f32;
            for j in 0..d {
                let g = dy[j] * w[j];
                m1 += g;
                m2 += g * xh[j];
            }
            m1 /= d as f32;
            m2 /= d as f32;
            for j in 0..d {
                dx[j] = r * (dy[j] * w[j] - m1 - xh[j] * m2);
            }
        });
    dx
}

/// Rows `rows` of a `[n, d]` matrix.
fn gather(pool: &Pool, x: &[f32], rows: &[usize], d: usize) -> Vec<f32> {
    let mut out = pool.scratch(rows.len() * d);
    for (o, &r) in out.chunks_exact_mut(d).zip(rows) {
        o.copy_from_slice(&x[r * d..(r + 1) * d]);
    }
    out
}

/// What the forward pass keeps of one block for the backward pass.
struct BlockCache {
    /// Rows (token indices) this block computes outputs for; `None` = all.
    rows: Option<Vec<usize>>,
    /// Normalised input `[n, d]` and its LayerNorm statistics.
    a: Vec<f32>,
    ln1: Option<(Vec<f32>, Vec<f32>)>,
    /// `[r, h·dh]`, `[n, h·dh]`, `[n, h·dh]`.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// `[b, h, p, p]` (rows not computed stay 0).
    pattern: Vec<f32>,
    /// `[r, h·dh]`
    z: Vec<f32>,
    /// MLP input `[r, d]`, LayerNorm statistics, pre-activation `[r, d_mlp]`, post `[r, d_mlp]`.
    a2: Vec<f32>,
    ln2: Option<(Vec<f32>, Vec<f32>)>,
    pre: Vec<f32>,
    post: Vec<f32>,
}

/// Read access to the current parameter values by canonical name.
struct Params<'a>(HashMap<&'a str, &'a [f32]>);

impl<'a> Params<'a> {
    fn get(&self, name: &str) -> &'a [f32] {
        self.0.get(name).copied().unwrap_or_else(|| {
            panic!("fused trainer: no parameter {name} (checked before the pass)")
        })
    }

    fn opt(&self, name: &str) -> Option<&'a [f32]> {
        self.0.get(name).copied()
    }
}

/// Gradient buffers by canonical name.
struct Grads(HashMap<String, Vec<f32>>);

impl Grads {
    fn get(&mut self, name: &str) -> &mut [f32] {
        self.0
            .get_mut(name)
            .unwrap_or_else(|| panic!("fused trainer: no gradient buffer {name}"))
    }
}

impl Fused {
    /// Whether the fused path implements this configuration.
    pub fn supports(cfg: &Config) -> bool {
        matches!(cfg.norm, Norm::LayerNorm | Norm::None)
            && matches!(cfg.pos, Pos::Learned | Pos::None)
            && matches!(cfg.mlp, None | Some(Mlp::Standard { act: Act::Relu }))
            && cfg.n_kv_heads == cfg.n_heads
            && !cfg.tied_embeddings
    }

    /// A trainer for `cfg`, or an error naming what is not supported.
    pub fn new(cfg: &Config) -> Result<Self> {
        if !Self::supports(cfg) {
            return Err(ToyError::Config(format!(
                "the fused trainer supports LayerNorm or no norm, learned or no positions, a ReLU \
                 MLP or none, no grouped keys and an untied unembedding; got {cfg:?}"
            )));
        }
        Ok(Fused {
            cfg: cfg.clone(),
            pool: Pool::default(),
        })
    }

    /// LayerNorm `{prefix}.w/.b` backward: adds the weight and bias gradients, returns the
    /// input gradient (recycling `dy`).
    fn norm_bwd(
        &self,
        w: &Params,
        g: &mut Grads,
        prefix: &str,
        dy: Vec<f32>,
        (xhat, rstd): &(Vec<f32>, Vec<f32>),
    ) -> Vec<f32> {
        let d = self.cfg.d_model;
        let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
        let weight = w.get(&format!("{prefix}.w"));
        let dx = ln_bwd(&self.pool, &dy, xhat, rstd, weight, &mut dw, &mut db);
        self.pool.give(dy);
        add(g.get(&format!("{prefix}.w")), &dw);
        add(g.get(&format!("{prefix}.b")), &db);
        dx
    }

    /// Row-major matrices stacked on top of each other, in a pooled buffer.
    fn stack_rows(&self, parts: &[&[f32]]) -> Vec<f32> {
        let mut out = self.pool.scratch(parts.iter().map(|x| x.len()).sum());
        let mut at = 0;
        for x in parts {
            out[at..at + x.len()].copy_from_slice(x);
            at += x.len();
        }
        out
    }

    /// The canonical names of the weights the forward pass reads.
    fn required(&self) -> Vec<String> {
        let c = &self.cfg;
        let ln = c.norm == Norm::LayerNorm;
        let mut v = vec!["embed.w".to_string(), "unembed.w".to_string()];
        if c.pos == Pos::Learned {
            v.push("pos_embed.w".into());
        }
        if c.final_norm && ln {
            v.extend(["ln_final.w".into(), "ln_final.b".into()]);
        }
        for l in 0..c.n_layers {
            let mut s = vec!["attn.q.w", "attn.k.w", "attn.v.w", "attn.o.w"];
            if ln {
                s.extend(["ln1.w", "ln1.b"]);
            }
            if c.mlp.is_some() {
                s.extend(["mlp.in.w", "mlp.out.w"]);
                if ln {
                    s.extend(["ln2.w", "ln2.b"]);
                }
            }
            v.extend(s.into_iter().map(|x| format!("blocks.{l}.{x}")));
        }
        v
    }

    /// Returns gradient buffers to the pool once the optimiser has used them.
    pub fn recycle(&self, grads: Vec<Option<Vec<f32>>>) {
        for g in grads.into_iter().flatten() {
            self.pool.give(g);
        }
    }

    /// Mean cross-entropy over the targeted tokens and the gradient of every parameter of `opt`
    /// (in its order). `tokens` holds `batch` rows of equal length; `targets` one entry per
    /// token.
    pub fn loss_and_grads(
        &self,
        opt: &AdamW,
        tokens: &[u32],
        batch: usize,
        targets: &[Option<u32>],
    ) -> Result<(f64, Vec<Option<Vec<f32>>>)> {
        let c = &self.cfg;
        if batch == 0 || !tokens.len().is_multiple_of(batch) || targets.len() != tokens.len() {
            return Err(ToyError::Config(format!(
                "{} tokens and {} targets do not form {batch} equal rows",
                tokens.len(),
                targets.len()
            )));
        }
        let p = tokens.len() / batch;
        if p > c.n_ctx {
            return Err(ToyError::Config(format!(
                "rows of {p} tokens exceed the context of {}",
                c.n_ctx
            )));
        }
        if let Some(t) = tokens
            .iter()
            .chain(targets.iter().flatten())
            .find(|&&t| t as usize >= c.d_vocab)
        {
            return Err(ToyError::Config(format!(
                "token {t} is outside the vocabulary of {}",
                c.d_vocab
            )));
        }
        // Read locks on every parameter for the whole step.
        let guards: Vec<_> = opt
            .vars()
            .map(|(name, v)| (name, v.as_tensor().storage_and_layout()))
            .collect();
        let mut map = HashMap::new();
        for (name, (storage, layout)) in &guards {
            let (Storage::Cpu(CpuStorage::F32(data)), Some((a, b))) =
                (&**storage, layout.contiguous_offsets())
            else {
                return Err(ToyError::Config(format!(
                    "parameter {name} is not a contiguous f32 CPU tensor"
                )));
            };
            map.insert(*name, &data[a..b]);
        }
        for name in self.required() {
            if !map.contains_key(name.as_str()) {
                return Err(ToyError::Config(format!(
                    "the optimiser holds no parameter {name}, which this model needs"
                )));
            }
        }
        let w = Params(map);
        let new_grads = || {
            Grads(
                opt.vars()
                    .map(|(n, v)| (n.to_string(), self.pool.zeros(v.as_tensor().elem_count())))
                    .collect(),
            )
        };
        let counted = targets.iter().flatten().count().max(1);
        // Data parallelism over whole sequences: each thread runs the full pass on its share of
        // the batch with single-threaded products, then the gradients are summed. Small products
        // split poorly across threads; whole passes split almost perfectly.
        let shares = rayon::current_num_threads().min(batch).max(1);
        let mut grads = new_grads();
        let loss = if shares > 1 && tokens.len() >= PARALLEL_TOKENS {
            let bounds: Vec<(usize, usize)> = (0..shares)
                .map(|i| (batch * i / shares, batch * (i + 1) / shares))
                .filter(|(a, b)| b > a)
                .collect();
            let parts: Vec<Result<(f64, Grads)>> = bounds
                .par_iter()
                .map(|&(a, b)| {
                    let mut g = new_grads();
                    let (ta, tb) = (a * p, b * p);
                    let l = self.run(
                        &w,
                        &mut g,
                        &tokens[ta..tb],
                        b - a,
                        p,
                        &targets[ta..tb],
                        counted,
                    )?;
                    Ok((l, g))
                })
                .collect();
            let mut loss = 0.0;
            for part in parts {
                let (l, g) = part?;
                loss += l;
                for (name, buf) in g.0 {
                    add(grads.get(&name), &buf);
                    self.pool.give(buf);
                }
            }
            loss
        } else {
            self.run(&w, &mut grads, tokens, batch, p, targets, counted)?
        };
        drop(guards);
        let out = opt
            .vars()
            .map(|(n, _)| grads.0.remove(n))
            .collect::<Vec<_>>();
        Ok((loss, out))
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        w: &Params,
        g: &mut Grads,
        tokens: &[u32],
        batch: usize,
        p: usize,
        targets: &[Option<u32>],
        counted: usize,
    ) -> Result<f64> {
        let c = &self.cfg;
        let (d, v_sz) = (c.d_model, c.d_vocab);
        let n = tokens.len();
        let ln = c.norm == Norm::LayerNorm;
        let target_rows: Vec<usize> = (0..n).filter(|&i| targets[i].is_some()).collect();

        // Embeddings.
        let w_e = w.get("embed.w");
        let w_pos = w.opt("pos_embed.w");
        let mut x = self.pool.zeros(n * d);
        for (i, row) in x.chunks_exact_mut(d).enumerate() {
            let e = &w_e[tokens[i] as usize * d..][..d];
            row.copy_from_slice(e);
            if let Some(wp) = w_pos {
                for (r, pe) in row.iter_mut().zip(&wp[(i % p) * d..][..d]) {
                    *r += pe;
                }
            }
        }

        // Blocks; the last computes only the targeted rows.
        let mut caches = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            // Restricting the last block pays only when it skips a good share of the rows.
            let rows = if l + 1 == c.n_layers && target_rows.len() * 4 < n * 3 {
                Some(target_rows.clone())
            } else {
                None
            };
            let (y, cache) = self.block_fwd(w, l, &x, batch, p, rows);
            self.pool.give(std::mem::replace(&mut x, y));
            caches.push(cache);
        }
        let r = x.len() / d; // rows out of the last block
        let out_rows: Vec<usize> = match caches.last().and_then(|c| c.rows.clone()) {
            Some(rows) => rows,
            None => (0..n).collect(),
        };

        // Final norm and unembedding on the rows the loss reads.
        let (xf, lnf) = if c.final_norm && ln {
            let (y, xh, rs) = ln_fwd(
                &self.pool,
                &x,
                w.get("ln_final.w"),
                w.get("ln_final.b"),
                d,
                c.norm_eps,
            );
            (y, Some((xh, rs)))
        } else {
            (x, None)
        };
        let w_u = w.get("unembed.w");
        let mut logits = self.pool.zeros(r * v_sz);
        mm_nt(&mut logits, &xf, w_u, r, d, v_sz, false);
        // Loss and gradients are means over all `counted` targets of the whole batch; this pass
        // returns its share of the sum.
        let scale = 1.0 / counted as f64;
        let mut dlogits = self.pool.zeros(r * v_sz);
        let loss: f64 = logits
            .par_chunks(v_sz)
            .zip(dlogits.par_chunks_mut(v_sz))
            .zip(out_rows.par_iter())
            .map(|((row, drow), &i)| match targets[i] {
                Some(t) => row_loss_grad(row, t as usize, scale, drow),
                None => 0.0,
            })
            .sum::<f64>()
            / counted as f64;

        // Backward.
        mm_tn(g.get("unembed.w"), &dlogits, &xf, r, v_sz, d);
        let mut dx = self.pool.zeros(r * d);
        mm_nn(&mut dx, &dlogits, w_u, r, v_sz, d, false);
        if let Some(stats) = &lnf {
            let dy = std::mem::take(&mut dx);
            dx = self.norm_bwd(w, g, "ln_final", dy, stats);
        }
        self.pool.give(logits);
        self.pool.give(dlogits);
        self.pool.give(xf);
        if let Some((xh, rs)) = lnf {
            self.pool.give(xh);
            self.pool.give(rs);
        }
        for l in (0..c.n_layers).rev() {
            dx = self.block_bwd(w, g, l, &caches[l], dx, batch, p);
        }
        for cache in caches {
            let BlockCache {
                a,
                ln1,
                q,
                k,
                v,
                pattern,
                z,
                a2,
                ln2,
                pre,
                post,
                ..
            } = cache;
            for buf in [a, q, k, v, pattern, z, a2, pre, post] {
                self.pool.give(buf);
            }
            for (xh, rs) in [ln1, ln2].into_iter().flatten() {
                self.pool.give(xh);
                self.pool.give(rs);
            }
        }
        let dwe = g.get("embed.w");
        for (i, row) in dx.chunks_exact(d).enumerate() {
            add(&mut dwe[tokens[i] as usize * d..][..d], row);
        }
        if w_pos.is_some() {
            let dwp = g.get("pos_embed.w");
            for (i, row) in dx.chunks_exact(d).enumerate() {
                add(&mut dwp[(i % p) * d..][..d], row);
            }
        }
        self.pool.give(dx);
        Ok(loss)
    }

    /// One block forward on `x [n, d]`, output `[r, d]` for `rows` (all when `None`).
    fn block_fwd(
        &self,
        w: &Params,
        l: usize,
        x: &[f32],
        batch: usize,
        p: usize,
        rows: Option<Vec<usize>>,
    ) -> (Vec<f32>, BlockCache) {
        let c = &self.cfg;
        let (d, h, dh) = (c.d_model, c.n_heads, c.d_head);
        let hd = h * dh;
        let n = x.len() / d;
        let name = |s: &str| format!("blocks.{l}.{s}");
        let ln = c.norm == Norm::LayerNorm;

        let (a, ln1) = if ln {
            let (y, xh, rs) = ln_fwd(
                &self.pool,
                x,
                w.get(&name("ln1.w")),
                w.get(&name("ln1.b")),
                d,
                c.norm_eps,
            );
            (y, Some((xh, rs)))
        } else {
            (self.pool.copy(x), None)
        };
        let a_r = match &rows {
            Some(rs) => gather(&self.pool, &a, rs, d),
            None => self.pool.copy(&a),
        };
        let r = a_r.len() / d;
        let linear = |dst: &mut Vec<f32>, inp: &[f32], rows: usize, wn: &str, out: usize| {
            self.pool
                .give(std::mem::replace(dst, self.pool.zeros(rows * out)));
            let win = inp.len() / rows.max(1);
            mm_nt(
                dst,
                inp,
                w.get(&name(&format!("{wn}.w"))),
                rows,
                win,
                out,
                false,
            );
            if let Some(b) = w.opt(&name(&format!("{wn}.b"))) {
                for row in dst.chunks_exact_mut(out) {
                    add(row, b);
                }
            }
        };
        let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
        if rows.is_none() {
            // One product for q, k and v: [n, d] · [d, 3·h·dh] runs faster than three thin ones.
            let w_qkv = self.stack_rows(&[
                w.get(&name("attn.q.w")),
                w.get(&name("attn.k.w")),
                w.get(&name("attn.v.w")),
            ]);
            let mut qkv = self.pool.scratch(n * 3 * hd);
            mm_nt(&mut qkv, &a, &w_qkv, n, d, 3 * hd, false);
            self.pool.give(w_qkv);
            for (dst, part) in [(&mut q, "q"), (&mut k, "k"), (&mut v, "v")] {
                let at = match part {
                    "q" => 0,
                    "k" => hd,
                    _ => 2 * hd,
                };
                *dst = self.pool.scratch(n * hd);
                for (o, row) in dst.chunks_exact_mut(hd).zip(qkv.chunks_exact(3 * hd)) {
                    o.copy_from_slice(&row[at..at + hd]);
                }
                if let Some(b) = w.opt(&name(&format!("attn.{part}.b"))) {
                    for o in dst.chunks_exact_mut(hd) {
                        add(o, b);
                    }
                }
            }
            self.pool.give(qkv);
            self.pool.give(a_r);
        } else {
            linear(&mut q, &a_r, r, "attn.q", hd);
            self.pool.give(a_r);
            linear(&mut k, &a, n, "attn.k", hd);
            linear(&mut v, &a, n, "attn.v", hd);
        }

        // Attention, one sequence per task. Query rows of sequence s are the contiguous run of
        // `rows` with token index in [s·p, (s+1)·p).
        let q_pos = query_positions(&rows, batch, p);
        let mut pattern = self.pool.zeros(batch * h * p * p);
        let mut z = self.pool.zeros(r * hd);
        {
            let z_chunks = split_rows(&mut z, &q_pos, hd);
            pattern
                .par_chunks_mut(h * p * p)
                .zip(z_chunks.into_par_iter())
                .enumerate()
                .for_each(|(s, (pat, zs))| {
                    Seq::of((&q, &k, &v), &q_pos, s, (h, dh, p)).forward(pat, zs);
                });
        }
        let mut attn_out = Vec::new();
        linear(&mut attn_out, &z, r, "attn.o", d);
        let mut resid = match &rows {
            Some(rs) => gather(&self.pool, x, rs, d),
            None => self.pool.copy(x),
        };
        add(&mut resid, &attn_out);
        self.pool.give(attn_out);

        let (mut a2, mut ln2, mut pre, mut post) = (Vec::new(), None, Vec::new(), Vec::new());
        if c.mlp.is_some() {
            let m = c.d_mlp;
            if ln {
                let (y, xh, rs) = ln_fwd(
                    &self.pool,
                    &resid,
                    w.get(&name("ln2.w")),
                    w.get(&name("ln2.b")),
                    d,
                    c.norm_eps,
                );
                a2 = y;
                ln2 = Some((xh, rs));
            } else {
                a2 = self.pool.copy(&resid);
            }
            linear(&mut pre, &a2, r, "mlp.in", m);
            post = self.pool.zeros(pre.len());
            post.par_iter_mut()
                .zip(pre.par_iter())
                .for_each(|(o, &x)| *o = x.max(0.0));
            let mut out = Vec::new();
            linear(&mut out, &post, r, "mlp.out", d);
            add(&mut resid, &out);
            self.pool.give(out);
        }
        let cache = BlockCache {
            rows,
            a,
            ln1,
            q,
            k,
            v,
            pattern,
            z,
            a2,
            ln2,
            pre,
            post,
        };
        (resid, cache)
    }

    /// One block backward: `dy [r, d]` → gradient of the block's input `[n, d]`.
    #[allow(clippy::too_many_arguments)]
    fn block_bwd(
        &self,
        w: &Params,
        g: &mut Grads,
        l: usize,
        cache: &BlockCache,
        dy: Vec<f32>,
        batch: usize,
        p: usize,
    ) -> Vec<f32> {
        let c = &self.cfg;
        let (d, h, dh) = (c.d_model, c.n_heads, c.d_head);
        let hd = h * dh;
        let n = batch * p;
        let r = dy.len() / d;
        let name = |s: &str| format!("blocks.{l}.{s}");
        let ln = c.norm == Norm::LayerNorm;
        // Linear backward: weight and bias gradients, input gradient (added into `dx`).
        let lin_bwd = |g: &mut Grads,
                       dout: &[f32],
                       inp: &[f32],
                       rows: usize,
                       wn: &str,
                       out: usize,
                       dx: &mut [f32]| {
            let inw = inp.len() / rows.max(1);
            mm_tn(g.get(&name(&format!("{wn}.w"))), dout, inp, rows, out, inw);
            if let Some(db) = g.0.get_mut(&name(&format!("{wn}.b"))) {
                sum_rows(db, dout);
            }
            mm_nn(
                dx,
                dout,
                w.get(&name(&format!("{wn}.w"))),
                rows,
                out,
                inw,
                true,
            );
        };

        let mut dresid = dy; // gradient at the residual after attention, [r, d]
        if c.mlp.is_some() {
            let m = c.d_mlp;
            let mut dpost = self.pool.zeros(r * m);
            lin_bwd(g, &dresid, &cache.post, r, "mlp.out", d, &mut dpost);
            let mut dpre = dpost;
            dpre.par_iter_mut()
                .zip(cache.pre.par_iter())
                .for_each(|(gp, &x)| {
                    if x <= 0.0 {
                        *gp = 0.0
                    }
                });
            let mut da2 = self.pool.zeros(r * d);
            lin_bwd(g, &dpre, &cache.a2, r, "mlp.in", m, &mut da2);
            self.pool.give(dpre);
            let dmid = match &cache.ln2 {
                Some(stats) if ln => self.norm_bwd(w, g, &name("ln2"), da2, stats),
                _ => da2,
            };
            add(&mut dresid, &dmid);
            self.pool.give(dmid);
        }
        // Attention output projection.
        let mut dz = self.pool.zeros(r * hd);
        lin_bwd(g, &dresid, &cache.z, r, "attn.o", d, &mut dz);

        // Attention core, one sequence per task.
        let q_pos = query_positions(&cache.rows, batch, p);
        let mut dq = self.pool.zeros(r * hd);
        let mut dk = self.pool.zeros(n * hd);
        let mut dv = self.pool.zeros(n * hd);
        {
            let dq_chunks = split_rows(&mut dq, &q_pos, hd);
            let (q, k, v, pat) = (&cache.q, &cache.k, &cache.v, &cache.pattern);
            let dz = &dz;
            dq_chunks
                .into_par_iter()
                .zip(dk.par_chunks_mut(p * hd))
                .zip(dv.par_chunks_mut(p * hd))
                .enumerate()
                .for_each(|(s, ((dqs, dks), dvs))| {
                    let seq = Seq::of((q, k, v), &q_pos, s, (h, dh, p));
                    let (q0, nq) = (q_pos[s].0, q_pos[s].1.len());
                    let pat = &pat[s * h * p * p..(s + 1) * h * p * p];
                    seq.backward(pat, &dz[q0 * hd..(q0 + nq) * hd], dqs, dks, dvs);
                });
        }
        // q, k, v projections → gradient of the (normalised) input a.
        let mut da = self.pool.zeros(n * d);
        if cache.rows.is_none() {
            // One product each for the stacked weight gradient and the input gradient.
            let mut dqkv = self.pool.scratch(n * 3 * hd);
            for (row, ((gq, gk), gv)) in dqkv.chunks_exact_mut(3 * hd).zip(
                dq.chunks_exact(hd)
                    .zip(dk.chunks_exact(hd))
                    .zip(dv.chunks_exact(hd)),
            ) {
                row[..hd].copy_from_slice(gq);
                row[hd..2 * hd].copy_from_slice(gk);
                row[2 * hd..].copy_from_slice(gv);
            }
            let mut gw = self.pool.zeros(3 * hd * d);
            mm_tn(&mut gw, &dqkv, &cache.a, n, 3 * hd, d);
            for (i, part) in ["q", "k", "v"].into_iter().enumerate() {
                add(
                    g.get(&name(&format!("attn.{part}.w"))),
                    &gw[i * hd * d..(i + 1) * hd * d],
                );
                if let Some(db) = g.0.get_mut(&name(&format!("attn.{part}.b"))) {
                    for row in dqkv.chunks_exact(3 * hd) {
                        add(db, &row[i * hd..(i + 1) * hd]);
                    }
                }
            }
            let w_qkv = self.stack_rows(&[
                w.get(&name("attn.q.w")),
                w.get(&name("attn.k.w")),
                w.get(&name("attn.v.w")),
            ]);
            mm_nn(&mut da, &dqkv, &w_qkv, n, 3 * hd, d, false);
            for buf in [dqkv, gw, w_qkv] {
                self.pool.give(buf);
            }
        } else {
            lin_bwd(g, &dk, &cache.a, n, "attn.k", hd, &mut da);
            lin_bwd(g, &dv, &cache.a, n, "attn.v", hd, &mut da);
        }
        // Queries of a restricted block (the stacked path above handled them otherwise).
        if let Some(rows) = &cache.rows {
            let a_r = gather(&self.pool, &cache.a, rows, d);
            let mut da_r = self.pool.zeros(r * d);
            lin_bwd(g, &dq, &a_r, r, "attn.q", hd, &mut da_r);
            for (i, &row) in rows.iter().enumerate() {
                add(&mut da[row * d..][..d], &da_r[i * d..][..d]);
            }
            self.pool.give(a_r);
            self.pool.give(da_r);
        }
        let mut dx = match &cache.ln1 {
            Some(stats) if ln => self.norm_bwd(w, g, &name("ln1"), da, stats),
            _ => da,
        };
        // The residual path.
        match &cache.rows {
            Some(rows) => {
                for (i, &row) in rows.iter().enumerate() {
                    add(&mut dx[row * d..][..d], &dresid[i * d..][..d]);
                }
            }
            None => add(&mut dx, &dresid),
        }
        for buf in [dresid, dz, dq, dk, dv] {
            self.pool.give(buf);
        }
        dx
    }
}

/// Causal attention of one sequence, head by head, as small matrix products: the query rows
/// (`[nq, h·dh]`, at `positions`), keys and values (`[p, h·dh]`).
struct Seq<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    positions: &'a [usize],
    h: usize,
    dh: usize,
    p: usize,
    scale: f32,
}

impl<'a> Seq<'a> {
    /// Sequence `s` of a batch: its query rows (located by `q_pos`, see [`query_positions`]),
    /// keys and values, out of `[rows, h·dh]` buffers; `shape` is (heads, d_head, positions).
    fn of(
        (q, k, v): (&'a [f32], &'a [f32], &'a [f32]),
        q_pos: &'a [(usize, Vec<usize>)],
        s: usize,
        (h, dh, p): (usize, usize, usize),
    ) -> Self {
        let hd = h * dh;
        let (q0, positions) = &q_pos[s];
        let nq = positions.len();
        Seq {
            q: &q[q0 * hd..(q0 + nq) * hd],
            k: &k[s * p * hd..(s + 1) * p * hd],
            v: &v[s * p * hd..(s + 1) * p * hd],
            positions,
            h,
            dh,
            p,
            scale: 1.0 / (dh as f32).sqrt(),
        }
    }
    /// Fills `pat [h, p, p]` (the rows of the query positions) and `z [nq, h·dh]`.
    fn forward(&self, pat: &mut [f32], z: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { self.forward_avx2(pat, z) };
        }
        self.forward_body(pat, z)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn forward_avx2(&self, pat: &mut [f32], z: &mut [f32]) {
        self.forward_body(pat, z)
    }

    #[inline(always)]
    fn forward_body(&self, pat: &mut [f32], z: &mut [f32]) {
        let (nq, p, dh, hd) = (self.positions.len(), self.p, self.dh, self.h * self.dh);
        if nq == 0 {
            return;
        }
        let mut probs = vec![0f32; nq * p];
        for head in 0..self.h {
            let o = head * dh;
            // scores [nq, p] = Q_h K_hᵀ
            matmul_strided(
                nq,
                p,
                dh,
                (&mut probs, p),
                false,
                (&self.q[o..], 1, hd as isize),
                (&self.k[o..], hd as isize, 1),
            );
            for (row, &t) in probs.chunks_exact_mut(p).zip(self.positions) {
                let mut max = f32::NEG_INFINITY;
                for x in &mut row[..=t] {
                    *x *= self.scale;
                    max = max.max(*x);
                }
                let mut sum = 0f32;
                for x in &mut row[..=t] {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                for x in &mut row[..=t] {
                    *x *= inv;
                }
                row[t + 1..].fill(0.0);
                pat[(head * p + t) * p..][..p].copy_from_slice(row);
            }
            // z_h [nq, dh] = P V_h
            matmul_strided(
                nq,
                dh,
                p,
                (&mut z[o..], hd),
                false,
                (&probs, 1, p as isize),
                (&self.v[o..], 1, hd as isize),
            );
        }
    }

    /// Gradients of the query rows, keys and values from `dz [nq, h·dh]` and the forward's
    /// pattern `pat [h, p, p]`.
    fn backward(&self, pat: &[f32], dz: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { self.backward_avx2(pat, dz, dq, dk, dv) };
        }
        self.backward_body(pat, dz, dq, dk, dv)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn backward_avx2(
        &self,
        pat: &[f32],
        dz: &[f32],
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        self.backward_body(pat, dz, dq, dk, dv)
    }

    #[inline(always)]
    fn backward_body(
        &self,
        pat: &[f32],
        dz: &[f32],
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let (nq, p, dh, hd) = (self.positions.len(), self.p, self.dh, self.h * self.dh);
        if nq == 0 {
            return;
        }
        let mut probs = vec![0f32; nq * p];
        let mut ds = vec![0f32; nq * p];
        for head in 0..self.h {
            let o = head * dh;
            for (row, &t) in probs.chunks_exact_mut(p).zip(self.positions) {
                row.copy_from_slice(&pat[(head * p + t) * p..][..p]);
            }
            // dP [nq, p] = dZ_h V_hᵀ
            matmul_strided(
                nq,
                p,
                dh,
                (&mut ds, p),
                false,
                (&dz[o..], 1, hd as isize),
                (&self.v[o..], hd as isize, 1),
            );
            // dV_h [p, dh] += Pᵀ dZ_h
            matmul_strided(
                p,
                dh,
                nq,
                (&mut dv[o..], hd),
                true,
                (&probs, p as isize, 1),
                (&dz[o..], 1, hd as isize),
            );
            // Softmax backward: dS = P ⊙ (dP − Σ_j P dP), times the score scale.
            for (d, pr) in ds.chunks_exact_mut(p).zip(probs.chunks_exact(p)) {
                let w: f32 = d.iter().zip(pr).map(|(a, b)| a * b).sum();
                for (x, &pj) in d.iter_mut().zip(pr) {
                    *x = pj * (*x - w) * self.scale;
                }
            }
            // dQ_h [nq, dh] = dS K_h; dK_h [p, dh] += dSᵀ Q_h
            matmul_strided(
                nq,
                dh,
                p,
                (&mut dq[o..], hd),
                false,
                (&ds, 1, p as isize),
                (&self.k[o..], 1, hd as isize),
            );
            matmul_strided(
                p,
                dh,
                nq,
                (&mut dk[o..], hd),
                true,
                (&ds, p as isize, 1),
                (&self.q[o..], 1, hd as isize),
            );
        }
    }
}

fn add(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// Per sequence: the index of its first query row and the positions of its query rows.
fn query_positions(rows: &Option<Vec<usize>>, batch: usize, p: usize) -> Vec<(usize, Vec<usize>)> {
    match rows {
        None => (0..batch).map(|s| (s * p, (0..p).collect())).collect(),
        Some(rows) => {
            let mut out: Vec<(usize, Vec<usize>)> = (0..batch).map(|_| (0, Vec::new())).collect();
            for (i, &tok) in rows.iter().enumerate() {
                let (s, t) = (tok / p, tok % p);
                if out[s].1.is_empty() {
                    out[s].0 = i;
                }
                out[s].1.push(t);
            }
            out
        }
    }
}

/// Splits a `[r, width]` buffer into each sequence's run of query rows.
fn split_rows<'a>(
    buf: &'a mut [f32],
    q_pos: &[(usize, Vec<usize>)],
    width: usize,
) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(q_pos.len());
    let mut rest = buf;
    for (_, positions) in q_pos {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(positions.len() * width);
        out.push(head);
        rest = tail;
    }
    out
}
