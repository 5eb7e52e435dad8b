//! `scalpel steer`: generation with a steering vector added to the residual stream (ActAdd, a
//! mean difference over contrastive pairs, or a sparse-autoencoder latent), the unsteered and the
//! steered text side by side, and a coefficient sweep of the target effect beside the side
//! effects on unrelated text.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use scalpel_circuits::steer::{
    actadd, max_activation, mean_difference, read_contrast_pairs, sae_clamp, sae_decoder_row,
    sweep, windows, Direction, Positions, SteeringVector, Sweep, SweepInput, SweepPoint,
    HELD_OUT_TEXT,
};
use scalpel_core::{BlockHook, HookPoint};
use scalpel_models::generation::GenerateOptions;
use scalpel_models::tokenizer::Tokenizer;
use scalpel_models::transformer::Model;
use scalpel_toys::plot::{line_grid, LinePlot, Series};
use serde::Serialize;

use crate::model::ModelArgs;
use crate::output::print_json;
use crate::progress::CountBar;
use crate::prompt;

/// Options of `scalpel steer`.
#[derive(clap::Args, Debug)]
#[command(group(
    clap::ArgGroup::new("source").required(true).args(["actadd", "mean_diff", "sae"])
))]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as one user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// ActAdd (Turner et al. 2023): the residual of POSITIVE minus that of NEGATIVE, position by
    /// position, added to the first positions of the prompt. E.g. `--actadd Love Hate`.
    #[arg(long, num_args = 2, value_names = ["POSITIVE", "NEGATIVE"])]
    pub actadd: Option<Vec<String>>,
    /// The token appended to the shorter ActAdd prompt until both are as long (one token).
    #[arg(long, default_value = " ", requires = "actadd")]
    pub pad: String,
    /// Mean difference: a JSONL file of `{"positive": "...", "negative": "..."}` pairs; the mean
    /// residual difference at their last tokens is added at every position.
    #[arg(long, value_name = "FILE")]
    pub mean_diff: Option<PathBuf>,
    /// A SAELens dictionary directory (cfg.json + sae_weights.safetensors): steer with one latent
    /// (`--feature`), at the hook it reads.
    #[arg(long, value_name = "DIR", requires = "feature")]
    pub sae: Option<PathBuf>,
    /// The dictionary latent to steer with.
    #[arg(long, requires = "sae")]
    pub feature: Option<usize>,
    /// Hold the latent at C × its maximum activation at every steered position, instead of
    /// adding C × max activation × its decoder row. C, if given here, is the coefficient.
    #[arg(long, value_name = "C", num_args = 0..=1, allow_negative_numbers = true, requires = "sae")]
    pub clamp: Option<Option<f64>>,
    /// The latent's maximum activation; default: its maximum over the held-out text.
    #[arg(long, requires = "sae")]
    pub max_act: Option<f64>,
    /// The layer to steer at (for a dictionary: taken from its `hook_name` when it has one).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Which residual hook of the layer.
    #[arg(long, value_enum, default_value_t = Site::Pre)]
    pub site: Site,
    /// The coefficient the vector is multiplied by.
    #[arg(long, allow_negative_numbers = true)]
    pub coef: Option<f64>,
    /// Steered positions: `all`, `generated` (new tokens only), `first:K`, or prompt positions
    /// `0,3,4`. Default: the first K for ActAdd (K = the contrast prompts' length), all otherwise.
    #[arg(long)]
    pub positions: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 30)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Seed of the sampler (the same for unsteered and steered text).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sweep these coefficients (comma-separated, e.g. `-10,-5,0,5,10`) instead of one `--coef`.
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        value_name = "C,C,.."
    )]
    pub sweep: Option<Vec<f64>>,
    /// A continuation of the prompt whose mean log-probability is the target effect (e.g.
    /// " love").
    #[arg(long)]
    pub target: Option<String>,
    /// Unrelated text for the side effects (KL and loss); default: a few built-in neutral
    /// paragraphs.
    #[arg(long, value_name = "FILE")]
    pub text: Option<PathBuf>,
    /// Tokens per window of the held-out text.
    #[arg(long, default_value_t = 128)]
    pub context: usize,
    /// Folder for `steer.json` and, with --sweep, `steer.svg` (target effect, KL and loss
    /// against the coefficient).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// A residual hook of a layer.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Site {
    /// `blocks.L.hook_resid_pre`: entering block L.
    #[value(name = "resid_pre")]
    Pre,
    /// `blocks.L.hook_resid_mid`: between attention and MLP.
    #[value(name = "resid_mid")]
    Mid,
    /// `blocks.L.hook_resid_post`: leaving block L.
    #[value(name = "resid_post")]
    Post,
}

