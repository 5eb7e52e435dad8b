//! `scalpel toy`: grow a toy model from scratch and write a report folder (metrics as JSON and
//! CSV, plots as SVG, checkpoints). `superposition`, `induction` and `grokking` each finish in
//! minutes on 2 cores by default; `--paper` selects the published scale. `--bench N` times N
//! training steps instead (see `scripts/toy_bench.sh` for the side-by-side with PyTorch).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use scalpel_toys::grokking::{self, GrokConfig};
use scalpel_toys::induction::{self, InductionConfig};
use scalpel_toys::report::Report;
use scalpel_toys::superposition::{self as sp, SuperpositionConfig};

use crate::output::print_json;
use crate::progress::CountBar;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub toy: Toy,
}

#[derive(clap::Subcommand, Debug)]
pub enum Toy {
    /// Toy models of superposition (Elhage et al. 2022): importance × sparsity sweep, the
    /// dimensionality sweep, the pentagon and the two-feature phase diagram.
    Superposition(SuperpositionArgs),
    /// Induction heads (Olsson et al. 2022) in a 2-layer attention-only transformer trained on
    /// repeated random sequences: the phase change, head scores, ablation, K-composition.
    Induction(InductionArgs),
    /// Grokking of modular addition (Nanda et al. 2023): memorisation, then generalisation;
    /// Fourier mechanism and progress measures across checkpoints.
    Grokking(GrokArgs),
}

pub fn run(args: Args, json: bool) -> Result<()> {
    match args.toy {
        Toy::Superposition(a) => superposition(a, json),
        Toy::Induction(a) => induction_cmd(a, json),
        Toy::Grokking(a) => grokking_cmd(a, json),
    }
}

/// Steps per second of a training loop, for `--bench`.
#[derive(Debug, Serialize)]
struct Bench {
    toy: &'static str,
    steps: usize,
    seconds: f64,
    steps_per_s: f64,
    first_loss: f64,
    last_loss: f64,
    threads: usize,
    settings: serde_json::Value,
}

fn print_bench(b: &Bench, json: bool) -> Result<()> {
    if json {
        return print_json(b);
    }
    println!(
        "{}: {} steps in {:.2} s = {:.1} steps/s on {} threads (loss {:.4} → {:.4})",
        b.toy, b.steps, b.seconds, b.steps_per_s, b.threads, b.first_loss, b.last_loss
    );
    Ok(())
}

fn report_dir(out: &Option<PathBuf>, toy: &str) -> Result<Report> {
    let dir = out
        .clone()
        .unwrap_or_else(|| PathBuf::from("toys").join(toy));
    Report::create(&dir)
        .with_context(|| format!("cannot create the report folder {}", dir.display()))
}

// ---------------------------------------------------------------------------------------------
// grokking

#[derive(clap::Args, Debug)]
pub struct GrokArgs {
    /// Report folder (default toys/grokking); checkpoints go to its checkpoints/ and an
    /// interrupted run there resumes.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// The paper's setting: p = 113, 30% of pairs, d_model 128, d_mlp 512, lr 1e-3, 20,000
    /// epochs (15-30 minutes on 2 cores). Other flags still override.
    #[arg(long)]
    pub paper: bool,
    /// The modulus p.
    #[arg(long)]
    pub p: Option<usize>,
    /// Fraction of the p² pairs used for training.
    #[arg(long)]
    pub frac_train: Option<f64>,
    #[arg(long)]
    pub d_model: Option<usize>,
    #[arg(long)]
    pub n_heads: Option<usize>,
    #[arg(long)]
    pub d_mlp: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Full-batch training steps.
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Evaluate every this many epochs.
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Checkpoint every this many epochs (a multiple of --eval-every).
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Train on permuted labels (a model that can only memorise; the control for `diagnose`).
    #[arg(long)]
    pub shuffle_labels: bool,
    /// Time this many training steps and print steps/s instead of running the experiment.
    #[arg(long, value_name = "STEPS")]
    pub bench: Option<usize>,
    /// Train through candle's autograd instead of the fused pass (slower; for comparison).
    #[arg(long)]
    pub autograd: bool,
}

