//! Activation patching and attribution patching over clean/corrupt prompt pairs.
//!
//! One run of the model (the *base*) has a slice of one activation replaced by its value in the
//! other run (the *source*), and the metric is read at the last position. Denoising runs the
//! corrupt prompts and patches in clean activations (which components suffice to restore the
//! behaviour); noising runs the clean prompts and patches in corrupt activations (which
//! components are necessary). Either way the score is normalised as
//! `(patched − corrupt) / (clean − corrupt)`: 1 means the patched run behaves like the clean run,
//! 0 like the corrupt run.
//!
//! Exact patching skips what a patch cannot change. A patch at block `L` leaves everything below
//! it as in the base run, so the patched run starts at block `L` from the base run's cached
//! residual. A patch at position `P` leaves positions before `P` unchanged, so only positions
//! `P..` are run, attending to the base run's cached keys and values of the earlier positions.
//! Positions before the first token where the clean and corrupt prompts differ hold identical
//! activations in both runs, so patches there are known to change nothing and are not run.
//! The variants of one sweep that share a start (every head of a layer) run as one batch.
//!
//! Attribution patching (Nanda 2023; Syed et al. 2023) estimates every cell at once to first
//! order: `(source − base) · ∂metric/∂activation`, from one forward and one backward pass of the
//! base run, summed over the cell's slice.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use scalpel_core::{ActivationCache, BlockHook, HookPoint, Hooks};
use scalpel_models::transformer::{KvCache, Model, RunOptions};

use crate::metric::Metric;
use crate::pairs::TokenPair;
use crate::{CircuitError, Result};

/// Which run is patched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Run the corrupt prompts, patch in clean activations.
    Denoise,
    /// Run the clean prompts, patch in corrupt activations.
    Noise,
}

impl Direction {
    /// `denoise` or `noise`.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Denoise => "denoise",
            Direction::Noise => "noise",
        }
    }
}

/// What is patched, and over which grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sweep {
    /// `hook_resid_pre`, by layer × position.
    ResidPre,
    /// `hook_attn_out`, by layer × position.
    AttnOut,
    /// `hook_mlp_out`, by layer × position.
    MlpOut,
    /// One head's `hook_z` at every position, by layer × head.
    ZHead,
    /// One head's `hook_z` at one position, by layer × head × position.
    ZHeadPos,
    /// One head's queries (`hook_q`), by layer × head.
    QHead,
    /// One key/value head's keys (`hook_k`), by layer × key/value head.
    KHead,
    /// One key/value head's values (`hook_v`), by layer × key/value head.
    VHead,
    /// One head's attention pattern (`hook_pattern`), by layer × head.
    PatternHead,
}

impl Sweep {
    /// Every sweep.
    pub const ALL: [Sweep; 9] = [
        Sweep::ResidPre,
        Sweep::AttnOut,
        Sweep::MlpOut,
        Sweep::ZHead,
        Sweep::ZHeadPos,
        Sweep::QHead,
        Sweep::KHead,
        Sweep::VHead,
        Sweep::PatternHead,
    ];

    /// The sweep's name (`resid_pre`, `z_head_pos`…), as parsed by [`Sweep::parse`].
    pub fn name(self) -> &'static str {
        match self {
            Sweep::ResidPre => "resid_pre",
            Sweep::AttnOut => "attn_out",
            Sweep::MlpOut => "mlp_out",
            Sweep::ZHead => "z_head",
            Sweep::ZHeadPos => "z_head_pos",
            Sweep::QHead => "q_head",
            Sweep::KHead => "k_head",
            Sweep::VHead => "v_head",
            Sweep::PatternHead => "pattern_head",
        }
    }

    /// Parses a sweep name; a few short forms (`resid`, `z`, `z_pos`, `q`, `k`, `v`, `pattern`)
    /// are accepted too.
    pub fn parse(s: &str) -> Result<Sweep> {
        let s = s.trim();
        Ok(match s {
            "resid_pre" | "resid" => Sweep::ResidPre,
            "attn_out" => Sweep::AttnOut,
            "mlp_out" => Sweep::MlpOut,
            "z_head" | "z" | "heads" => Sweep::ZHead,
            "z_head_pos" | "z_pos" | "heads_pos" => Sweep::ZHeadPos,
            "q_head" | "q" => Sweep::QHead,
            "k_head" | "k" => Sweep::KHead,
            "v_head" | "v" => Sweep::VHead,
            "pattern_head" | "pattern" => Sweep::PatternHead,
            _ => {
                let names: Vec<&str> = Sweep::ALL.iter().map(|s| s.name()).collect();
                return Err(CircuitError::Input(format!(
                    "unknown sweep {s:?}; sweeps: {}",
                    names.join(", ")
                )));
            }
        })
    }

    /// The block hook patched.
    pub fn hook(self) -> BlockHook {
        match self {
            Sweep::ResidPre => BlockHook::ResidPre,
            Sweep::AttnOut => BlockHook::AttnOut,
            Sweep::MlpOut => BlockHook::MlpOut,
            Sweep::ZHead | Sweep::ZHeadPos => BlockHook::Z,
            Sweep::QHead => BlockHook::Q,
            Sweep::KHead => BlockHook::K,
            Sweep::VHead => BlockHook::V,
            Sweep::PatternHead => BlockHook::Pattern,
        }
    }

    /// True for sweeps with a position axis.
    pub fn by_position(self) -> bool {
        matches!(
            self,
            Sweep::ResidPre | Sweep::AttnOut | Sweep::MlpOut | Sweep::ZHeadPos
        )
    }

    /// Names of the grid's axes.
    pub fn axes(self) -> Vec<&'static str> {
        match self {
            Sweep::ResidPre | Sweep::AttnOut | Sweep::MlpOut => vec!["layer", "position"],
            Sweep::ZHead | Sweep::QHead | Sweep::PatternHead => vec!["layer", "head"],
            Sweep::KHead | Sweep::VHead => vec!["layer", "kv_head"],
            Sweep::ZHeadPos => vec!["layer", "head", "position"],
        }
    }

    /// The number of heads along the head axis (0 for sweeps without one).
    fn n_heads(self, model: &Model) -> usize {
        let c = model.config();
        match self {
            Sweep::ZHead | Sweep::ZHeadPos | Sweep::QHead | Sweep::PatternHead => c.n_heads,
            Sweep::KHead | Sweep::VHead => c.n_kv_heads,
            Sweep::ResidPre | Sweep::AttnOut | Sweep::MlpOut => 0,
        }
    }

    /// The grid's shape for prompts of `seq` tokens.
    pub fn shape(self, model: &Model, seq: usize) -> Vec<usize> {
        let l = model.config().n_layers;
        match self {
            Sweep::ResidPre | Sweep::AttnOut | Sweep::MlpOut => vec![l, seq],
            Sweep::ZHeadPos => vec![l, self.n_heads(model), seq],
            _ => vec![l, self.n_heads(model)],
        }
    }

    /// Checks the model has what the sweep patches.
    fn check(self, model: &Model) -> Result<()> {
        let hp = HookPoint::Block(0, self.hook());
        if !model.hook_points().contains(&hp) {
            return Err(CircuitError::Input(format!(
                "the {} sweep patches {hp}, which this model does not have",
                self.name()
            )));
        }
        Ok(())
    }
}

