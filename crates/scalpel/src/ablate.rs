//! `scalpel ablate`: knock out attention heads, MLP neurons, whole MLPs or attention layers, or
//! SAE latents (zero, mean or resample ablation) and measure what the model loses: a metric over
//! prompt pairs (e.g. the IOI logit difference) and the next-token loss on held-out text. With
//! `--each` or `--each-head`, every target is ablated on its own and ranked.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use scalpel_circuits::ablate::{
    ablate, rank, Change, Data, Effect, LatentSae, Method, Reference, Source, Target,
};
use scalpel_circuits::metric::Metric;
use scalpel_circuits::pairs::{self, TokenPair};
use scalpel_dict::saelens;
use scalpel_models::tokenizer::Tokenizer;
use serde::Serialize;

use crate::model::ModelArgs;
use crate::output::print_json;
use crate::progress::CountBar;

/// Held-out text when `--text` is not given: plain expository prose about everyday subjects.
const DEFAULT_TEXT: &str = "\
The river that runs through the valley has shaped the lives of the people who live along its \
banks for as long as anyone can remember. In spring, when the snow on the mountains melts, the \
water rises quickly and floods the low fields near the old mill. Farmers have learned to plant \
their crops on the higher ground, and most of the houses in the village stand on stone \
foundations that lift them above the worst of the water.

Bread is one of the oldest foods that people make. The basic recipe needs only flour, water, \
salt and yeast, yet bakers around the world have turned these few ingredients into hundreds of \
different loaves. The dough is mixed, left to rise for several hours, shaped and then baked in \
a hot oven until the crust turns golden brown. A good loaf should sound hollow when you tap the \
bottom.

Most cities built their first railway stations in the second half of the nineteenth century. \
The trains brought goods and visitors from distant places, and new shops, hotels and factories \
soon grew up around the tracks. Many of these stations are still in use today, although the \
steam engines have long been replaced by electric trains that are faster, quieter and cleaner.

When you learn a new language, it helps to practise a little every day rather than a lot once a \
week. Reading simple stories, listening to the radio and speaking with friends all make the new \
words easier to remember. Mistakes are a normal part of learning, and most people are happy to \
help someone who is trying to speak their language.";

/// How an ablated component is replaced.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MethodArg {
    /// Zero.
    Zero,
    /// The component's mean over a reference set (`--mean-over`).
    Mean,
    /// The component's value at the same position of another prompt (`--resample-from`).
    Resample,
}

/// Where resampled values come from.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceArg {
    /// Each pair's corrupt prompt (held-out text resamples from its other windows).
    Corrupt,
    /// Another clean prompt (or text window) at least as long, drawn with `--seed` (so the
    /// longest length needs two prompts).
    Other,
}

