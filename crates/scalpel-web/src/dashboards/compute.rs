//! The streaming pass that computes dashboards.
//!
//! Activations arrive in chunks of whole contexts (a store shard, or contexts just run through
//! the model). Each chunk is encoded in row batches (`[rows, d_in] -> [rows, d_sae]`) and
//! scanned once; per latent only compact state is kept: the count and sum of non-zero
//! activations, a log-binned histogram, a fixed-size set of the top-k contexts, and a uniform
//! reservoir of firings from which the quantile bands are sampled at the end (SAEDashboard's
//! equal-width intervals over `(0, max]`). A window of tokens around a peak, with the latent's
//! activation on each, is copied when the firing enters the top set or the reservoir, while its
//! batch is in memory, so no second pass is needed. Latents are split across threads.
//!
//! The state can be written to a checkpoint and read back ([`DictPass::save`],
//! [`DictPass::load`]), which is how an interrupted run resumes.
//!
//! Logit effects ([`logit_effects`]) and similar latents ([`similar_latents`]) depend only on the
//! weights and are computed at the end, in blocks of latents.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use scalpel_data::store::{StoreMeta, StoreReader};
use scalpel_dict::{Architecture, Sae};

use super::db::DashboardDb;
use super::types::{
    Context, DictInfo, Histogram, LatentDashboard, QuantileGroup, Similar, TokenValue,
};
use crate::{Error, Result};

/// What the pass keeps and shows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Options {
    /// Top-activating contexts kept per latent (at most one per source context).
    pub top_k: usize,
    /// Tokens shown before and after the peak token of a context window.
    pub before: usize,
    pub after: usize,
    /// Equal-width activation bands the quantile samples are grouped in.
    pub n_bands: usize,
    /// Contexts shown per band.
    pub per_band: usize,
    /// Firings kept per latent in the uniform reservoir the bands are sampled from.
    pub reservoir: usize,
    /// Contexts encoded at once (rows = this × context size).
    pub batch_contexts: usize,
    /// Tokens in the top/bottom logit lists, and latents in the similar list.
    pub n_logits: usize,
    pub n_similar: usize,
    /// Bins of the logit-effect histogram.
    pub logit_bins: usize,
    /// Threads that scan latents (0: one per core).
    pub threads: usize,
    /// Seed of the reservoir sampling.
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            top_k: 20,
            before: 16,
            after: 4,
            n_bands: 10,
            per_band: 5,
            reservoir: 50,
            batch_contexts: 8,
            n_logits: 10,
            n_similar: 10,
            logit_bins: 40,
            threads: 0,
            seed: 0,
        }
    }
}

impl Options {
    pub fn check(&self) -> Result<()> {
        if self.top_k == 0 || self.batch_contexts == 0 {
            return Err(Error::msg("top_k and batch_contexts must be at least 1"));
        }
        if self.n_bands == 0 && self.per_band > 0 {
            return Err(Error::msg(
                "n_bands must be at least 1 when per_band is set",
            ));
        }
        Ok(())
    }

    fn n_threads(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Activations of one chunk of whole contexts.
pub struct Chunk<'a> {
    /// Index, in the whole source, of the chunk's first context.
    pub first_context: u64,
    /// Tokens per context.
    pub context_size: usize,
    /// Token ids, `n_contexts × context_size`, row-major.
    pub tokens: &'a [u32],
    /// Activations of the dictionary's hook `[n_contexts × context_size, d_in]`.
    pub acts: &'a Tensor,
    /// Rows that count (false for excluded special tokens or positions outside a `seqpos_slice`);
    /// an excluded row is never a peak and shows activation 0 in windows.
    pub keep: &'a [bool],
}

/// Log-spaced histogram bins of non-zero activations: `HIST_PER_OCTAVE` bins per power of two
/// from 2^`HIST_LOG_MIN` to 2^`HIST_LOG_MAX`; values outside fall in the end bins.
const HIST_LOG_MIN: i32 = -16;
const HIST_LOG_MAX: i32 = 16;
const HIST_PER_OCTAVE: i32 = 4;
const HIST_BINS: usize = ((HIST_LOG_MAX - HIST_LOG_MIN) * HIST_PER_OCTAVE) as usize;

fn hist_bin(a: f32) -> usize {
    let b = ((a.log2() - HIST_LOG_MIN as f32) * HIST_PER_OCTAVE as f32).floor();
    b.clamp(0.0, (HIST_BINS - 1) as f32) as usize
}

fn hist_edge(i: usize) -> f32 {
    (HIST_LOG_MIN as f32 + i as f32 / HIST_PER_OCTAVE as f32).exp2()
}

/// A window of tokens around one firing, copied while its batch was in memory.
#[derive(Debug, Clone, PartialEq)]
struct Window {
    act: f32,
    context: u64,
    /// Position of the peak in its context, and of the window's first token.
    pos: u32,
    start: u32,
    tokens: Vec<u32>,
    acts: Vec<f32>,
}

/// Everything kept about one latent during the pass.
#[derive(Debug, Clone, PartialEq)]
struct LatentState {
    n_fired: u64,
    sum: f64,
    max: f32,
    hist: Vec<u32>,
    /// Unordered; at most `top_k`, at most one per source context.
    top: Vec<Window>,
    reservoir: Vec<Window>,
}

impl LatentState {
    fn new() -> Self {
        LatentState {
            n_fired: 0,
            sum: 0.0,
            max: 0.0,
            hist: vec![0; HIST_BINS],
            top: Vec::new(),
            reservoir: Vec::new(),
        }
    }
}

/// A well-mixed 64-bit hash (splitmix64's finaliser): the reservoir's random draws depend only on
/// the seed, the latent and the firing's number, so threads and resumes give identical results.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Where the activations of the rows of one encoded batch live.
struct Batch<'a> {
    /// `[rows, d_sae]` row-major, excluded rows all zero.
    f: &'a [f32],
    /// Per row, its non-zero activations `(latent, act)` in latent order.
    nz: &'a [Vec<(u32, f32)>],
    d_sae: usize,
    tokens: &'a [u32],
    context_size: usize,
    first_context: u64,
}