/// The result of one sweep. Cells are row-major over `shape` (`axes` names the axes).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PatchGrid {
    pub sweep: Sweep,
    pub direction: Direction,
    /// `exact`, `attribution`, or `path to …` (path patching, naming the receivers).
    pub method: String,
    pub metric: String,
    pub axes: Vec<&'static str>,
    pub shape: Vec<usize>,
    /// The metric of the patched run in each cell (for attribution: the base metric plus the
    /// first-order estimate of the change).
    pub values: Vec<f64>,
    /// `(value − corrupt) / (clean − corrupt)`.
    pub scores: Vec<f64>,
    /// The metric, averaged over pairs, of the unpatched clean and corrupt runs.
    pub clean: f64,
    pub corrupt: f64,
    /// Patched forward passes actually run (exact patching; 1 per pair group for attribution).
    pub runs: usize,
}

impl PatchGrid {
    /// The value of the cell at `index` (one coordinate per axis).
    pub fn score_at(&self, index: &[usize]) -> Option<f64> {
        if index.len() != self.shape.len() || index.iter().zip(&self.shape).any(|(i, n)| i >= n) {
            return None;
        }
        let flat = index
            .iter()
            .zip(&self.shape)
            .fold(0, |acc, (i, n)| acc * n + i);
        self.scores.get(flat).copied()
    }
}

/// Pearson correlation of two equally long series (`None` when either is constant).
pub fn correlation(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 2 {
        return None;
    }
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    (saa > 0.0 && sbb > 0.0).then(|| sab / (saa * sbb).sqrt())
}

/// Pairs of one token length, as token batches, before any run.
struct GroupSpec {
    seq: usize,
    members: Vec<usize>,
    answer: Vec<u32>,
    wrong: Vec<u32>,
    first_diff: usize,
    /// `[n, seq]` token ids.
    clean: Tensor,
    corrupt: Tensor,
}

/// Checks `pairs` against the model and the metric, and groups them by token length.
fn group_pairs(model: &Model, pairs: &[TokenPair], metric: &Metric) -> Result<Vec<GroupSpec>> {
    if pairs.is_empty() {
        return Err(CircuitError::Input("no prompt pairs to patch".into()));
    }
    let v = model.config().d_vocab;
    for (i, p) in pairs.iter().enumerate() {
        if p.clean.len() != p.corrupt.len() {
            return Err(CircuitError::Input(format!(
                "pair {}: clean has {} tokens and corrupt {}; patching needs equal lengths",
                i + 1,
                p.clean.len(),
                p.corrupt.len()
            )));
        }
        if p.clean.is_empty() {
            return Err(CircuitError::Input(format!("pair {}: empty prompt", i + 1)));
        }
        if p.clean.len() > model.config().n_ctx {
            return Err(CircuitError::Input(format!(
                "pair {}: {} tokens, longer than the model's context of {}",
                i + 1,
                p.clean.len(),
                model.config().n_ctx
            )));
        }
        for (what, &t) in [("answer", &p.answer), ("wrong answer", &p.wrong)] {
            if t as usize >= v {
                return Err(CircuitError::Input(format!(
                    "pair {}: {what} token id {t} is outside the vocabulary of {v}",
                    i + 1
                )));
            }
        }
    }
    if let Some(bad) = metric.fixed_tokens().into_iter().find(|&t| t as usize >= v) {
        return Err(CircuitError::Input(format!(
            "the metric reads token id {bad}, outside the vocabulary of {v}"
        )));
    }
    let mut by_len: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, p) in pairs.iter().enumerate() {
        match by_len.iter_mut().find(|(n, _)| *n == p.clean.len()) {
            Some((_, m)) => m.push(i),
            None => by_len.push((p.clean.len(), vec![i])),
        }
    }
    let dev = model.device();
    let mut groups = Vec::with_capacity(by_len.len());
    for (seq, members) in by_len {
        let rows = |f: &dyn Fn(&TokenPair) -> &Vec<u32>| -> Result<Tensor> {
            let flat: Vec<u32> = members.iter().flat_map(|&i| f(&pairs[i]).clone()).collect();
            Ok(Tensor::from_vec(flat, (members.len(), seq), dev)?)
        };
        let answer: Vec<u32> = members.iter().map(|&i| pairs[i].answer).collect();
        let wrong: Vec<u32> = members.iter().map(|&i| pairs[i].wrong).collect();
        let first_diff = members
            .iter()
            .map(|&i| {
                let p = &pairs[i];
                p.clean
                    .iter()
                    .zip(&p.corrupt)
                    .position(|(a, b)| a != b)
                    .unwrap_or(seq)
            })
            .min()
            .unwrap_or(0);
        groups.push(GroupSpec {
            clean: rows(&|p| &p.clean)?,
            corrupt: rows(&|p| &p.corrupt)?,
            seq,
            members,
            answer,
            wrong,
            first_diff,
        });
    }
    Ok(groups)
}

/// One run (clean or corrupt) of a group of pairs: its metric and what patching reads from it.
struct Run {
    /// `[n, seq]` token ids.
    tokens: Tensor,
    /// Every block's activations at the hooks the sweeps patch (and `hook_resid_pre`).
    cache: ActivationCache,
    /// Keys and values of every block.
    kv: KvCache,
    /// Metric of each pair.
    metric: Vec<f64>,
}

/// Pairs of one token length.
struct Group {
    seq: usize,
    /// Index of each pair in the caller's list.
    members: Vec<usize>,
    answer: Vec<u32>,
    wrong: Vec<u32>,
    /// The first position where some pair's clean and corrupt tokens differ.
    first_diff: usize,
    clean: Run,
    corrupt: Run,
}