fn grok_config(a: &GrokArgs) -> GrokConfig {
    let mut c = if a.paper {
        GrokConfig::default()
    } else {
        GrokConfig::quick()
    };
    macro_rules! set {
        ($($f:ident),*) => { $(if let Some(v) = a.$f { c.$f = v; })* };
    }
    set!(
        p,
        frac_train,
        d_model,
        n_heads,
        d_mlp,
        lr,
        weight_decay,
        epochs,
        seed,
        eval_every,
        checkpoint_every
    );
    c.shuffle_labels = a.shuffle_labels;
    c
}

fn grokking_cmd(a: GrokArgs, json: bool) -> Result<()> {
    let cfg = grok_config(&a);
    cfg.validate()?;
    if let Some(steps) = a.bench {
        let data = grokking::Dataset::new(&cfg)?;
        let mut model = cfg.build()?;
        if a.autograd {
            model.use_autograd();
        }
        let tokens = data.train_tokens.flatten_all()?.to_vec1::<u32>()?;
        let n = data.train_labels.len();
        let targets: Vec<Option<u32>> = data
            .train_labels
            .iter()
            .flat_map(|&t| [None, None, Some(t)])
            .collect();
        let mut step = |_| Ok(model.train_step(&tokens, n, &targets, cfg.lr)?);
        let b = time_steps("grokking", steps, &mut step, serde_json::to_value(&cfg)?)?;
        return print_bench(&b, json);
    }
    let report = report_dir(&a.out, "grokking")?;
    let ck_dir = report.path("checkpoints");
    let done = grokking::list_checkpoints(&ck_dir)?
        .last()
        .map_or(0, |c| c.0);
    if done > 0 {
        tracing::info!("resuming from epoch {done} in {}", ck_dir.display());
    }
    let bar = CountBar::start(cfg.epochs as u64, done as u64, "grokking".into(), "epochs");
    let mut on_step = |epoch: usize, loss: f64| {
        bar.inc(1);
        if epoch.is_multiple_of(25) {
            bar.set_message(format!("grokking (train loss {loss:.2e})"));
        }
    };
    let run = grokking::train(&cfg, Some(&ck_dir), &mut on_step)?;
    drop(bar);
    let summary = grokking::report::write(&cfg, &run, &report)?;
    if json {
        return print_json(&summary);
    }
    let opt = |x: Option<usize>| x.map_or("not reached".into(), |e| format!("epoch {e}"));
    if let Some(fp) = &summary.final_point {
        println!(
            "a + b mod {}: train acc {:.3}, test acc {:.3} after {} epochs",
            cfg.p, fp.train_acc, fp.test_acc, fp.epoch
        );
    }
    println!(
        "memorised (train acc ≥ 0.99): {}",
        opt(summary.memorised_at)
    );
    println!(
        "generalised (test acc ≥ 0.99): {}",
        opt(summary.generalised_at)
    );
    println!(
        "key frequencies of the embedding: {:?}",
        summary.key_frequencies
    );
    println!(
        "inside view: {} (restricted loss {:.2e}, excluded loss {:.2e})",
        summary.diagnosis.verdict,
        summary.diagnosis.restricted_loss,
        summary.diagnosis.excluded_loss
    );
    println!("report: {}", report.dir().display());
    Ok(())
}