impl Batch<'_> {
    fn window(&self, row: usize, latent: usize, act: f32, opts: &Options) -> Window {
        let ctx = row / self.context_size;
        let pos = row % self.context_size;
        let start = pos.saturating_sub(opts.before);
        let end = (pos + opts.after + 1).min(self.context_size);
        let base = ctx * self.context_size;
        let tokens = self.tokens[base + start..base + end].to_vec();
        let acts = (base + start..base + end)
            .map(|r| self.f[r * self.d_sae + latent])
            .collect();
        Window {
            act,
            context: self.first_context + ctx as u64,
            pos: pos as u32,
            start: start as u32,
            tokens,
            acts,
        }
    }
}

/// The sparsity function of an [`Encoder`].
enum Activation {
    Relu,
    /// Fires where the pre-activation exceeds the latent's threshold (and 0).
    JumpRelu(Vec<f32>),
    /// The `k` largest pre-activations (times the decoder row norms when `scale` is set), ReLU'd.
    TopK {
        k: usize,
        scale: Option<Vec<f32>>,
    },
}

/// A dictionary's encoder on raw slices: one GEMM into a reused buffer, then the sparsity
/// function applied row by row while the non-zeros are collected, with no per-batch tensors.
/// The fast path of [`Sae::encode`] for the architectures whose encoder is `x @ W_enc + b_enc`
/// followed by a sparsity function, without run-time input normalisation; the others go
/// through [`Sae::encode`]. A test checks the two agree.
struct Encoder {
    /// `W_enc [d_in, d_sae]`.
    w_enc: Vec<f32>,
    b_enc: Vec<f32>,
    /// Subtracted from the input first (`apply_b_dec_to_input`).
    b_dec: Option<Vec<f32>>,
    act: Activation,
    d_in: usize,
    d_sae: usize,
}