impl Site {
    fn at(self, layer: usize) -> HookPoint {
        let h = match self {
            Site::Pre => BlockHook::ResidPre,
            Site::Mid => BlockHook::ResidMid,
            Site::Post => BlockHook::ResidPost,
        };
        HookPoint::block(layer, h)
    }
}

/// One coefficient with its generated text.
#[derive(Serialize)]
struct Row {
    #[serde(flatten)]
    point: SweepPoint,
    text: Option<String>,
}

#[derive(Serialize)]
struct Report {
    model: String,
    prompt: String,
    /// What the vector is, in words.
    source: String,
    /// Largest L2 norm of the vector's rows (added vectors only).
    vector_norm: Option<f64>,
    max_act: Option<f64>,
    target: Option<String>,
    hook: HookPoint,
    positions: Positions,
    heldout_tokens: usize,
    unsteered: Row,
    points: Vec<Row>,
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let (coefs, clamp) = coefficients(&args)?;
    let loaded = args.model.load()?;
    let model = &loaded.model;
    let tok = loaded.tokenizer()?;
    crate::model::check_context_size(model, args.context)?;
    let ids = prompt::encode(tok, &args.prompt, args.chat, None)?;

    let text = match &args.text {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading the held-out text {}", p.display()))?,
        None => HELD_OUT_TEXT.to_string(),
    };
    let bos = tok.bos_id().filter(|_| tok.add_bos());
    let heldout = windows(&tok.encode(&text, false)?, args.context, bos)?;

    let (vector, source, max_act) = build_vector(&args, model, tok, clamp, &heldout)?;
    let positions = match &args.positions {
        Some(s) => parse_positions(s)?,
        None if args.actadd.is_some() => Positions::First(vector.rows()),
        None => Positions::All,
    };
    let target = match &args.target {
        Some(t) => {
            let t = tok.encode(t, false)?;
            if t.is_empty() {
                bail!("--target {:?} encodes to no tokens", args.target);
            }
            Some(t)
        }
        None => None,
    };
    let input = SweepInput {
        prompt: &ids,
        target: target.as_deref(),
        generate: Some(GenerateOptions {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            seed: args.seed,
            stop_tokens: tok.eos_ids().to_vec(),
            ..Default::default()
        }),
        heldout: &heldout,
    };
    let bar = CountBar::start(
        input.steps(coefs.len()) as u64,
        0,
        "steering".into(),
        "runs",
    );
    let result = sweep(model, &vector, &positions, &coefs, &input, || bar.inc(1))?;
    drop(bar);

    let report = report(&args, tok, &ids, source, &vector, max_act, result);
    if let Some(dir) = &args.out {
        write_outputs(dir, &report, args.sweep.is_some())?;
    }
    if json {
        return print_json(&report);
    }
    print_human(&report, args.sweep.is_some())?;
    if let Some(dir) = &args.out {
        println!("\nresults in {}", dir.display());
    }
    Ok(())
}

/// The coefficients to run, and whether an SAE latent is clamped.
fn coefficients(args: &Args) -> Result<(Vec<f64>, bool)> {
    let clamp_coef = args.clamp.flatten();
    if let (Some(a), Some(b)) = (clamp_coef, args.coef) {
        bail!("--clamp {a} and --coef {b} both give the coefficient; give one");
    }
    let single = clamp_coef.or(args.coef);
    let coefs = match (&args.sweep, single) {
        (Some(_), Some(c)) => {
            bail!("--sweep gives the coefficients; drop the single coefficient {c}")
        }
        (Some(list), None) => list.clone(),
        (None, Some(c)) => vec![c],
        (None, None) => bail!("give a coefficient: --coef C (or --clamp C, or --sweep C,C,..)"),
    };
    if let Some(c) = coefs.iter().find(|c| !c.is_finite()) {
        bail!("the coefficient must be a finite number, got {c}");
    }
    if coefs.is_empty() {
        bail!("--sweep needs at least one coefficient");
    }
    Ok((coefs, args.clamp.is_some()))
}