/// Runs `steps` training steps after 3 untimed ones.
fn time_steps(
    toy: &'static str,
    steps: usize,
    step: &mut dyn FnMut(usize) -> Result<f64>,
    settings: serde_json::Value,
) -> Result<Bench> {
    anyhow::ensure!(steps > 0, "--bench needs at least one step");
    for i in 0..3 {
        step(i)?;
    }
    let t = Instant::now();
    let mut first = f64::NAN;
    let mut last = f64::NAN;
    for i in 0..steps {
        last = step(i + 3)?;
        if i == 0 {
            first = last;
        }
    }
    let seconds = t.elapsed().as_secs_f64();
    Ok(Bench {
        toy,
        steps,
        seconds,
        steps_per_s: steps as f64 / seconds,
        first_loss: first,
        last_loss: last,
        threads: rayon_threads(),
        settings,
    })
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

// ---------------------------------------------------------------------------------------------
// superposition

#[derive(clap::Args, Debug)]
pub struct SuperpositionArgs {
    /// Report folder (default toys/superposition).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Which experiments: all, importance, sweep, pentagon, phase (comma-separated).
    #[arg(long, default_value = "all")]
    pub parts: String,
    /// The paper's scale: the dimensionality sweep with n = 400 features in m = 20 dimensions,
    /// 20 sparsities, and 10,000 steps everywhere.
    #[arg(long)]
    pub paper: bool,
    /// Training steps per experiment (default 10,000 for the importance sweep and pentagon,
    /// 5,000 for the dimensionality sweep, 3,000 for the phase diagram).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Features in the importance sweep (importance 0.9^i).
    #[arg(long, default_value_t = 20)]
    pub n_features: usize,
    /// Hidden dimensions in the importance sweep.
    #[arg(long, default_value_t = 5)]
    pub d_hidden: usize,
    /// Features and dimensions of the dimensionality sweep (default 100 and 10; 400 and 20
    /// with --paper).
    #[arg(long)]
    pub sweep_n: Option<usize>,
    #[arg(long)]
    pub sweep_m: Option<usize>,
    /// Sparsity points of the dimensionality sweep (default 10; 20 with --paper).
    #[arg(long)]
    pub sweep_points: Option<usize>,
    /// Cells per axis of the phase diagram.
    #[arg(long, default_value_t = 7)]
    pub phase_grid: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Time this many training steps of the default importance sweep and print steps/s.
    #[arg(long, value_name = "STEPS")]
    pub bench: Option<usize>,
}

#[derive(Debug, Default, Serialize)]
struct SuperpositionSummary {
    /// Per instance of the importance sweep: (1 − S, D*, represented features).
    importance_sweep: Vec<(f64, f64, usize)>,
    /// Per point of the dimensionality sweep: (1/(1 − S), D*).
    dimensionality_sweep: Vec<(f64, f64)>,
    /// Per pentagon instance: the mean feature dimensionality and the structures found.
    pentagon: Vec<(f64, Vec<String>)>,
    /// Phase diagram rows (importance of feature 2, bottom to top) of category names.
    phase_diagram: Vec<Vec<String>>,
}

fn train_sp(name: &str, cfg: &SuperpositionConfig) -> Result<sp::Trained> {
    let bar = CountBar::start(
        cfg.steps as u64,
        0,
        format!("superposition: {name}"),
        "steps",
    );
    let mut last = 0;
    let mut on = |step: usize, loss: f64| {
        bar.inc((step - last) as u64);
        last = step;
        bar.set_message(format!("superposition: {name} (loss {loss:.4})"));
    };
    let run = sp::train(cfg, &mut on)?;
    Ok(run)
}

fn superposition(a: SuperpositionArgs, json: bool) -> Result<()> {
    let base = SuperpositionConfig {
        n_features: a.n_features,
        d_hidden: a.d_hidden,
        seed: a.seed,
        ..Default::default()
    };
    if let Some(steps) = a.bench {
        let cfg = SuperpositionConfig { steps, ..base };
        let t = Instant::now();
        let run = sp::train(&cfg, &mut |_, _| {})?;
        let seconds = t.elapsed().as_secs_f64();
        let b = Bench {
            toy: "superposition",
            steps,
            seconds,
            steps_per_s: steps as f64 / seconds,
            first_loss: run.losses.first().map_or(f64::NAN, |x| x.1),
            last_loss: run.losses.last().map_or(f64::NAN, |x| x.1),
            threads: rayon_threads(),
            settings: serde_json::to_value(&cfg)?,
        };
        return print_bench(&b, json);
    }
    let parts: Vec<&str> = a.parts.split(',').map(str::trim).collect();
    for p in &parts {
        anyhow::ensure!(
            ["all", "importance", "sweep", "pentagon", "phase"].contains(p),
            "unknown part `{p}`: expected all, importance, sweep, pentagon or phase"
        );
    }
    let want = |p: &str| parts.contains(&"all") || parts.contains(&p);
    let report = report_dir(&a.out, "superposition")?;
    let default_steps = if a.paper { 10_000 } else { 5_000 };
    let mut summary = SuperpositionSummary::default();

    if want("importance") {
        let cfg = SuperpositionConfig {
            steps: a.steps.unwrap_or(10_000),
            ..base.clone()
        };
        let run = train_sp("importance × sparsity", &cfg)?;
        let an = sp::analyse(&run.model, &cfg.feature_probs)?;
        sp::report::losses(&report, "importance_sweep", &run)?;
        sp::report::importance_sweep(&report, &an)?;
        run.save(&report.path("importance_sweep.safetensors"))?;
        summary.importance_sweep = an
            .iter()
            .map(|x| (x.feature_prob, x.dims_per_feature, x.n_represented))
            .collect();
    }
    if want("sweep") {
        let (n, m, pts) = if a.paper {
            (400, 20, 20)
        } else {
            (100, 10, 10)
        };
        let mut cfg = SuperpositionConfig::dimensionality_sweep(
            a.sweep_n.unwrap_or(n),
            a.sweep_m.unwrap_or(m),
            a.sweep_points.unwrap_or(pts),
            a.steps.unwrap_or(default_steps),
        );
        cfg.seed = a.seed;
        let run = train_sp("dimensionality sweep", &cfg)?;
        let an = sp::analyse(&run.model, &cfg.feature_probs)?;
        sp::report::losses(&report, "dimensionality_sweep", &run)?;
        sp::report::dimensionality_sweep(&report, &an)?;
        run.save(&report.path("dimensionality_sweep.safetensors"))?;
        summary.dimensionality_sweep = an
            .iter()
            .map(|x| (1.0 / x.feature_prob, x.dims_per_feature))
            .collect();
    }
    if want("pentagon") {
        let mut cfg = SuperpositionConfig::pentagon(2);
        cfg.steps = a.steps.unwrap_or(10_000);
        cfg.seed = a.seed;
        let run = train_sp("pentagon", &cfg)?;
        let an = sp::analyse(&run.model, &cfg.feature_probs)?;
        sp::report::losses(&report, "pentagon", &run)?;
        sp::report::pentagon(&report, &an)?;
        summary.pentagon = an
            .iter()
            .map(|x| {
                let mean =
                    x.dimensionality.iter().sum::<f64>() / x.dimensionality.len().max(1) as f64;
                let groups = x
                    .geometry
                    .iter()
                    .map(|g| format!("{:?} {:?}", g.structure, g.features))
                    .collect();
                (mean, groups)
            })
            .collect();
    }
    if want("phase") {
        let k = a.phase_grid.max(2);
        let importances = sp::geomspace(0.1, 10.0, k);
        let densities = sp::geomspace(1.0, 0.01, k);
        let replicas = 4;
        let mut cfg = SuperpositionConfig::phase_diagram(
            &importances,
            &densities,
            replicas,
            a.steps.unwrap_or(3_000),
        );
        cfg.seed = a.seed;
        cfg.lr = 1e-2;
        let run = train_sp("phase diagram", &cfg)?;
        let pd = sp::phase_diagram(&importances, &densities, replicas, &run.model)?;
        sp::report::phase_diagram(&report, &pd)?;
        summary.phase_diagram = pd
            .grid
            .iter()
            .map(|row| row.iter().map(|&c| pd.categories[c].clone()).collect())
            .collect();
    }
    report.write_json("summary.json", &summary)?;
    if json {
        return print_json(&summary);
    }
    for (p, d, n) in &summary.importance_sweep {
        println!("importance sweep 1−S = {p:.3}: {n} features represented, D* = {d:.3}");
    }
    for (x, d) in &summary.dimensionality_sweep {
        println!("dimensionality sweep 1/(1−S) = {x:.2}: D* = {d:.3}");
    }
    for (mean, groups) in &summary.pentagon {
        println!("pentagon: mean D = {mean:.3}; {}", groups.join(", "));
    }
    if !summary.phase_diagram.is_empty() {
        println!("phase diagram (rows: importance of feature 2 from 10 down to 0.1; columns: denser → sparser):");
        for row in summary.phase_diagram.iter().rev() {
            let cells: Vec<&str> = row
                .iter()
                .map(|c| match c.as_str() {
                    "superposition" => "S",
                    "dedicated dimension" => "D",
                    _ => ".",
                })
                .collect();
            println!("  {}", cells.join(" "));
        }
    }
    println!("report: {}", report.dir().display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// induction

#[derive(clap::Args, Debug)]
pub struct InductionArgs {
    /// Report folder (default toys/induction); an interrupted run there resumes.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Layers (1 gives the control: no induction head can form).
    #[arg(long)]
    pub n_layers: Option<usize>,
    #[arg(long)]
    pub n_heads: Option<usize>,
    #[arg(long)]
    pub d_model: Option<usize>,
    /// Vocabulary size.
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Length of the random half that is repeated.
    #[arg(long)]
    pub half: Option<usize>,
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Time this many training steps and print steps/s instead of running the experiment.
    #[arg(long, value_name = "STEPS")]
    pub bench: Option<usize>,
    /// Train through candle's autograd instead of the fused pass (slower; for comparison).
    #[arg(long)]
    pub autograd: bool,
}

fn induction_config(a: &InductionArgs) -> InductionConfig {
    let mut c = InductionConfig::default();
    macro_rules! set {
        ($($f:ident),*) => { $(if let Some(v) = a.$f { c.$f = v; })* };
    }
    set!(n_layers, n_heads, d_model, vocab, half, batch, lr, steps, seed);
    c
}

fn induction_cmd(a: InductionArgs, json: bool) -> Result<()> {
    let cfg = induction_config(&a);
    cfg.validate()?;
    if let Some(steps) = a.bench {
        let mut model = cfg.build()?;
        if a.autograd {
            model.use_autograd();
        }
        let mut step = |i: usize| {
            let tokens = cfg.train_batch(i);
            let targets = induction::next_token_targets(&tokens, cfg.seq_len());
            Ok(model.train_step(&tokens, cfg.batch, &targets, cfg.lr)?)
        };
        let b = time_steps("induction", steps, &mut step, serde_json::to_value(&cfg)?)?;
        return print_bench(&b, json);
    }
    let report = report_dir(&a.out, "induction")?;
    induction_experiment(&cfg, &report, json)
}

fn induction_experiment(cfg: &InductionConfig, report: &Report, json: bool) -> Result<()> {
    let ck_dir = report.path("checkpoints");
    let bar = CountBar::start(cfg.steps as u64, 0, "induction".into(), "steps");
    let mut on_step = |_step: usize, loss: f64| {
        bar.inc(1);
        bar.set_message(format!("induction (loss {loss:.3})"));
    };
    let run = induction::train(cfg, Some(Path::new(&ck_dir)), &mut on_step)?;
    drop(bar);
    let summary = induction::report::write(cfg, &run, report)?;
    if json {
        return print_json(&summary);
    }
    println!("{}", induction::report::text(&summary));
    println!("report: {}", report.dir().display());
    Ok(())
}