fn vec_of(sae: &Sae, name: &str) -> Result<Vec<f32>> {
    let t = sae
        .tensor(name)
        .ok_or_else(|| Error::msg(format!("the dictionary has no {name}")))?;
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl Encoder {
    /// The fast encoder of `sae`, or `None` when its architecture needs [`Sae::encode`].
    fn new(sae: &Sae) -> Result<Option<Encoder>> {
        use scalpel_dict::NormalizeActivations as N;
        let cfg = &sae.cfg;
        if !matches!(
            cfg.normalize_activations,
            N::None | N::ExpectedAverageOnlyIn
        ) || cfg.architecture == Architecture::Gated
        {
            return Ok(None);
        }
        let act = if cfg.architecture.is_topk() {
            let rescale = cfg.architecture == Architecture::Topk
                && cfg.rescale_acts_by_decoder_norm == Some(true);
            let scale = if rescale {
                let w = decoder(sae)?;
                Some(w.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?)
            } else {
                None
            };
            Activation::TopK {
                k: cfg.k().min(cfg.d_sae),
                scale,
            }
        } else if cfg.architecture.is_jumprelu() {
            Activation::JumpRelu(vec_of(sae, "threshold")?)
        } else {
            Activation::Relu
        };
        Ok(Some(Encoder {
            w_enc: vec_of(sae, "W_enc")?,
            b_enc: vec_of(sae, "b_enc")?,
            b_dec: if cfg.apply_b_dec_to_input {
                Some(vec_of(sae, "b_dec")?)
            } else {
                None
            },
            act,
            d_in: cfg.d_in,
            d_sae: cfg.d_sae,
        }))
    }

    /// Encodes `x [rows, d_in]` into `out [rows, d_sae]` (excluded rows zero) and returns each
    /// row's non-zeros.
    fn encode(
        &self,
        x: &[f32],
        keep: &[bool],
        out: &mut Vec<f32>,
        threads: usize,
    ) -> Vec<Vec<(u32, f32)>> {
        let (rows, d_in, d_sae) = (keep.len(), self.d_in, self.d_sae);
        let centred;
        let x = match &self.b_dec {
            Some(b) => {
                centred = x
                    .chunks(d_in)
                    .flat_map(|r| r.iter().zip(b).map(|(a, b)| a - b))
                    .collect::<Vec<f32>>();
                &centred[..]
            }
            None => x,
        };
        out.resize(rows * d_sae, 0.0);
        // pre = x @ W_enc  [rows, d_sae]
        scalpel_core::gemm::matmul(
            rows,
            d_sae,
            d_in,
            out,
            false,
            (x, 1, d_in as isize),
            (&self.w_enc, 1, d_sae as isize),
        );
        let per = rows.div_ceil(threads.max(1)).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = out
                .chunks_mut(per * d_sae)
                .zip(keep.chunks(per))
                .map(|(block, keep)| {
                    s.spawn(move || {
                        block
                            .chunks_mut(d_sae)
                            .zip(keep)
                            .map(|(row, &k)| self.activate(row, k))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    }

    /// Turns one row of pre-activations (without `b_enc`) into activations in place.
    fn activate(&self, row: &mut [f32], keep: bool) -> Vec<(u32, f32)> {
        if !keep {
            row.fill(0.0);
            return Vec::new();
        }
        for (v, b) in row.iter_mut().zip(&self.b_enc) {
            *v += b;
        }
        match &self.act {
            Activation::Relu | Activation::JumpRelu(_) => {
                let thr = match &self.act {
                    Activation::JumpRelu(t) => Some(t),
                    _ => None,
                };
                let mut nz = Vec::new();
                for (j, v) in row.iter_mut().enumerate() {
                    let fires = *v > 0.0 && thr.is_none_or(|t| *v > t[j]);
                    if fires {
                        nz.push((j as u32, *v));
                    } else {
                        *v = 0.0;
                    }
                }
                nz
            }
            Activation::TopK { k, scale } => {
                if let Some(s) = scale {
                    for (v, s) in row.iter_mut().zip(s) {
                        *v *= s;
                    }
                }
                let k = *k;
                if k == 0 {
                    row.fill(0.0);
                    return Vec::new();
                }
                // The k largest, by one pass with a small unsorted set and its minimum.
                let mut top: Vec<(u32, f32)> = row[..k]
                    .iter()
                    .enumerate()
                    .map(|(j, &v)| (j as u32, v))
                    .collect();
                let min_of = |t: &[(u32, f32)]| {
                    let mut m = 0;
                    for i in 1..t.len() {
                        if t[i].1 < t[m].1 {
                            m = i;
                        }
                    }
                    m
                };
                let mut m = min_of(&top);
                for (j, &v) in row.iter().enumerate().skip(k) {
                    if v > top[m].1 {
                        top[m] = (j as u32, v);
                        m = min_of(&top);
                    }
                }
                row.fill(0.0);
                top.retain(|&(_, v)| v > 0.0);
                top.sort_unstable_by_key(|&(j, _)| j);
                for &(j, v) in &top {
                    row[j as usize] = v;
                }
                top
            }
        }
    }
}

/// Zeroes the excluded rows of dense activations `f [rows, d_sae]` and lists each row's
/// non-zeros (the path of dictionaries without a fast [`Encoder`]).
fn sparsify(f: &mut [f32], keep: &[bool], d_sae: usize) -> Vec<Vec<(u32, f32)>> {
    f.chunks_mut(d_sae)
        .zip(keep)
        .map(|(row, &k)| {
            if !k {
                row.fill(0.0);
                return Vec::new();
            }
            row.iter()
                .enumerate()
                .filter(|(_, &v)| v != 0.0)
                .map(|(j, &v)| (j as u32, v))
                .collect()
        })
        .collect()
}

/// The running state of one dictionary's pass.
pub struct DictPass {
    opts: Options,
    d_sae: usize,
    /// Rows counted (kept rows seen).
    n_tokens: u64,
    /// Contexts of the source consumed so far.
    contexts_done: u64,
    latents: Vec<LatentState>,
    /// The fast encoder (built on the first push; `None` inside when the dictionary needs
    /// [`Sae::encode`]) and the activation buffer it reuses.
    encoder: Option<Option<Encoder>>,
    buf: Vec<f32>,
}

impl DictPass {
    pub fn new(d_sae: usize, opts: Options) -> Result<DictPass> {
        opts.check()?;
        Ok(DictPass {
            opts,
            d_sae,
            n_tokens: 0,
            contexts_done: 0,
            latents: (0..d_sae).map(|_| LatentState::new()).collect(),
            encoder: None,
            buf: Vec::new(),
        })
    }

    /// Use [`Sae::encode`] for every dictionary (the plain path the fast encoder is checked
    /// against).
    pub fn plain_encoder(mut self) -> Self {
        self.encoder = Some(None);
        self
    }

    pub fn n_tokens(&self) -> u64 {
        self.n_tokens
    }

    /// Contexts consumed: the next chunk must start here.
    pub fn contexts_done(&self) -> u64 {
        self.contexts_done
    }

    /// Encodes a chunk with `sae` and folds it into the state.
    pub fn push(&mut self, sae: &Sae, chunk: &Chunk) -> Result<()> {
        let cs = chunk.context_size;
        if cs == 0 || !chunk.tokens.len().is_multiple_of(cs) {
            return Err(Error::msg(format!(
                "a chunk of {} tokens is not made of whole contexts of {cs}",
                chunk.tokens.len()
            )));
        }
        let rows = chunk.tokens.len();
        let (n, d) = chunk.acts.dims2()?;
        if n != rows || chunk.keep.len() != rows {
            return Err(Error::msg(format!(
                "a chunk has {rows} tokens but {n} activation rows and {} keep flags",
                chunk.keep.len()
            )));
        }
        if d != sae.cfg.d_in {
            return Err(Error::msg(format!(
                "activations of width {d} for a dictionary of d_in {}",
                sae.cfg.d_in
            )));
        }
        if sae.cfg.d_sae != self.d_sae {
            return Err(Error::msg(format!(
                "a dictionary of {} latents for a pass over {}",
                sae.cfg.d_sae, self.d_sae
            )));
        }
        if chunk.first_context != self.contexts_done {
            return Err(Error::msg(format!(
                "chunk starts at context {} but the pass has consumed {}",
                chunk.first_context, self.contexts_done
            )));
        }
        let n_ctx = rows / cs;
        let step = self.opts.batch_contexts;
        let threads = self.opts.n_threads();
        if self.encoder.is_none() {
            self.encoder = Some(Encoder::new(sae)?);
        }
        let x = match self.encoder {
            Some(Some(_)) => chunk
                .acts
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?,
            _ => Vec::new(),
        };
        for c0 in (0..n_ctx).step_by(step) {
            let c1 = (c0 + step).min(n_ctx);
            let (r0, r1) = (c0 * cs, c1 * cs);
            let keep = &chunk.keep[r0..r1];
            let mut buf = std::mem::take(&mut self.buf);
            let nz = match &self.encoder {
                Some(Some(enc)) => enc.encode(&x[r0 * d..r1 * d], keep, &mut buf, threads),
                _ => {
                    let f = sae.encode(&chunk.acts.narrow(0, r0, r1 - r0)?)?; // [r, d_sae]
                    buf = f.flatten_all()?.to_vec1::<f32>()?;
                    sparsify(&mut buf, keep, self.d_sae)
                }
            };
            let batch = Batch {
                f: &buf,
                nz: &nz,
                d_sae: self.d_sae,
                tokens: &chunk.tokens[r0..r1],
                context_size: cs,
                first_context: chunk.first_context + c0 as u64,
            };
            self.scan(&batch);
            self.buf = buf;
        }
        self.n_tokens += chunk.keep.iter().filter(|&&k| k).count() as u64;
        self.contexts_done += n_ctx as u64;
        Ok(())
    }

    /// Folds one encoded batch into every latent, latents split across threads.
    fn scan(&mut self, batch: &Batch) {
        let threads = self.opts.n_threads().clamp(1, self.d_sae.max(1));
        let per = self.d_sae.div_ceil(threads);
        let opts = &self.opts;
        std::thread::scope(|s| {
            for (t, states) in self.latents.chunks_mut(per).enumerate() {
                s.spawn(move || scan_latents(batch, t * per, states, opts));
            }
        });
    }

    /// Builds the dashboards of latents `range` (statistics and contexts; the caller adds logit
    /// effects and similar latents). `token_text` turns ids into display strings.
    pub fn dashboards(
        &self,
        dict: &str,
        range: std::ops::Range<usize>,
        token_text: &dyn Fn(&[u32]) -> Vec<String>,
    ) -> Vec<LatentDashboard> {
        range.map(|l| self.dashboard(dict, l, token_text)).collect()
    }

    fn dashboard(
        &self,
        dict: &str,
        latent: usize,
        token_text: &dyn Fn(&[u32]) -> Vec<String>,
    ) -> LatentDashboard {
        let st = &self.latents[latent];
        let context = |w: &Window| Context {
            tokens: token_text(&w.tokens),
            token_ids: w.tokens.clone(),
            acts: w.acts.clone(),
            peak: (w.pos - w.start) as usize,
            peak_act: w.act,
            source_index: w.context,
            source_pos: w.pos,
        };
        let mut top: Vec<&Window> = st.top.iter().collect();
        top.sort_by(|a, b| b.act.total_cmp(&a.act).then(a.context.cmp(&b.context)));
        LatentDashboard {
            dict: dict.to_string(),
            latent: latent as u32,
            n_fired: st.n_fired,
            density: if self.n_tokens == 0 {
                0.0
            } else {
                st.n_fired as f64 / self.n_tokens as f64
            },
            max_act: st.max,
            mean_act: if st.n_fired == 0 {
                0.0
            } else {
                (st.sum / st.n_fired as f64) as f32
            },
            histogram: log_histogram(&st.hist),
            top_contexts: top.into_iter().map(context).collect(),
            quantiles: self.bands(st, &context),
            top_logits: Vec::new(),
            bottom_logits: Vec::new(),
            logit_histogram: Histogram {
                edges: Vec::new(),
                counts: Vec::new(),
            },
            similar: Vec::new(),
        }
    }

    /// SAEDashboard's quantile groups: `n_bands` equal-width intervals of `(0, max]`, highest
    /// first, each with up to `per_band` firings drawn from the reservoir (in reservoir order,
    /// which is random). `fraction` is estimated from the reservoir, a uniform sample.
    fn bands(&self, st: &LatentState, context: &dyn Fn(&Window) -> Context) -> Vec<QuantileGroup> {
        let nb = self.opts.n_bands;
        if st.n_fired == 0 || nb == 0 || st.reservoir.is_empty() {
            return Vec::new();
        }
        let width = st.max / nb as f32;
        let band_of = |a: f32| (((a / width).ceil() as usize).max(1) - 1).min(nb - 1);
        let mut groups: Vec<QuantileGroup> = (0..nb)
            .rev()
            .map(|b| QuantileGroup {
                name: format!(
                    "Interval {b}: {:.3} - {:.3}",
                    b as f32 * width,
                    (b + 1) as f32 * width
                ),
                lower: b as f32 * width,
                upper: (b + 1) as f32 * width,
                fraction: 0.0,
                contexts: Vec::new(),
            })
            .collect();
        let total = st.reservoir.len() as f64;
        for w in &st.reservoir {
            let g = &mut groups[nb - 1 - band_of(w.act)];
            g.fraction += 1.0 / total;
            if g.contexts.len() < self.opts.per_band {
                g.contexts.push(context(w));
            }
        }
        groups.retain(|g| g.fraction > 0.0);
        groups
    }
}

fn log_histogram(counts: &[u32]) -> Histogram {
    let first = counts.iter().position(|&c| c > 0);
    let last = counts.iter().rposition(|&c| c > 0);
    match (first, last) {
        (Some(a), Some(b)) => Histogram {
            edges: (a..=b + 1).map(hist_edge).collect(),
            counts: counts[a..=b].iter().map(|&c| c as u64).collect(),
        },
        _ => Histogram {
            edges: Vec::new(),
            counts: Vec::new(),
        },
    }
}

/// Folds the firings of latents `first..first + states.len()` in a batch into their states.
fn scan_latents(batch: &Batch, first: usize, states: &mut [LatentState], opts: &Options) {
    let (lo, hi) = (first as u32, (first + states.len()) as u32);
    for (row, nz) in batch.nz.iter().enumerate() {
        let from = nz.partition_point(|e| e.0 < lo);
        for &(j, a) in nz[from..].iter().take_while(|e| e.0 < hi) {
            if a > 0.0 {
                fire(
                    batch,
                    row,
                    j as usize,
                    a,
                    &mut states[(j - lo) as usize],
                    opts,
                );
            }
        }
    }
}

/// Folds one firing `a` of `latent` at `row` into its state.
fn fire(batch: &Batch, row: usize, latent: usize, a: f32, st: &mut LatentState, opts: &Options) {
    st.n_fired += 1;
    st.sum += a as f64;
    st.max = st.max.max(a);
    st.hist[hist_bin(a)] += 1;
    // Top contexts: one entry per source context, ties keep the earlier firing.
    let context = batch.first_context + (row / batch.context_size) as u64;
    let full = st.top.len() >= opts.top_k;
    let min = st.top.iter().enumerate().min_by(|x, y| {
        x.1.act
            .total_cmp(&y.1.act)
            .then(y.1.context.cmp(&x.1.context))
    });
    let enters = !full || min.is_some_and(|(_, w)| a > w.act);
    if enters {
        if let Some(same) = st.top.iter().position(|w| w.context == context) {
            if a > st.top[same].act {
                st.top[same] = batch.window(row, latent, a, opts);
            }
        } else if full {
            if let Some((i, _)) = min {
                st.top[i] = batch.window(row, latent, a, opts);
            }
        } else {
            st.top.push(batch.window(row, latent, a, opts));
        }
    }
    // Reservoir (algorithm R) over all firings.
    if opts.reservoir > 0 {
        if st.reservoir.len() < opts.reservoir {
            st.reservoir.push(batch.window(row, latent, a, opts));
        } else {
            let r = mix(opts.seed ^ mix(latent as u64) ^ st.n_fired.wrapping_mul(0x2545_f491));
            let j = (r % st.n_fired) as usize;
            if j < opts.reservoir {
                st.reservoir[j] = batch.window(row, latent, a, opts);
            }
        }
    }
}

/// One latent's effect on the logits.
pub struct LogitEffects {
    /// Most promoted tokens, strongest first; most suppressed, strongest first.
    pub top: Vec<TokenValue>,
    pub bottom: Vec<TokenValue>,
    /// Histogram of the effect on every token.
    pub histogram: Histogram,
}

/// Top and bottom tokens of each latent's decoder row through the unembedding, and a histogram
/// of the whole effect vector, for latents `range`.
///
/// The effect of latent `i` on the logits is `(W_dec[i] ⊙ g) @ W_U`, where `g` is the final
/// normaliser's weight when given (as TransformerLens folds it into `W_U`, which is what
/// SAEDashboard reads) and `W_U = w_u_rows^T`.
///
/// # Shapes
/// - `w_u_rows [d_vocab, d_model]`, `norm_weight [d_model]`
pub fn logit_effects(
    sae: &Sae,
    w_u_rows: &Tensor,
    norm_weight: Option<&Tensor>,
    range: std::ops::Range<usize>,
    opts: &Options,
    token_text: &dyn Fn(&[u32]) -> Vec<String>,
) -> Result<Vec<LogitEffects>> {
    let w_dec = decoder(sae)?; // [d_sae, d_out]
    let d_vocab = w_u_rows.dim(0)?;
    if w_u_rows.dim(1)? != w_dec.dim(1)? {
        return Err(Error::msg(format!(
            "decoder rows of width {} cannot be unembedded by a model of d_model {}",
            w_dec.dim(1)?,
            w_u_rows.dim(1)?
        )));
    }
    let mut rows = w_dec.narrow(0, range.start, range.len())?;
    if let Some(g) = norm_weight {
        rows = rows.broadcast_mul(&g.to_dtype(DType::F32)?)?;
    }
    let eff = rows.matmul(&w_u_rows.to_dtype(DType::F32)?.t()?)?; // [r, d_vocab]
    let eff = eff.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(range.len());
    for row in eff.chunks(d_vocab) {
        let mut idx: Vec<u32> = (0..d_vocab as u32).collect();
        let n = opts.n_logits.min(d_vocab);
        let pick = |idx: &[u32]| -> Vec<TokenValue> {
            let strings = token_text(idx);
            idx.iter()
                .zip(strings)
                .map(|(&t, s)| TokenValue {
                    token_id: t,
                    token: s,
                    value: row[t as usize],
                })
                .collect()
        };
        let desc = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
        let top = if n > 0 {
            idx.select_nth_unstable_by(n - 1, desc);
            let mut t = idx[..n].to_vec();
            t.sort_by(desc);
            pick(&t)
        } else {
            Vec::new()
        };
        let asc = |a: &u32, b: &u32| row[*a as usize].total_cmp(&row[*b as usize]).then(a.cmp(b));
        let bottom = if n > 0 {
            idx.select_nth_unstable_by(n - 1, asc);
            let mut t = idx[..n].to_vec();
            t.sort_by(asc);
            pick(&t)
        } else {
            Vec::new()
        };
        out.push(LogitEffects {
            top,
            bottom,
            histogram: linear_histogram(row, opts.logit_bins),
        });
    }
    Ok(out)
}

/// `bins` equal-width bins from the minimum to the maximum of `values`.
fn linear_histogram(values: &[f32], bins: usize) -> Histogram {
    let lo = values.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if bins == 0 || !lo.is_finite() || !hi.is_finite() {
        return Histogram {
            edges: Vec::new(),
            counts: Vec::new(),
        };
    }
    let width = if hi > lo {
        (hi - lo) / bins as f32
    } else {
        1.0
    };
    let mut counts = vec![0u64; bins];
    for &v in values {
        let b = (((v - lo) / width) as usize).min(bins - 1);
        counts[b] += 1;
    }
    Histogram {
        edges: (0..=bins).map(|i| lo + i as f32 * width).collect(),
        counts,
    }
}

/// `W_dec [d_sae, d_out]` as f32 on the CPU.
fn decoder(sae: &Sae) -> Result<Tensor> {
    let w = sae
        .tensor("W_dec")
        .ok_or_else(|| Error::msg("the dictionary has no W_dec"))?;
    Ok(w.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
}

/// For latents `range`, the `opts.n_similar` other latents whose decoder rows have the highest
/// cosine similarity, most similar first (ties by index). One block GEMM against the whole
/// dictionary.
pub fn similar_latents(
    sae: &Sae,
    range: std::ops::Range<usize>,
    opts: &Options,
) -> Result<Vec<Vec<Similar>>> {
    let w = decoder(sae)?;
    let norm = w
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    let unit = w.broadcast_div(&norm)?; // [d_sae, d]
    let block = unit.narrow(0, range.start, range.len())?;
    let cos = block.matmul(&unit.t()?)?; // [r, d_sae]
    let d_sae = unit.dim(0)?;
    let cos = cos.flatten_all()?.to_vec1::<f32>()?;
    let n = opts.n_similar.min(d_sae.saturating_sub(1));
    Ok(cos
        .chunks(d_sae)
        .zip(range)
        .map(|(row, me)| {
            if n == 0 {
                return Vec::new();
            }
            let mut idx: Vec<u32> = (0..d_sae as u32).filter(|&j| j as usize != me).collect();
            let desc =
                |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
            idx.select_nth_unstable_by(n - 1, desc);
            let mut t = idx[..n].to_vec();
            t.sort_by(desc);
            t.into_iter()
                .map(|j| Similar {
                    latent: j,
                    cosine: row[j as usize],
                })
                .collect()
        })
        .collect())
}

// ---- checkpoints -------------------------------------------------------------------------------

const MAGIC: &[u8; 8] = b"SCDASH01";

fn w_u64(w: &mut dyn Write, v: u64) -> std::io::Result<()> {
    w.write_all(&v.to_le_bytes())
}

fn w_f32s(w: &mut dyn Write, v: &[f32]) -> std::io::Result<()> {
    w_u64(w, v.len() as u64)?;
    let mut buf = Vec::with_capacity(v.len() * 4);
    for x in v {
        buf.extend_from_slice(&x.to_le_bytes());
    }
    w.write_all(&buf)
}

fn w_u32s(w: &mut dyn Write, v: &[u32]) -> std::io::Result<()> {
    w_u64(w, v.len() as u64)?;
    let mut buf = Vec::with_capacity(v.len() * 4);
    for x in v {
        buf.extend_from_slice(&x.to_le_bytes());
    }
    w.write_all(&buf)
}

fn r_u64(r: &mut dyn Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn r_len(r: &mut dyn Read, max: usize) -> std::io::Result<usize> {
    let n = r_u64(r)? as usize;
    if n > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a length of {n} where at most {max} is possible"),
        ));
    }
    Ok(n)
}

fn r_words(r: &mut dyn Read, max: usize) -> std::io::Result<Vec<[u8; 4]>> {
    let n = r_len(r, max)?;
    let mut buf = vec![0u8; n * 4];
    r.read_exact(&mut buf)?;
    Ok(buf
        .chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect())
}

fn r_f32s(r: &mut dyn Read, max: usize) -> std::io::Result<Vec<f32>> {
    Ok(r_words(r, max)?
        .into_iter()
        .map(f32::from_le_bytes)
        .collect())
}

fn r_u32s(r: &mut dyn Read, max: usize) -> std::io::Result<Vec<u32>> {
    Ok(r_words(r, max)?
        .into_iter()
        .map(u32::from_le_bytes)
        .collect())
}

fn write_window(w: &mut dyn Write, x: &Window) -> std::io::Result<()> {
    w.write_all(&x.act.to_le_bytes())?;
    w_u64(w, x.context)?;
    w_u64(w, ((x.pos as u64) << 32) | x.start as u64)?;
    w_u32s(w, &x.tokens)?;
    w_f32s(w, &x.acts)
}

fn read_window(r: &mut dyn Read, max_len: usize) -> std::io::Result<Window> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    let act = f32::from_le_bytes(b);
    let context = r_u64(r)?;
    let ps = r_u64(r)?;
    Ok(Window {
        act,
        context,
        pos: (ps >> 32) as u32,
        start: ps as u32,
        tokens: r_u32s(r, max_len)?,
        acts: r_f32s(r, max_len)?,
    })
}

impl DictPass {
    /// Writes the state (binary, little-endian), headed by `fingerprint`, which names the inputs.
    pub fn save(&self, w: &mut dyn Write, fingerprint: &str) -> std::io::Result<()> {
        w.write_all(MAGIC)?;
        let fp = fingerprint.as_bytes();
        w_u64(w, fp.len() as u64)?;
        w.write_all(fp)?;
        let opts = serde_json::to_vec(&self.opts)?;
        w_u64(w, opts.len() as u64)?;
        w.write_all(&opts)?;
        w_u64(w, self.d_sae as u64)?;
        w_u64(w, self.n_tokens)?;
        w_u64(w, self.contexts_done)?;
        for st in &self.latents {
            w_u64(w, st.n_fired)?;
            w.write_all(&st.sum.to_le_bytes())?;
            w.write_all(&st.max.to_le_bytes())?;
            w_u32s(w, &st.hist)?;
            w_u64(w, st.top.len() as u64)?;
            for x in &st.top {
                write_window(w, x)?;
            }
            w_u64(w, st.reservoir.len() as u64)?;
            for x in &st.reservoir {
                write_window(w, x)?;
            }
        }
        Ok(())
    }

    /// Reads a state written by [`DictPass::save`], refusing one made from other inputs
    /// (`fingerprint`) or with other options.
    pub fn load(r: &mut dyn Read, fingerprint: &str, opts: &Options) -> Result<DictPass> {
        let bad = |what: String| Error::msg(format!("checkpoint: {what}"));
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(bad("not a dashboard checkpoint".into()));
        }
        let n = r_len(r, 1 << 20)?;
        let mut fp = vec![0u8; n];
        r.read_exact(&mut fp)?;
        if fp != fingerprint.as_bytes() {
            return Err(bad(format!(
                "it was made from different inputs (dictionary, data or model): its inputs are \
                 {}, these are {fingerprint}; delete it or choose another --out",
                String::from_utf8_lossy(&fp)
            )));
        }
        let n = r_len(r, 1 << 20)?;
        let mut o = vec![0u8; n];
        r.read_exact(&mut o)?;
        let saved: Options = serde_json::from_slice(&o)?;
        // The thread count changes nothing in the result.
        let same = Options {
            threads: opts.threads,
            ..saved.clone()
        } == *opts;
        if !same {
            return Err(bad(format!(
                "it was made with other options ({}); resume with the same options",
                String::from_utf8_lossy(&o)
            )));
        }
        let d_sae = r_len(r, 1 << 28)?;
        let n_tokens = r_u64(r)?;
        let contexts_done = r_u64(r)?;
        let max_len = opts.before + opts.after + 1;
        let mut latents = Vec::with_capacity(d_sae);
        for _ in 0..d_sae {
            let n_fired = r_u64(r)?;
            let mut b8 = [0u8; 8];
            r.read_exact(&mut b8)?;
            let mut b4 = [0u8; 4];
            r.read_exact(&mut b4)?;
            let hist = r_u32s(r, HIST_BINS)?;
            if hist.len() != HIST_BINS {
                return Err(bad("a histogram of the wrong size".into()));
            }
            let n_top = r_len(r, opts.top_k)?;
            let top = (0..n_top)
                .map(|_| read_window(r, max_len))
                .collect::<std::io::Result<_>>()?;
            let n_res = r_len(r, opts.reservoir)?;
            let reservoir = (0..n_res)
                .map(|_| read_window(r, max_len))
                .collect::<std::io::Result<_>>()?;
            latents.push(LatentState {
                n_fired,
                sum: f64::from_le_bytes(b8),
                max: f32::from_le_bytes(b4),
                hist,
                top,
                reservoir,
            });
        }
        Ok(DictPass {
            opts: opts.clone(),
            d_sae,
            n_tokens,
            contexts_done,
            latents,
            encoder: None,
            buf: Vec::new(),
        })
    }
}

// ---- a whole run --------------------------------------------------------------------------------

/// The passes of every dictionary of one run, with their checkpoint.
pub struct Run {
    pub passes: Vec<DictPass>,
    fingerprint: String,
    checkpoint: PathBuf,
}

impl Run {
    /// Starts a run over dictionaries with `d_saes` latents, or resumes it from `checkpoint` when
    /// that file exists (refusing one made from other inputs: `fingerprint` names them).
    pub fn start(
        d_saes: &[usize],
        opts: &Options,
        checkpoint: &Path,
        fingerprint: &str,
    ) -> Result<Run> {
        opts.check()?;
        let passes = if checkpoint.is_file() {
            let file = std::fs::File::open(checkpoint)?;
            let mut r = std::io::BufReader::new(file);
            let n = r_len(&mut r, 1 << 16)
                .map_err(|e| Error::msg(format!("checkpoint {}: {e}", checkpoint.display())))?;
            let passes: Vec<DictPass> = (0..n)
                .map(|_| DictPass::load(&mut r, fingerprint, opts))
                .collect::<Result<_>>()
                .map_err(|e| Error::msg(format!("{} ({})", e, checkpoint.display())))?;
            let sizes: Vec<usize> = passes.iter().map(|p| p.d_sae).collect();
            if sizes != d_saes {
                return Err(Error::msg(format!(
                    "checkpoint {} holds dictionaries of {sizes:?} latents, not {d_saes:?}",
                    checkpoint.display()
                )));
            }
            tracing::info!(
                contexts = passes.first().map_or(0, |p| p.contexts_done),
                "resuming from a checkpoint"
            );
            passes
        } else {
            d_saes
                .iter()
                .map(|&d| DictPass::new(d, opts.clone()))
                .collect::<Result<_>>()?
        };
        Ok(Run {
            passes,
            fingerprint: fingerprint.to_string(),
            checkpoint: checkpoint.to_path_buf(),
        })
    }

    /// Contexts every pass has consumed.
    pub fn contexts_done(&self) -> u64 {
        self.passes
            .iter()
            .map(|p| p.contexts_done)
            .min()
            .unwrap_or(0)
    }

    /// Writes the checkpoint atomically.
    pub fn save(&self) -> Result<()> {
        scalpel_models::files::write_atomically(&self.checkpoint, |w| {
            w_u64(w, self.passes.len() as u64)?;
            for p in &self.passes {
                p.save(w, &self.fingerprint)?;
            }
            Ok(())
        })
        .map_err(|(p, e)| Error::msg(format!("could not write checkpoint {}: {e}", p.display())))
    }

    /// Removes the checkpoint (after the results are stored).
    pub fn remove_checkpoint(&self) -> Result<()> {
        match std::fs::remove_file(&self.checkpoint) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

/// Names the inputs of a run: the data (a description such as a store manifest) and every
/// dictionary's config and weights.
pub fn fingerprint(data: &str, saes: &[&Sae]) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(data.as_bytes());
    for sae in saes {
        h.update(sae.cfg.to_json().as_bytes());
        for (name, t) in sae.named_tensors() {
            h.update(name.as_bytes());
            for x in t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
                h.update(x.to_le_bytes());
            }
        }
    }
    Ok(format!("{:x}", h.finalize())[..16].to_string())
}

/// Rows a store's readers keep: not an excluded token, inside the `seqpos_slice`.
pub fn keep_rows(meta: &StoreMeta, tokens: &[u32]) -> Vec<bool> {
    let cs = meta.context_size.max(1);
    let pos_mask = meta
        .seqpos_slice
        .map(|s| s.mask(cs))
        .unwrap_or_else(|| vec![true; cs]);
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| pos_mask[i % cs] && !meta.exclude_token_ids.contains(t))
        .collect()
}

/// A dictionary of a run and the hook (of the store) it reads.
pub struct DictSource<'a> {
    pub sae: &'a Sae,
    pub hook: String,
}