/// Options of `scalpel ablate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt pairs: a JSONL file, one {"clean", "corrupt", "answer", "wrong"} object a line.
    #[arg(long, conflicts_with = "ioi")]
    pub pairs: Option<PathBuf>,
    /// Generate this many Indirect Object Identification pairs (with `--seed`) instead.
    #[arg(long, value_name = "N")]
    pub ioi: Option<usize>,
    /// What the pairs measure at the last position: `logit_diff`, `prob`, `logprob` or an
    /// expression such as `logprob(answer) - logprob(wrong)`.
    #[arg(long, default_value = "logit_diff")]
    pub metric: String,
    /// A component to ablate (repeatable): `L5H3` or `5.3` (head 3 of layer 5), `L5N1024` or
    /// `n5.1024` (an MLP neuron), `mlp5`, `attn5` (a whole MLP or attention layer), `sae:123`
    /// (a latent of `--sae`). All are ablated together unless `--each` is given.
    #[arg(long = "target", value_name = "TARGET")]
    pub targets: Vec<String>,
    /// Ablate each `--target` on its own and rank them by the metric's drop.
    #[arg(long)]
    pub each: bool,
    /// Ablate every attention head on its own and rank them (with `--out`, also a layer × head
    /// heatmap of the metric's change).
    #[arg(long, conflicts_with_all = ["targets", "each"])]
    pub each_head: bool,
    /// How ablated components are replaced.
    #[arg(long, value_enum, default_value = "mean")]
    pub method: MethodArg,
    /// The reference set of `--method mean`: `clean` (the pairs' clean prompts), `corrupt` (their
    /// corrupt prompts, e.g. IOI's ABC distribution, as Wang et al. mean-ablate), `text` (the
    /// held-out text) or a text file, cut into `--context-size` windows.
    #[arg(long, value_name = "SET", default_value = "clean")]
    pub mean_over: String,
    /// Where `--method resample` takes its values.
    #[arg(long, value_enum, default_value = "corrupt")]
    pub resample_from: SourceArg,
    /// Seed of `--ioi` and of `--resample-from other`.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Held-out text file for the next-token loss (default: a few built-in paragraphs).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens per window of held-out text (and of a `--mean-over` file).
    #[arg(long, default_value_t = 64)]
    pub context_size: usize,
    /// Skip the loss on held-out text (rankings run about twice as fast).
    #[arg(long, conflicts_with = "text")]
    pub no_loss: bool,
    /// An SAE in SAELens format (cfg.json + sae_weights.safetensors) whose latents `sae:N`
    /// targets name.
    #[arg(long, value_name = "DIR")]
    pub sae: Option<PathBuf>,
    /// The hook the SAE reads and writes, instead of its metadata's `hook_name`.
    #[arg(long, value_name = "HOOK", requires = "sae")]
    pub sae_hook: Option<String>,
    /// Rows of a ranking shown (JSON always has every target).
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Folder for the `--each-head` heatmap (`ablate-heads.svg`).
    #[arg(long, value_name = "DIR", requires = "each_head")]
    pub out: Option<PathBuf>,
}

#[derive(Serialize)]
struct Report {
    model: String,
    /// `zero`, `mean` or `resample`.
    method: String,
    /// What the mean is over, or where resampled values come from.
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    seed: u64,
    metric: Option<String>,
    pairs: usize,
    /// Windows of held-out text and the positions whose loss is averaged.
    text_windows: usize,
    text_positions: usize,
    /// All targets ablated together.
    #[serde(skip_serializing_if = "Option::is_none")]
    effect: Option<Effect>,
    /// Each target alone, the largest metric drop (or loss rise) first.
    #[serde(skip_serializing_if = "Option::is_none")]
    ranking: Option<Vec<Effect>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heatmap: Option<PathBuf>,
}

pub fn run(args: Args, json: bool) -> Result<()> {
    if args.context_size < 2 {
        bail!("--context-size must be at least 2");
    }
    if !args.each_head && args.targets.is_empty() {
        bail!("nothing to ablate: give --target (repeatable) or --each-head");
    }
    let lm = args.model.load()?;
    let (model, tok) = (&lm.model, lm.tokenizer()?);
    crate::model::check_context_size(model, args.context_size)?;
    let sae = match &args.sae {
        Some(dir) => {
            let sae = saelens::load(dir, &Device::Cpu)
                .with_context(|| format!("loading the SAE `{}`", dir.display()))?;
            Some(LatentSae::new(model, sae, args.sae_hook.as_deref())?)
        }
        None => None,
    };
    let targets: Vec<Target> = if args.each_head {
        Target::all_heads(model.config())
    } else {
        args.targets
            .iter()
            .map(|t| Ok(Target::parse(t, model.config(), sae.as_ref())?))
            .collect::<Result<_>>()?
    };
    let prompt_pairs = match (&args.pairs, args.ioi) {
        (Some(path), _) => Some(pairs::read_jsonl(path)?),
        (None, Some(n)) => Some(pairs::ioi(tok, n, args.seed)?),
        (None, None) => None,
    };
    let token_pairs = match prompt_pairs {
        Some(p) => Some(pairs::tokenize(tok, &p)?),
        None => None,
    };
    let metric = Metric::parse(&args.metric, Some(tok))?;
    let text = if args.no_loss {
        None
    } else {
        let (body, name) = match &args.text {
            Some(path) => (read_text(path)?, path.display().to_string()),
            None => (DEFAULT_TEXT.to_string(), "the built-in text".to_string()),
        };
        Some(windows(tok, &body, args.context_size, &name)?)
    };
    if token_pairs.is_none() && text.is_none() {
        bail!("nothing to measure: give --pairs or --ioi, or leave out --no-loss");
    }
    let (method, from) = method(&args, tok, text.as_deref(), token_pairs.as_deref())?;
    let data = Data {
        pairs: token_pairs.as_deref().map(|p| (p, &metric)),
        text: text.as_deref(),
    };
    let mut report = Report {
        model: args.model.model.clone(),
        method: format!("{:?}", args.method).to_lowercase(),
        from,
        seed: args.seed,
        metric: token_pairs.as_ref().map(|_| metric.name.clone()),
        pairs: token_pairs.as_ref().map_or(0, Vec::len),
        text_windows: text.as_ref().map_or(0, Vec::len),
        text_positions: text
            .as_ref()
            .map_or(0, |t| t.iter().map(|w| w.len() - 1).sum()),
        effect: None,
        ranking: None,
        heatmap: None,
    };
    if args.each || args.each_head {
        let (mut bar, mut shown) = (None, 0);
        let mut ranking = rank(
            model,
            &targets,
            &method,
            sae.as_ref(),
            data,
            |done, total| {
                bar.get_or_insert_with(|| {
                    CountBar::start(total as u64, 0, "ablating".into(), "target runs")
                })
                .inc((done - shown) as u64);
                shown = done;
            },
        )?;
        drop(bar);
        if let Some(dir) = &args.out {
            report.heatmap = Some(heatmap(dir, model.config(), &ranking, &report)?);
        }
        ranking.sort_by(|a, b| severity(b).total_cmp(&severity(a)));
        report.ranking = Some(ranking);
    } else {
        report.effect = Some(ablate(model, &targets, &method, sae.as_ref(), data)?);
    }
    if json {
        print_json(&report)
    } else {
        print_report(&report, args.top)
    }
}