impl Group {
    /// The run that is patched and the run the patches come from.
    fn runs(&self, direction: Direction) -> (&Run, &Run) {
        match direction {
            Direction::Denoise => (&self.corrupt, &self.clean),
            Direction::Noise => (&self.clean, &self.corrupt),
        }
    }
}

/// A set of prompt pairs ready for patching: both runs done and cached.
pub struct Patcher<'m> {
    model: &'m Model,
    metric: Metric,
    groups: Vec<Group>,
    n_pairs: usize,
    clean: f64,
    corrupt: f64,
}

/// The hooks a patching experiment reads, in every block.
const CACHED: [BlockHook; 8] = [
    BlockHook::ResidPre,
    BlockHook::AttnOut,
    BlockHook::MlpOut,
    BlockHook::Z,
    BlockHook::Q,
    BlockHook::K,
    BlockHook::V,
    BlockHook::Pattern,
];

impl<'m> Patcher<'m> {
    /// Runs the clean and corrupt prompts of `pairs` (grouped by token length) and caches what
    /// patching needs.
    pub fn new(model: &'m Model, pairs: &[TokenPair], metric: &Metric) -> Result<Self> {
        let mut groups = Vec::new();
        for spec in group_pairs(model, pairs, metric)? {
            let clean = run(model, spec.clean, metric, &spec.answer, &spec.wrong)?;
            let corrupt = run(model, spec.corrupt, metric, &spec.answer, &spec.wrong)?;
            groups.push(Group {
                seq: spec.seq,
                members: spec.members,
                answer: spec.answer,
                wrong: spec.wrong,
                first_diff: spec.first_diff,
                clean,
                corrupt,
            });
        }
        let n_pairs = pairs.len();
        let mean = |f: &dyn Fn(&Group) -> &Run| {
            groups.iter().flat_map(|g| f(g).metric.iter()).sum::<f64>() / n_pairs as f64
        };
        let clean = mean(&|g| &g.clean);
        let corrupt = mean(&|g| &g.corrupt);
        Ok(Patcher {
            model,
            metric: metric.clone(),
            groups,
            n_pairs,
            clean,
            corrupt,
        })
    }

    /// Number of groups of pairs (one per token length).
    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// The metric averaged over the clean runs.
    pub fn clean_metric(&self) -> f64 {
        self.clean
    }

    /// The metric averaged over the corrupt runs.
    pub fn corrupt_metric(&self) -> f64 {
        self.corrupt
    }

    /// The metric of each clean and corrupt run, in the caller's pair order.
    pub fn per_pair(&self) -> Vec<(f64, f64)> {
        let mut out = vec![(0.0, 0.0); self.n_pairs];
        for g in &self.groups {
            for (j, &i) in g.members.iter().enumerate() {
                out[i] = (g.clean.metric[j], g.corrupt.metric[j]);
            }
        }
        out
    }

    /// The one token length of all pairs, needed by sweeps with a position axis.
    fn seq_for(&self, sweep: Sweep) -> Result<usize> {
        if !sweep.by_position() || self.groups.len() == 1 {
            return Ok(self.groups[0].seq);
        }
        let lens: Vec<String> = self
            .groups
            .iter()
            .map(|g| {
                format!(
                    "{} tokens (pair {} and {} more)",
                    g.seq,
                    g.members[0] + 1,
                    g.members.len() - 1
                )
            })
            .collect();
        Err(CircuitError::Input(format!(
            "the {} sweep has a position axis, so every pair must have the same length; these \
             pairs have {}",
            sweep.name(),
            lens.join(", ")
        )))
    }

    fn normalise(&self, values: &[f64]) -> Vec<f64> {
        let d = self.clean - self.corrupt;
        values
            .iter()
            .map(|v| {
                if d == 0.0 {
                    0.0
                } else {
                    (v - self.corrupt) / d
                }
            })
            .collect()
    }

    /// Number of patched forward passes [`Patcher::exact`] runs for `sweep`.
    pub fn planned_runs(&self, sweep: Sweep) -> usize {
        self.groups
            .iter()
            .map(|g| jobs(self.model, sweep, g).len())
            .sum()
    }