/// Runs (or resumes) `run` over the shards of an activation store, checkpointing every
/// `checkpoint_every` shards and at the end. `stop_after` stops after that many shards of this
/// call (to test resuming). `progress` is told the tokens of each shard done.
pub fn run_store(
    run: &mut Run,
    reader: &StoreReader,
    dicts: &[DictSource],
    checkpoint_every: usize,
    stop_after: Option<usize>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let manifest = reader.manifest();
    let meta = &manifest.meta;
    for d in dicts {
        let width = manifest.hook_d(&d.hook)?;
        if width != d.sae.cfg.d_in {
            return Err(Error::msg(format!(
                "the dictionary reads `{}` with d_in {} but the store holds it with width {width}",
                d.hook, d.sae.cfg.d_in
            )));
        }
    }
    let mut first = 0u64;
    let mut done_here = 0usize;
    for (i, entry) in manifest.shards.iter().enumerate() {
        let n = entry.n_contexts as u64;
        if first + n <= run.contexts_done() {
            first += n;
            continue;
        }
        if first != run.contexts_done() {
            return Err(Error::msg(format!(
                "the checkpoint stopped at context {} inside shard {i}; it was made from another store",
                run.contexts_done()
            )));
        }
        if stop_after.is_some_and(|s| done_here >= s) {
            break;
        }
        let shard = reader.shard(i)?;
        let tokens = shard.tokens()?.flatten_all()?.to_vec1::<u32>()?;
        let keep = keep_rows(meta, &tokens);
        for (d, pass) in dicts.iter().zip(run.passes.iter_mut()) {
            let acts = shard.activations(&d.hook)?;
            pass.push(
                d.sae,
                &Chunk {
                    first_context: first,
                    context_size: meta.context_size,
                    tokens: &tokens,
                    acts: &acts,
                    keep: &keep,
                },
            )?;
        }
        first += n;
        done_here += 1;
        progress(tokens.len() as u64);
        if checkpoint_every > 0 && done_here.is_multiple_of(checkpoint_every) {
            run.save()?;
        }
    }
    run.save()
}