/// The steering vector from whichever source was given, a description, and the SAE latent's
/// maximum activation.
fn build_vector(
    args: &Args,
    model: &Model,
    tok: &Tokenizer,
    clamp: bool,
    heldout: &[Vec<u32>],
) -> Result<(SteeringVector, String, Option<f64>)> {
    let layer_hook = || -> Result<HookPoint> {
        let layer = args
            .layer
            .context("give --layer L (the residual stream of which block to steer)")?;
        Ok(args.site.at(layer))
    };
    if let Some(pair) = &args.actadd {
        let hook = layer_hook()?;
        let pad = prompt::single_token(tok, &args.pad).context("--pad")?;
        let (pos, neg) = (tok.encode(&pair[0], true)?, tok.encode(&pair[1], true)?);
        let v = actadd(model, hook, &pos, &neg, pad)?;
        let source = format!(
            "ActAdd {:?} − {:?} ({:?} − {:?}, padded with {:?})",
            pair[0],
            pair[1],
            tok.token_strings(&pos),
            tok.token_strings(&neg),
            args.pad
        );
        return Ok((v, source, None));
    }
    if let Some(path) = &args.mean_diff {
        let hook = layer_hook()?;
        let pairs = read_contrast_pairs(path)?;
        let ids = pairs
            .iter()
            .map(|p| {
                Ok((
                    tok.encode(&p.positive, true)?,
                    tok.encode(&p.negative, true)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let v = mean_difference(model, hook, &ids)?;
        let source = format!(
            "mean difference over {} pairs of {}",
            pairs.len(),
            path.display()
        );
        return Ok((v, source, None));
    }
    let (Some(dir), Some(feature)) = (&args.sae, args.feature) else {
        bail!("give --actadd, --mean-diff or --sae with --feature");
    };
    let sae = scalpel_dict::saelens::load(dir, &Device::Cpu)
        .with_context(|| format!("loading dictionary `{}`", dir.display()))?;
    let hook = match &sae.cfg.metadata.hook_name {
        Some(name) => {
            let h = model
                .hook_point(name)
                .with_context(|| format!("the dictionary's hook_name {name:?}"))?;
            if args.layer.is_some_and(|l| args.site.at(l) != h) {
                bail!(
                    "the dictionary reads {h}, but --layer/--site ask for {}",
                    args.site.at(args.layer.unwrap_or(0))
                );
            }
            h
        }
        None => layer_hook().context("the dictionary has no metadata.hook_name")?,
    };
    let max_act = match args.max_act {
        Some(a) => a,
        None => {
            let a = max_activation(model, &sae, hook, feature, heldout)?;
            if a <= 0.0 {
                bail!(
                    "feature {feature} never fires on the held-out text (max {a}); give --max-act"
                );
            }
            a
        }
    };
    let mode = if clamp { "clamped" } else { "decoder row" };
    let source = format!(
        "{} latent {feature} ({mode}, max activation {max_act:.3})",
        dir.display()
    );
    let v = if clamp {
        sae_clamp(sae, feature, max_act, hook)?
    } else {
        sae_decoder_row(&sae, feature, max_act, hook)?
    };
    Ok((v, source, Some(max_act)))
}

/// `all`, `generated`, `first:K` or a comma-separated list of prompt positions.
fn parse_positions(s: &str) -> Result<Positions> {
    let s = s.trim();
    let bad = || {
        anyhow::anyhow!(
            "--positions {s:?}: expected `all`, `generated`, `first:K` or positions like `0,3,4`"
        )
    };
    Ok(match s {
        "all" => Positions::All,
        "generated" => Positions::Generated,
        _ => match s.strip_prefix("first:") {
            Some(k) => Positions::First(k.trim().parse().map_err(|_| bad())?),
            None => Positions::List(
                s.split(',')
                    .map(|p| p.trim().parse().map_err(|_| bad()))
                    .collect::<Result<_>>()?,
            ),
        },
    })
}

/// The text `gen` adds after `prompt` (decoded together, so that spaces survive).
fn continuation(tok: &Tokenizer, prompt: &[u32], gen: &[u32]) -> String {
    let all: Vec<u32> = prompt.iter().chain(gen).copied().collect();
    // Decoding known ids cannot fail; an error would only lose display text.
    let full = tok.decode(&all, true).unwrap_or_default();
    let head = tok.decode(prompt, true).unwrap_or_default();
    match full.strip_prefix(&head) {
        Some(rest) => rest.to_string(),
        None => tok.decode(gen, true).unwrap_or_default(),
    }
}

fn report(
    args: &Args,
    tok: &Tokenizer,
    ids: &[u32],
    source: String,
    vector: &SteeringVector,
    max_act: Option<f64>,
    s: Sweep,
) -> Report {
    let row = |point: SweepPoint| Row {
        text: point.tokens.as_ref().map(|g| continuation(tok, ids, g)),
        point,
    };
    let vector_norm = match &vector.direction {
        Direction::Add(v) => v
            .sqr()
            .and_then(|x| x.sum(candle_core::D::Minus1))
            .and_then(|x| x.sqrt())
            .and_then(|x| x.flatten_all())
            .and_then(|x| x.max(0))
            .and_then(|x| x.to_scalar::<f32>())
            .ok()
            .map(f64::from),
        Direction::Clamp(_) => None,
    };
    Report {
        model: args.model.model.clone(),
        prompt: args.prompt.clone(),
        source,
        vector_norm,
        max_act,
        target: args.target.clone(),
        hook: s.hook,
        positions: s.positions,
        heldout_tokens: s.heldout_tokens,
        unsteered: row(s.unsteered),
        points: s.points.into_iter().map(row).collect(),
    }
}

fn write_outputs(dir: &Path, report: &Report, plot: bool) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the output folder {}", dir.display()))?;
    let text = serde_json::to_string_pretty(report)?;
    scalpel_models::files::write_atomically(&dir.join("steer.json"), |w| writeln!(w, "{text}"))
        .map_err(|(path, e)| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    if !plot {
        return Ok(());
    }
    let x: Vec<f64> = report.points.iter().map(|r| r.point.coef).collect();
    let series = |name: &str, y: Vec<f64>| {
        vec![Series {
            name: name.into(),
            x: x.clone(),
            y,
        }]
    };
    let mut panels = Vec::new();
    if report.target.is_some() {
        panels.push(LinePlot {
            title: "target effect",
            x_label: "coefficient",
            y_label: "mean log-prob of the target",
            series: series(
                "steered",
                report
                    .points
                    .iter()
                    .map(|r| r.point.target_logprob.unwrap_or(f64::NAN))
                    .collect(),
            ),
            hlines: report
                .unsteered
                .point
                .target_logprob
                .map(|t| (t, "unsteered".to_string()))
                .into_iter()
                .collect(),
            ..Default::default()
        });
    }
    panels.push(LinePlot {
        title: "side effect: KL(unsteered ‖ steered) on held-out text",
        x_label: "coefficient",
        y_label: "nats per token",
        series: series("KL", report.points.iter().map(|r| r.point.kl).collect()),
        ..Default::default()
    });
    panels.push(LinePlot {
        title: "side effect: loss on held-out text",
        x_label: "coefficient",
        y_label: "cross-entropy (nats per token)",
        series: series(
            "steered",
            report.points.iter().map(|r| r.point.loss).collect(),
        ),
        hlines: vec![(report.unsteered.point.loss, "unsteered".into())],
        ..Default::default()
    });
    let cols = panels.len();
    line_grid(
        &dir.join("steer.svg"),
        &format!("Steering at {}: {}", report.hook, report.source),
        &panels,
        cols,
    )?;
    Ok(())
}

fn print_human(r: &Report, is_sweep: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let norm = r
        .vector_norm
        .map(|n| format!(", ‖v‖ {n:.2}"))
        .unwrap_or_default();
    writeln!(out, "{} at {}{norm}", r.source, r.hook)?;
    writeln!(
        out,
        "steering {}; side effects on {} held-out tokens",
        r.positions, r.heldout_tokens
    )?;
    let one_line = |t: &Option<String>| t.as_deref().unwrap_or("").replace('\n', "⏎");
    if !is_sweep {
        let s = &r.points[0];
        writeln!(
            out,
            "\nunsteered:  {}{}",
            r.prompt,
            one_line(&r.unsteered.text)
        )?;
        writeln!(
            out,
            "steered ×{}: {}{}",
            s.point.coef,
            r.prompt,
            one_line(&s.text)
        )?;
        if let (Some(t), Some(a), Some(b)) = (
            &r.target,
            r.unsteered.point.target_logprob,
            s.point.target_logprob,
        ) {
            writeln!(out, "\ntarget {t:?}: mean log-prob {a:.3} → {b:.3}")?;
        }
        writeln!(
            out,
            "side effects: KL(unsteered ‖ steered) {:.4} nats/token, loss {:.3} → {:.3}",
            s.point.kl, r.unsteered.point.loss, s.point.loss
        )?;
        return Ok(());
    }
    let target_head = match &r.target {
        Some(t) => format!("logp {t:?}"),
        None => "target".into(),
    };
    writeln!(
        out,
        "\n{:>9}  {:>12}  {:>8}  {:>7}  continuation",
        "coef", target_head, "KL", "loss"
    )?;
    let fmt_t = |t: Option<f64>| t.map_or("-".to_string(), |t| format!("{t:.3}"));
    let truncate = |s: String| {
        if s.chars().count() <= 70 {
            return s;
        }
        s.chars().take(69).chain(['…']).collect::<String>()
    };
    let u = &r.unsteered;
    writeln!(
        out,
        "{:>9}  {:>12}  {:>8}  {:>7.3}  {}",
        "unsteered",
        fmt_t(u.point.target_logprob),
        "0",
        u.point.loss,
        truncate(one_line(&u.text))
    )?;
    for row in &r.points {
        let p = &row.point;
        writeln!(
            out,
            "{:>9}  {:>12}  {:>8.4}  {:>7.3}  {}",
            p.coef,
            fmt_t(p.target_logprob),
            p.kl,
            p.loss,
            truncate(one_line(&row.text))
        )?;
    }
    Ok(())
}