    /// Exact activation patching: every cell of `sweep`. `progress(done, total)` is called after
    /// each batched run.
    pub fn exact(
        &self,
        sweep: Sweep,
        direction: Direction,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<PatchGrid> {
        sweep.check(self.model)?;
        let seq = self.seq_for(sweep)?;
        let shape = sweep.shape(self.model, seq);
        let cells: usize = shape.iter().product();
        let mut values = vec![0.0; cells];
        let total = self.planned_runs(sweep);
        let mut done = 0;
        for g in &self.groups {
            let (base, source) = g.runs(direction);
            let base_sum: f64 = base.metric.iter().sum();
            // Cells no job covers are known to equal the base run.
            let mut filled = vec![base_sum; cells];
            for job in jobs(self.model, sweep, g) {
                let sums = self.run_job(sweep, g, base, source, &job)?;
                for (cell, s) in job.cells.iter().zip(sums) {
                    filled[*cell] = s;
                }
                done += 1;
                progress(done, total);
            }
            for (v, f) in values.iter_mut().zip(filled) {
                *v += f;
            }
        }
        for v in &mut values {
            *v /= self.n_pairs as f64;
        }
        Ok(PatchGrid {
            sweep,
            direction,
            method: "exact".into(),
            metric: self.metric.name.clone(),
            axes: sweep.axes(),
            shape,
            scores: self.normalise(&values),
            values,
            clean: self.clean,
            corrupt: self.corrupt,
            runs: total,
        })
    }

    /// One batched patched run: every variant of `job` on every pair of the group; returns the
    /// metric summed over pairs, per variant.
    fn run_job(
        &self,
        sweep: Sweep,
        g: &Group,
        base: &Run,
        source: &Run,
        job: &Job,
    ) -> Result<Vec<f64>> {
        let model = self.model;
        let (n, seq) = (g.members.len(), g.seq);
        let nv = job.variants.len();
        let (layer, p0) = (job.layer, job.start);
        let rows = seq - p0;
        let hp = HookPoint::Block(layer, sweep.hook());
        let repeat = |t: &Tensor| -> Result<Tensor> {
            Ok(if nv == 1 {
                t.clone()
            } else {
                Tensor::cat(&vec![t; nv], 0)?
            })
        };
        // The residual entering block `layer`, positions p0.., for every variant.
        let mut x = cached(base, HookPoint::resid_pre(layer))?.narrow(1, p0, rows)?;
        let mut hooks = Hooks::new();
        if sweep == Sweep::ResidPre {
            // The patch is the input itself: row 0 (position p0) comes from the source.
            let src = cached(source, hp)?.narrow(1, p0, 1)?;
            let rest = x.narrow(1, 1, rows - 1)?;
            x = Tensor::cat(&[&src, &rest], 1)?;
        } else {
            let src = cached(source, hp)?;
            // Source rows this forward computes: positions p0.. (patterns: query rows p0..).
            let src = match sweep {
                Sweep::PatternHead => src.narrow(2, p0, rows)?,
                _ => src.narrow(1, p0, rows)?,
            };
            let src = repeat(&src.contiguous()?)?;
            let mask = patch_mask(sweep, &job.variants, n, rows, src.dims(), model.device())?;
            hooks = hooks.with_hook(hp, move |a, _| {
                // a + mask ⊙ (src − a): the source where the mask is 1, the run's own elsewhere.
                let delta = (&src - a)?.broadcast_mul(&mask)?;
                Ok(Some((a + delta)?))
            });
        }
        let x = repeat(&x.contiguous()?)?;
        let opts = RunOptions {
            stop_at_layer: Some(model.config().n_layers),
            differentiable: false,
        };
        let resid = if p0 == 0 {
            model.forward_from(layer, &x, None, &mut hooks, opts)?
        } else {
            let mut kv = base.kv.prefix(p0, nv)?;
            model.forward_from(layer, &x, Some(&mut kv), &mut hooks, opts)?
        };
        let last = resid.narrow(1, rows - 1, 1)?.squeeze(1)?; // [nv·n, d]
        let answer: Vec<u32> = (0..nv).flat_map(|_| g.answer.iter().copied()).collect();
        let wrong: Vec<u32> = (0..nv).flat_map(|_| g.wrong.iter().copied()).collect();
        let m = last_metric(model, &self.metric, &last, &answer, &wrong)?;
        Ok(m.chunks(n).map(|c| c.iter().sum()).collect())
    }

    /// The metric (averaged over pairs) after patching any set of slices at once, by plain full
    /// forward passes: each patch replaces, at its hook point, the positions listed (all when
    /// `None`) of the head given (the whole activation when `None`) by the source run's value.
    /// No patches gives the base run's metric.
    pub fn patched_metric(&self, direction: Direction, patches: &[Patch]) -> Result<f64> {
        let valid = self.model.hook_points();
        for p in patches {
            if !valid.contains(&p.point) {
                return Err(CircuitError::Input(format!(
                    "this model has no hook point {}",
                    p.point
                )));
            }
        }
        let mut total = 0.0;
        for g in &self.groups {
            let (base, source) = g.runs(direction);
            let (_, src) = self
                .model
                .run_with_cache(&source.tokens, |hp| patches.iter().any(|p| p.point == hp))?;
            let mut hooks = Hooks::new();
            for p in patches {
                let s = src
                    .get(p.point)
                    .ok_or_else(|| {
                        CircuitError::Input(format!("{} produced no activation", p.point))
                    })?
                    .clone();
                let patch = p.clone();
                hooks = hooks.with_hook(p.point, move |a, _| {
                    let mask = patch.mask(a.dims(), a.device())?;
                    Ok(Some((a + (&s - a)?.broadcast_mul(&mask)?)?))
                });
            }
            let logits = self.model.run_with_hooks(&base.tokens, &mut hooks)?;
            let last = logits.narrow(1, g.seq - 1, 1)?.squeeze(1)?;
            total += self
                .metric
                .eval(&last, &g.answer, &g.wrong)?
                .sum_all()?
                .to_scalar::<f32>()? as f64;
        }
        Ok(total / self.n_pairs as f64)
    }

    /// [`Patcher::patched_metric`] normalised: `(patched − corrupt) / (clean − corrupt)`.
    pub fn patched_score(&self, direction: Direction, patches: &[Patch]) -> Result<f64> {
        let v = self.patched_metric(direction, patches)?;
        Ok(self.normalise(&[v])[0])
    }

    /// Path patching (Wang et al. 2022): the effect of each head, as a sender, on the metric
    /// through the receivers only. For every head: (1) the base run with that head's `hook_z`
    /// taken from the source run while every other head's output stays at its base value (and,
    /// with `freeze_mlps`, every MLP's), recording what the receivers read; (2) the base run with
    /// only the receivers' inputs replaced by those recordings. With the logits as receiver,
    /// step (1) alone gives the metric. Heads at or after a receiver's layer cannot reach it and
    /// keep the base value. Grid: layer × head.
    pub fn path(
        &self,
        receivers: &[Receiver],
        direction: Direction,
        freeze_mlps: bool,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<PatchGrid> {
        let model = self.model;
        let c = model.config();
        if receivers.is_empty() {
            return Err(CircuitError::Input("path patching needs receivers".into()));
        }
        for r in receivers {
            r.check(model)?;
        }
        if freeze_mlps {
            Sweep::MlpOut.check(model)?;
        }
        let logits = receivers.iter().any(|r| matches!(r, Receiver::Logits));
        if logits && receivers.len() > 1 {
            return Err(CircuitError::Input(
                "the logits are a receiver on their own: path patching to heads and to the \
                 logits are separate experiments"
                    .into(),
            ));
        }
        // Senders must sit strictly below the lowest receiver.
        let top = receivers
            .iter()
            .map(|r| match r {
                Receiver::Logits => c.n_layers,
                Receiver::Head { layer, .. } => *layer,
            })
            .min()
            .unwrap_or(c.n_layers);
        let nh = c.n_heads;
        let mut values = vec![0.0; c.n_layers * nh];
        let total = self.groups.len() * top;
        let mut done = 0;
        for g in &self.groups {
            let (base, source) = g.runs(direction);
            let base_sum: f64 = base.metric.iter().sum();
            let mut filled = vec![base_sum; c.n_layers * nh];
            for l in 0..top {
                let sums = self.path_layer(g, base, source, l, receivers, freeze_mlps)?;
                for (h, s) in sums.into_iter().enumerate() {
                    filled[l * nh + h] = s;
                }
                done += 1;
                progress(done, total);
            }
            for (v, f) in values.iter_mut().zip(filled) {
                *v += f;
            }
        }
        for v in &mut values {
            *v /= self.n_pairs as f64;
        }
        let names: Vec<String> = receivers.iter().map(|r| r.to_string()).collect();
        Ok(PatchGrid {
            sweep: Sweep::ZHead,
            direction,
            method: format!("path to {}", names.join(", ")),
            metric: self.metric.name.clone(),
            axes: Sweep::ZHead.axes(),
            shape: vec![c.n_layers, nh],
            scores: self.normalise(&values),
            values,
            clean: self.clean,
            corrupt: self.corrupt,
            runs: 2 * total,
        })
    }

    /// Path patching of every head of layer `l` as senders (one batch): the metric summed over
    /// the group's pairs, per head.
    fn path_layer(
        &self,
        g: &Group,
        base: &Run,
        source: &Run,
        l: usize,
        receivers: &[Receiver],
        freeze_mlps: bool,
    ) -> Result<Vec<f64>> {
        let model = self.model;
        let c = model.config();
        let (n, seq, nh) = (g.members.len(), g.seq, c.n_heads);
        let p0 = g.first_diff.min(seq - 1);
        let rows = seq - p0;
        let variants: Vec<usize> = (0..nh).collect();
        let repeat = |t: &Tensor| -> Result<Tensor> {
            Ok(Tensor::cat(
                &vec![&t.narrow(1, p0, rows)?.contiguous()?; nh],
                0,
            )?)
        };
        let opts = RunOptions {
            stop_at_layer: Some(c.n_layers),
            differentiable: false,
        };
        let answer: Vec<u32> = (0..nh).flat_map(|_| g.answer.iter().copied()).collect();
        let wrong: Vec<u32> = (0..nh).flat_map(|_| g.wrong.iter().copied()).collect();
        let run_from = |layer: usize, hooks: &mut Hooks| -> Result<Tensor> {
            let x = repeat(cached(base, HookPoint::resid_pre(layer))?)?;
            Ok(if p0 == 0 {
                model.forward_from(layer, &x, None, hooks, opts)?
            } else {
                let mut kv = base.kv.prefix(p0, nh)?;
                model.forward_from(layer, &x, Some(&mut kv), hooks, opts)?
            })
        };
        // Step 1: the senders from the source, every other head (and MLP) frozen at base.
        let zp = HookPoint::Block(l, BlockHook::Z);
        let src = repeat(cached(source, zp)?)?;
        let mask = patch_mask(Sweep::ZHead, &variants, n, rows, src.dims(), model.device())?;
        let mut hooks = Hooks::new().with_hook(zp, move |a, _| {
            Ok(Some((a + (&src - a)?.broadcast_mul(&mask)?)?))
        });
        let mut frozen = Vec::new();
        for later in l + 1..c.n_layers {
            frozen.push(HookPoint::Block(later, BlockHook::Z));
        }
        if freeze_mlps {
            for layer in l..c.n_layers {
                frozen.push(HookPoint::Block(layer, BlockHook::MlpOut));
            }
        }
        for hp in frozen {
            let b = repeat(cached(base, hp)?)?;
            hooks = hooks.with_hook(hp, move |_, _| Ok(Some(b.clone())));
        }
        let wanted: Vec<HookPoint> = receivers.iter().filter_map(|r| r.point()).collect();
        let mut hooks = hooks.with_cache_points(wanted.clone());
        let resid = run_from(l, &mut hooks)?;
        let resid = if receivers.iter().any(|r| matches!(r, Receiver::Logits)) {
            resid
        } else {
            // Step 2: only the receivers' inputs change.
            let recorded = hooks.take_cache();
            let mut hooks = Hooks::new();
            for r in receivers {
                let (Receiver::Head { head, .. }, Some(hp)) = (r, r.point()) else {
                    continue;
                };
                let rec = recorded
                    .get(hp)
                    .ok_or_else(|| CircuitError::Input(format!("internal: {hp} was not recorded")))?
                    .clone();
                let dims = rec.dims().to_vec();
                let heads = dims[2];
                let mut m = vec![0f32; heads];
                let h = if heads == c.n_heads {
                    *head
                } else {
                    head / c.n_rep()
                };
                m[h] = 1.0;
                let m = Tensor::from_vec(m, (1, 1, heads, 1), model.device())?;
                hooks = hooks.with_hook(hp, move |a, _| {
                    Ok(Some((a + (&rec - a)?.broadcast_mul(&m)?)?))
                });
            }
            let first = receivers
                .iter()
                .filter_map(|r| match r {
                    Receiver::Head { layer, .. } => Some(*layer),
                    Receiver::Logits => None,
                })
                .min()
                .unwrap_or(l + 1);
            run_from(first, &mut hooks)?
        };
        let last = resid.narrow(1, rows - 1, 1)?.squeeze(1)?;
        let m = last_metric(model, &self.metric, &last, &answer, &wrong)?;
        Ok(m.chunks(n).map(|c| c.iter().sum()).collect())
    }

    /// Attribution patching: the first-order estimate of every cell of every sweep in
    /// `sweeps`, from one forward and one backward pass of each group's base run.
    pub fn attribution(&self, sweeps: &[Sweep], direction: Direction) -> Result<Vec<PatchGrid>> {
        for s in sweeps {
            s.check(self.model)?;
        }
        let model = self.model;
        let c = model.config();
        let mut shapes = Vec::with_capacity(sweeps.len());
        for &s in sweeps {
            let seq = self.seq_for(s)?;
            shapes.push((seq, s.shape(model, seq)));
        }
        let mut sums: Vec<Vec<f64>> = shapes
            .iter()
            .map(|(_, sh)| vec![0.0; sh.iter().product()])
            .collect();
        let mut base_total = 0.0;
        for g in &self.groups {
            let (base, source) = g.runs(direction);
            base_total += base.metric.iter().sum::<f64>();
            let mut hooks = Hooks::new();
            for l in 0..c.n_layers {
                for s in sweeps {
                    hooks = hooks.with_grad(HookPoint::Block(l, s.hook()));
                }
            }
            // The final residual; only its last position is unembedded, and only the
            // unembedding rows the metric reads when it needs no softmax.
            let opts = RunOptions {
                stop_at_layer: Some(c.n_layers),
                differentiable: true,
            };
            let resid = model.forward_with(&base.tokens, None, &mut hooks, opts)?;
            let last = resid.narrow(1, g.seq - 1, 1)?.squeeze(1)?;
            // The mean over all pairs, so the estimates add up across groups.
            let m = (last_metric_tensor(model, &self.metric, &last, &g.answer, &g.wrong)?
                .sum_all()?
                / self.n_pairs as f64)?;
            let grads = hooks.gradients(&m.backward()?)?;
            for (k, &s) in sweeps.iter().enumerate() {
                for l in 0..c.n_layers {
                    let hp = HookPoint::Block(l, s.hook());
                    let grad = &grads[&hp];
                    let prod = (cached(source, hp)? - cached(base, hp)?)?.mul(grad)?;
                    let per = reduce(s, &prod)?; // [n_heads or seq] or [heads, seq]
                    let block: usize = shapes[k].1[1..].iter().product();
                    for (j, v) in per.into_iter().enumerate() {
                        sums[k][l * block + j] += v;
                    }
                }
            }
        }
        let base_mean = base_total / self.n_pairs as f64;
        Ok(sweeps
            .iter()
            .zip(shapes)
            .zip(sums)
            .map(|((&sweep, (_, shape)), est)| {
                let values: Vec<f64> = est.iter().map(|e| base_mean + e).collect();
                PatchGrid {
                    sweep,
                    direction,
                    method: "attribution".into(),
                    metric: self.metric.name.clone(),
                    axes: sweep.axes(),
                    shape,
                    scores: self.normalise(&values),
                    values,
                    clean: self.clean,
                    corrupt: self.corrupt,
                    runs: self.groups.len(),
                }
            })
            .collect())
    }
}

/// What [`attribute`] returns: every sweep's grid and the unpatched metrics.
#[derive(Debug, Clone)]
pub struct Attribution {
    pub grids: Vec<PatchGrid>,
    /// The metric averaged over the clean and corrupt runs.
    pub clean: f64,
    pub corrupt: f64,
    /// The metric of each clean and corrupt run, in the caller's pair order.
    pub per_pair: Vec<(f64, f64)>,
}

/// Attribution patching on its own, without the caches exact patching needs: per group of
/// equal-length pairs, one forward pass of the source run that caches only the swept hooks
/// (stopping before the unembedding, whose metric rows are read at the last position only), and
/// one differentiable forward and backward pass of the base run, whose metric is read from that
/// same pass. Equal to [`Patcher::attribution`] (up to rounding), for about one forward pass less.
pub fn attribute(
    model: &Model,
    pairs: &[TokenPair],
    metric: &Metric,
    sweeps: &[Sweep],
    direction: Direction,
) -> Result<Attribution> {
    for s in sweeps {
        s.check(model)?;
    }
    let specs = group_pairs(model, pairs, metric)?;
    let c = model.config();
    let n_pairs = pairs.len();
    let mut shapes = Vec::with_capacity(sweeps.len());
    for &s in sweeps {
        if s.by_position() && specs.len() > 1 {
            return Err(CircuitError::Input(format!(
                "the {} sweep has a position axis, so every pair must have the same length; \
                 these pairs have {} different lengths",
                s.name(),
                specs.len()
            )));
        }
        shapes.push(s.shape(model, specs[0].seq));
    }
    let mut block_hooks: Vec<BlockHook> = sweeps.iter().map(|s| s.hook()).collect();
    block_hooks.sort_by_key(|h| format!("{h:?}"));
    block_hooks.dedup();
    let points: Vec<HookPoint> = (0..c.n_layers)
        .flat_map(|l| block_hooks.iter().map(move |&h| HookPoint::Block(l, h)))
        .collect();
    let mut sums: Vec<Vec<f64>> = shapes
        .iter()
        .map(|sh| vec![0.0; sh.iter().product()])
        .collect();
    let mut per_pair = vec![(0.0, 0.0); n_pairs];
    let mut base_total = 0.0;
    let opts = |differentiable| RunOptions {
        stop_at_layer: Some(c.n_layers),
        differentiable,
    };
    for g in &specs {
        let (base_tokens, source_tokens) = match direction {
            Direction::Denoise => (&g.corrupt, &g.clean),
            Direction::Noise => (&g.clean, &g.corrupt),
        };
        let last_of =
            |resid: &Tensor| -> Result<Tensor> { Ok(resid.narrow(1, g.seq - 1, 1)?.squeeze(1)?) };
        // The source run: its activations at the swept hooks and its metric.
        let mut hooks = Hooks::new().with_cache_points(points.clone());
        let resid = model.forward_with(source_tokens, None, &mut hooks, opts(false))?;
        let source_metric = last_metric(model, metric, &last_of(&resid)?, &g.answer, &g.wrong)?;
        let source = hooks.take_cache();
        drop(resid);
        // The base run, differentiable, caching the same hooks.
        let mut hooks = Hooks::new().with_cache_points(points.clone());
        for &p in &points {
            hooks = hooks.with_grad(p);
        }
        let resid = model.forward_with(base_tokens, None, &mut hooks, opts(true))?;
        let m = last_metric_tensor(model, metric, &last_of(&resid)?, &g.answer, &g.wrong)?;
        let base_metric = m.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        for (what, values) in [("source", &source_metric), ("base", &base_metric)] {
            if let Some(i) = values.iter().position(|x| !x.is_finite()) {
                return Err(CircuitError::Input(format!(
                    "the metric is not finite ({}) on the {what} run of pair {}",
                    values[i],
                    g.members[i] + 1
                )));
            }
        }
        for (j, &i) in g.members.iter().enumerate() {
            per_pair[i] = match direction {
                Direction::Denoise => (source_metric[j], base_metric[j]),
                Direction::Noise => (base_metric[j], source_metric[j]),
            };
        }
        base_total += base_metric.iter().sum::<f64>();
        // The mean over all pairs, so the estimates add up across groups.
        let loss = (m.sum_all()? / n_pairs as f64)?;
        let grads = hooks.gradients(&loss.backward()?)?;
        let base = hooks.take_cache();
        for (k, &s) in sweeps.iter().enumerate() {
            let block: usize = shapes[k][1..].iter().product();
            for l in 0..c.n_layers {
                let hp = HookPoint::Block(l, s.hook());
                let missing = || CircuitError::Input(format!("the model did not record {hp}"));
                let grad = grads.get(&hp).ok_or_else(missing)?;
                let src = source.get(hp).ok_or_else(missing)?;
                let bas = base.get(hp).ok_or_else(missing)?;
                let prod = (src - bas.detach())?.mul(grad)?;
                for (j, v) in reduce(s, &prod)?.into_iter().enumerate() {
                    sums[k][l * block + j] += v;
                }
            }
        }
    }
    let mean =
        |f: &dyn Fn(&(f64, f64)) -> f64| per_pair.iter().map(f).sum::<f64>() / n_pairs as f64;
    let (clean, corrupt) = (mean(&|p| p.0), mean(&|p| p.1));
    let base_mean = base_total / n_pairs as f64;
    let d = clean - corrupt;
    let grids = sweeps
        .iter()
        .zip(shapes)
        .zip(sums)
        .map(|((&sweep, shape), est)| {
            let values: Vec<f64> = est.iter().map(|e| base_mean + e).collect();
            let scores = values
                .iter()
                .map(|v| if d == 0.0 { 0.0 } else { (v - corrupt) / d })
                .collect();
            PatchGrid {
                sweep,
                direction,
                method: "attribution".into(),
                metric: metric.name.clone(),
                axes: sweep.axes(),
                shape,
                scores,
                values,
                clean,
                corrupt,
                runs: specs.len(),
            }
        })
        .collect();
    Ok(Attribution {
        grids,
        clean,
        corrupt,
        per_pair,
    })
}

/// What path patching measures the senders' effect through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receiver {
    /// The final residual stream (the direct path to the logits, plus MLPs unless frozen).
    Logits,
    /// One head's queries, keys or values (`Q`, `K` or `V`). Keys and values of a grouped-query
    /// model belong to a key/value head; receiving at them receives for its whole group.
    Head {
        layer: usize,
        head: usize,
        input: BlockHook,
    },
}

impl Receiver {
    /// Parses `logits` or `L9H6.q` / `9.6.k` / `L9H6v`.
    pub fn parse(s: &str) -> Result<Receiver> {
        let t = s.trim();
        if t == "logits" || t == "resid_final" {
            return Ok(Receiver::Logits);
        }
        let bad = || {
            CircuitError::Input(format!(
                "receiver {s:?}: expected `logits` or a head input like `L9H6.q`, `L9H6.k`, `L9H6.v`"
            ))
        };
        let lower = t.to_ascii_lowercase();
        let (head_part, input) = match lower.rsplit_once('.') {
            Some((h, i)) if matches!(i, "q" | "k" | "v") => (h.to_string(), i.to_string()),
            _ => match lower.chars().last() {
                Some(c @ ('q' | 'k' | 'v')) => {
                    (lower[..lower.len() - 1].to_string(), c.to_string())
                }
                _ => return Err(bad()),
            },
        };
        let (layer, head) = crate::patching::parse_head(&head_part).ok_or_else(bad)?;
        let input = match input.as_str() {
            "q" => BlockHook::Q,
            "k" => BlockHook::K,
            _ => BlockHook::V,
        };
        Ok(Receiver::Head { layer, head, input })
    }