/// How to turn decoder rows into logit effects: the unembedding `[d_vocab, d_model]` and,
/// optionally, the final normaliser's weight `[d_model]` folded in.
pub struct Unembed<'a> {
    pub w_u_rows: &'a Tensor,
    pub norm_weight: Option<&'a Tensor>,
}

/// Builds every latent's dashboard from a finished pass and stores it in `db`, `block` latents at
/// a time (logit effects and similar latents are computed per block, so memory stays bounded).
#[allow(clippy::too_many_arguments)]
pub fn store_dashboards(
    db: &DashboardDb,
    info: &DictInfo,
    pass: &DictPass,
    sae: &Sae,
    unembed: Option<&Unembed>,
    token_text: &dyn Fn(&[u32]) -> Vec<String>,
    block: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    db.delete_dict(&info.id)?;
    db.put_dict(info)?;
    let d_sae = pass.d_sae;
    for lo in (0..d_sae).step_by(block.max(1)) {
        let range = lo..(lo + block.max(1)).min(d_sae);
        let mut dash = pass.dashboards(&info.id, range.clone(), token_text);
        if let Some(u) = unembed {
            let effects = logit_effects(
                sae,
                u.w_u_rows,
                u.norm_weight,
                range.clone(),
                &pass.opts,
                token_text,
            )?;
            for (d, e) in dash.iter_mut().zip(effects) {
                d.top_logits = e.top;
                d.bottom_logits = e.bottom;
                d.logit_histogram = e.histogram;
            }
        }
        for (d, sim) in dash
            .iter_mut()
            .zip(similar_latents(sae, range.clone(), &pass.opts)?)
        {
            d.similar = sim;
        }
        db.put_latents(&dash)?;
        progress(range.len() as u64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bins_are_log_spaced_and_cover_their_values() {
        for a in [1e-3f32, 0.3, 1.0, 1.7, 42.0] {
            let b = hist_bin(a);
            assert!(
                hist_edge(b) <= a && a < hist_edge(b + 1),
                "{a} not in bin {b}"
            );
        }
        assert_eq!(hist_bin(1e-30), 0);
        assert_eq!(hist_bin(1e30), HIST_BINS - 1);
    }

    #[test]
    fn linear_histogram_counts_every_value() {
        let h = linear_histogram(&[0.0, 1.0, 2.0, 3.0, 4.0], 4);
        assert_eq!(h.counts, vec![1, 1, 1, 2]);
        assert_eq!(h.edges.len(), 5);
    }
}