/// The library's method from the flags, and a description of its reference or source.
fn method(
    args: &Args,
    tok: &Tokenizer,
    text: Option<&[Vec<u32>]>,
    token_pairs: Option<&[TokenPair]>,
) -> Result<(Method, Option<String>)> {
    Ok(match args.method {
        MethodArg::Zero => (Method::Zero, None),
        MethodArg::Mean => {
            let (reference, from) = match args.mean_over.as_str() {
                "clean" => {
                    if args.pairs.is_none() && args.ioi.is_none() {
                        bail!("--mean-over clean needs prompt pairs (--pairs or --ioi)");
                    }
                    (Reference::CleanPrompts, "the clean prompts".to_string())
                }
                "corrupt" => match token_pairs {
                    Some(p) => (
                        Reference::Sequences(p.iter().map(|p| p.corrupt.clone()).collect()),
                        "the corrupt prompts".into(),
                    ),
                    None => bail!("--mean-over corrupt needs prompt pairs (--pairs or --ioi)"),
                },
                "text" => match text {
                    Some(t) => (Reference::Sequences(t.to_vec()), "the held-out text".into()),
                    None => bail!("--mean-over text needs the held-out text (drop --no-loss)"),
                },
                path => {
                    let body = read_text(Path::new(path))?;
                    let w = windows(tok, &body, args.context_size, path)?;
                    (Reference::Sequences(w), path.to_string())
                }
            };
            (Method::Mean(reference), Some(format!("over {from}")))
        }
        MethodArg::Resample => match args.resample_from {
            SourceArg::Corrupt => (
                Method::Resample(Source::Corrupt),
                Some("from the corrupt prompts".into()),
            ),
            SourceArg::Other => (
                Method::Resample(Source::Other { seed: args.seed }),
                Some(format!("from other clean prompts, seed {}", args.seed)),
            ),
        },
    })
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// `text` cut into windows of `context` tokens (BOS first when the tokenizer adds one); a tail
/// shorter than a window is dropped unless it is all there is.
fn windows(tok: &Tokenizer, text: &str, context: usize, name: &str) -> Result<Vec<Vec<u32>>> {
    let ids = tok.encode(text, false)?;
    let bos = tok.bos_id().filter(|_| tok.add_bos());
    let body = context - usize::from(bos.is_some());
    let window = |c: &[u32]| {
        bos.into_iter()
            .chain(c.iter().copied())
            .collect::<Vec<u32>>()
    };
    let mut w: Vec<Vec<u32>> = ids.chunks_exact(body).map(window).collect();
    if w.is_empty() {
        w.push(window(&ids));
    }
    if w[0].len() < 2 {
        bail!(
            "{name} is {} token(s); the next-token loss needs at least 2",
            ids.len()
        );
    }
    Ok(w)
}

/// How much an ablation hurt: the metric's drop, or the loss's rise without pairs.
fn severity(e: &Effect) -> f64 {
    match (e.metric, e.loss) {
        (Some(m), _) => -m.change,
        (None, Some(l)) => l.change,
        (None, None) => 0.0,
    }
}

/// Writes `ablate-heads.svg` into `dir`: the metric's (or the loss's) change per layer and head.
fn heatmap(
    dir: &Path,
    cfg: &scalpel_models::config::Config,
    ranking: &[Effect],
    r: &Report,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut values = vec![vec![0.0; cfg.n_heads]; cfg.n_layers];
    for e in ranking {
        if let [Target::Head { layer, head }] = e.targets[..] {
            values[layer][head] = e.metric.or(e.loss).map_or(0.0, |c| c.change);
        }
    }
    let what = r.metric.clone().unwrap_or_else(|| "loss".into());
    let title = format!("{what} change when each head is {} ablated", r.method);
    let path = dir.join("ablate-heads.svg");
    scalpel_toys::plot::heatmap(
        &path,
        &scalpel_toys::plot::Heatmap {
            title: &title,
            values: &values,
            row_labels: None,
            col_labels: None,
            x_label: "head",
            y_label: "layer",
            diverging: true,
        },
    )
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn fmt_change(c: &Change) -> String {
    format!(
        "clean {:.4}  ablated {:.4}  change {:+.4}",
        c.clean, c.ablated, c.change
    )
}

fn print_report(r: &Report, top: usize) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let how = match &r.from {
        Some(from) => format!("{} ablation ({from})", r.method),
        None => format!("{} ablation", r.method),
    };
    let metric_line = |c: &Change| {
        format!(
            "{} over {} pairs: {}",
            r.metric.as_deref().unwrap_or("metric"),
            r.pairs,
            fmt_change(c)
        )
    };
    let loss_line = |c: &Change| {
        format!(
            "loss over {} positions of held-out text: {}",
            r.text_positions,
            fmt_change(c)
        )
    };
    if let Some(e) = &r.effect {
        let names: Vec<String> = e.targets.iter().map(Target::to_string).collect();
        writeln!(out, "{how} of {}", names.join(", "))?;
        if let Some(m) = &e.metric {
            writeln!(out, "{}", metric_line(m))?;
        }
        if let Some(l) = &e.loss {
            writeln!(out, "{}", loss_line(l))?;
        }
    }
    if let Some(ranking) = &r.ranking {
        writeln!(out, "{how} of each of {} targets", ranking.len())?;
        if let Some(first) = ranking.first() {
            if let Some(m) = &first.metric {
                writeln!(
                    out,
                    "{} over {} pairs, unablated: {:.4}",
                    r.metric.as_deref().unwrap_or("metric"),
                    r.pairs,
                    m.clean
                )?;
            }
            if let Some(l) = &first.loss {
                writeln!(
                    out,
                    "loss over {} positions of held-out text, unablated: {:.4}",
                    r.text_positions, l.clean
                )?;
            }
        }
        writeln!(
            out,
            "\n{:<10} {:>10} {:>10} {:>10} {:>10}",
            "target", "metric", "change", "loss", "change"
        )?;
        let show = |c: Option<Change>| match c {
            Some(c) => (format!("{:.4}", c.ablated), format!("{:+.4}", c.change)),
            None => ("-".to_string(), "-".to_string()),
        };
        for e in ranking.iter().take(top) {
            let names: Vec<String> = e.targets.iter().map(Target::to_string).collect();
            let ((m, mc), (l, lc)) = (show(e.metric), show(e.loss));
            writeln!(
                out,
                "{:<10} {m:>10} {mc:>10} {l:>10} {lc:>10}",
                names.join("+"),
            )?;
        }
        if ranking.len() > top {
            writeln!(
                out,
                "({} more; --top N shows more, --json has all)",
                ranking.len() - top
            )?;
        }
    }
    if let Some(path) = &r.heatmap {
        writeln!(out, "\nwrote {}", path.display())?;
    }
    Ok(())
}