    fn point(&self) -> Option<HookPoint> {
        match self {
            Receiver::Logits => None,
            Receiver::Head { layer, input, .. } => Some(HookPoint::Block(*layer, *input)),
        }
    }

    fn check(&self, model: &Model) -> Result<()> {
        let c = model.config();
        if let Receiver::Head { layer, head, .. } = self {
            if *layer >= c.n_layers || *head >= c.n_heads {
                return Err(CircuitError::Input(format!(
                    "receiver {self}: the model has layers 0..{} and heads 0..{}",
                    c.n_layers, c.n_heads
                )));
            }
            if *layer == 0 {
                return Err(CircuitError::Input(format!(
                    "receiver {self}: no head sits below layer 0 to send to it"
                )));
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Receiver::Logits => write!(f, "logits"),
            Receiver::Head { layer, head, input } => {
                let i = match input {
                    BlockHook::Q => "q",
                    BlockHook::K => "k",
                    _ => "v",
                };
                write!(f, "L{layer}H{head}.{i}")
            }
        }
    }
}

/// Parses a head written `L9H6`, `9.6` or `9:6` into (layer, head).
pub fn parse_head(s: &str) -> Option<(usize, usize)> {
    let t = s.trim().to_ascii_lowercase();
    if let Some(rest) = t.strip_prefix('l') {
        let (l, h) = rest.split_once('h')?;
        return Some((l.parse().ok()?, h.parse().ok()?));
    }
    let (l, h) = t.split_once(['.', ':'])?;
    Some((l.parse().ok()?, h.parse().ok()?))
}

/// One slice of one activation to patch (see [`Patcher::patched_metric`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Patch {
    pub point: HookPoint,
    /// Positions patched (query positions for patterns); all when `None`.
    pub positions: Option<Vec<usize>>,
    /// The head patched, for per-head activations (`hook_z`, `hook_q`, `hook_k`, `hook_v`,
    /// `hook_pattern`, `hook_result`); the whole activation when `None`.
    pub head: Option<usize>,
}

impl Patch {
    /// The whole activation at `point`.
    pub fn all(point: HookPoint) -> Patch {
        Patch {
            point,
            positions: None,
            head: None,
        }
    }

    /// A 0/1 mask of the activation's shape.
    fn mask(&self, dims: &[usize], dev: &Device) -> candle_core::Result<Tensor> {
        let pattern = matches!(
            self.point,
            HookPoint::Block(_, BlockHook::Pattern | BlockHook::AttnScores)
        );
        let (pos_axis, head_axis) = if pattern { (2, 1) } else { (1, 2) };
        let n: usize = dims.iter().product();
        let mut m = vec![0f32; n];
        let strides: Vec<usize> = (0..dims.len())
            .map(|i| dims[i + 1..].iter().product())
            .collect();
        for (flat, v) in m.iter_mut().enumerate() {
            let at = |axis: usize| (flat / strides[axis]) % dims[axis];
            let pos_ok = self
                .positions
                .as_ref()
                .is_none_or(|ps| dims.len() > pos_axis && ps.contains(&at(pos_axis)));
            let head_ok = self
                .head
                .is_none_or(|h| dims.len() > head_axis + 1 && at(head_axis) == h);
            if pos_ok && head_ok {
                *v = 1.0;
            }
        }
        Tensor::from_vec(m, dims, dev)
    }
}

/// A cached activation of a run.
fn cached(r: &Run, p: HookPoint) -> Result<&Tensor> {
    r.cache
        .get(p)
        .ok_or_else(|| CircuitError::Input(format!("internal: {p} was not cached for patching")))
}

/// The product `(source − base) · grad` of one block, summed down to the sweep's cells of that
/// layer, as f64 in row-major order.
fn reduce(sweep: Sweep, prod: &Tensor) -> Result<Vec<f64>> {
    let t = match sweep {
        // [b, p, d] → [p]
        Sweep::ResidPre | Sweep::AttnOut | Sweep::MlpOut => prod.sum(2)?.sum(0)?,
        // [b, p, h, dh] → [h]
        Sweep::ZHead | Sweep::QHead | Sweep::KHead | Sweep::VHead => prod.sum(3)?.sum(1)?.sum(0)?,
        // [b, p, h, dh] → [h, p]
        Sweep::ZHeadPos => prod.sum(3)?.sum(0)?.t()?,
        // [b, h, q, k] → [h]
        Sweep::PatternHead => prod.sum(3)?.sum(2)?.sum(0)?,
    };
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// The clean or corrupt run of a group: logits and metric, every block's activations at the
/// hooks patching reads, and the keys and values.
fn run(
    model: &Model,
    tokens: Tensor,
    metric: &Metric,
    answer: &[u32],
    wrong: &[u32],
) -> Result<Run> {
    let n_layers = model.config().n_layers;
    let valid = model.hook_points();
    let points: Vec<HookPoint> = (0..n_layers)
        .flat_map(|l| CACHED.iter().map(move |&h| HookPoint::Block(l, h)))
        .filter(|p| valid.contains(p))
        .collect();
    let mut hooks = Hooks::new().with_cache_points(points);
    let mut kv = KvCache::default();
    let logits = model.forward_cached(&tokens, None, &mut hooks, &mut kv)?;
    let seq = tokens.dim(1)?;
    let last = logits.narrow(1, seq - 1, 1)?.squeeze(1)?;
    let m = metric
        .eval(&last, answer, wrong)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    if let Some(i) = m.iter().position(|x| !x.is_finite()) {
        return Err(CircuitError::Input(format!(
            "the metric is not finite ({}) on a prompt of this set (answer id {})",
            m[i], answer[i]
        )));
    }
    Ok(Run {
        tokens,
        cache: hooks.take_cache(),
        kv,
        metric: m,
    })
}

/// The metric of each row of a final residual `[n, d]` (before the final norm). Metrics over
/// logits alone read only the unembedding rows of the tokens they name.
fn last_metric(
    model: &Model,
    metric: &Metric,
    last: &Tensor,
    answer: &[u32],
    wrong: &[u32],
) -> Result<Vec<f64>> {
    let m = last_metric_tensor(model, metric, last, answer, wrong)?;
    Ok(m.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// [`last_metric`] as a tensor `[n]`, differentiable with respect to `last`.
fn last_metric_tensor(
    model: &Model,
    metric: &Metric,
    last: &Tensor,
    answer: &[u32],
    wrong: &[u32],
) -> Result<Tensor> {
    let normed = model.final_norm(last)?;
    let m = if metric.needs_softmax() {
        let logits = normed.matmul(&model.w_u_rows().t()?)?;
        metric.eval(&logits, answer, wrong)?
    } else {
        // A small vocabulary of the tokens read, and the metric re-indexed into it.
        let mut vocab: Vec<u32> = answer
            .iter()
            .chain(wrong)
            .copied()
            .chain(metric.fixed_tokens())
            .collect();
        vocab.sort_unstable();
        vocab.dedup();
        let index: HashMap<u32, u32> = vocab
            .iter()
            .enumerate()
            .map(|(i, &t)| (t, i as u32))
            .collect();
        let ids = Tensor::new(vocab.as_slice(), model.device())?;
        let w = model.w_u_rows().index_select(&ids, 0)?;
        let logits = normed.matmul(&w.t()?)?;
        let remap = |v: &[u32]| v.iter().map(|t| index[t]).collect::<Vec<u32>>();
        metric
            .remapped(&index)
            .eval(&logits, &remap(answer), &remap(wrong))?
    };
    Ok(m)
}

/// One batched patched run: a start (block, position) and the variants run from it.
#[derive(Debug)]
struct Job {
    layer: usize,
    start: usize,
    /// Per variant: the head patched (0 for sweeps without heads).
    variants: Vec<usize>,
    /// Per variant: the grid cell it fills (flat index).
    cells: Vec<usize>,
}

/// The runs a sweep needs for a group: positions before the first difference are skipped.
fn jobs(model: &Model, sweep: Sweep, g: &Group) -> Vec<Job> {
    let n_layers = model.config().n_layers;
    let seq = g.seq;
    let nh = sweep.n_heads(model);
    let mut out = Vec::new();
    for l in 0..n_layers {
        match sweep {
            Sweep::ResidPre | Sweep::AttnOut | Sweep::MlpOut => {
                for p in g.first_diff..seq {
                    out.push(Job {
                        layer: l,
                        start: p,
                        variants: vec![0],
                        cells: vec![l * seq + p],
                    });
                }
            }
            Sweep::ZHeadPos => {
                for p in g.first_diff..seq {
                    out.push(Job {
                        layer: l,
                        start: p,
                        variants: (0..nh).collect(),
                        cells: (0..nh).map(|h| (l * nh + h) * seq + p).collect(),
                    });
                }
            }
            _ => {
                if g.first_diff < seq {
                    out.push(Job {
                        layer: l,
                        start: g.first_diff,
                        variants: (0..nh).collect(),
                        cells: (0..nh).map(|h| l * nh + h).collect(),
                    });
                }
            }
        }
    }
    out
}

/// A 0/1 mask broadcastable to the patched activation `dims` (batch = variants × pairs):
/// variant `v` patches head `variants[v]` (and, for position sweeps, only the first row).
fn patch_mask(
    sweep: Sweep,
    variants: &[usize],
    n: usize,
    rows: usize,
    dims: &[usize],
    dev: &Device,
) -> Result<Tensor> {
    let b = variants.len() * n;
    Ok(match sweep {
        Sweep::AttnOut | Sweep::MlpOut => {
            // [b, rows, 1]: the first row only.
            let mut m = vec![0f32; b * rows];
            for r in 0..b {
                m[r * rows] = 1.0;
            }
            Tensor::from_vec(m, (b, rows, 1), dev)?
        }
        Sweep::ZHeadPos => {
            let h = dims[2];
            let mut m = vec![0f32; b * rows * h];
            for (v, &head) in variants.iter().enumerate() {
                for i in 0..n {
                    m[((v * n + i) * rows) * h + head] = 1.0;
                }
            }
            Tensor::from_vec(m, (b, rows, h, 1), dev)?
        }
        Sweep::ZHead | Sweep::QHead | Sweep::KHead | Sweep::VHead => {
            let h = dims[2];
            let mut m = vec![0f32; b * h];
            for (v, &head) in variants.iter().enumerate() {
                for i in 0..n {
                    m[(v * n + i) * h + head] = 1.0;
                }
            }
            Tensor::from_vec(m, (b, 1, h, 1), dev)?
        }
        Sweep::PatternHead => {
            let h = dims[1];
            let mut m = vec![0f32; b * h];
            for (v, &head) in variants.iter().enumerate() {
                for i in 0..n {
                    m[(v * n + i) * h + head] = 1.0;
                }
            }
            Tensor::from_vec(m, (b, h, 1, 1), dev)?
        }
        Sweep::ResidPre => unreachable!("resid_pre patches the input, not a hook"),
    })
}
