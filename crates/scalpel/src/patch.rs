//! `scalpel patch` and `scalpel attribute`: activation patching over clean/corrupt prompt pairs,
//! exactly (one patched run per cell, batched) or by attribution patching (one forward and one
//! backward pass per pair group), with heatmaps and JSON.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use scalpel_circuits::metric::Metric;
use scalpel_circuits::pairs::{self, PromptPair, TokenPair};
use scalpel_circuits::patching::{
    self, correlation, Direction, PatchGrid, Patcher, Receiver, Sweep,
};
use scalpel_models::tokenizer::Tokenizer;
use scalpel_toys::plot::{heatmap, Heatmap};
use serde::Serialize;

use crate::model::ModelArgs;
use crate::output::print_json;
use crate::progress::CountBar;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub pairs: PairArgs,
    /// What is measured at the last position: `logit_diff`, `prob`, `logprob`, or an expression
    /// such as `logprob(answer) - logprob(wrong)` or `logit(" Paris") - logit(wrong)`.
    #[arg(long, default_value = "logit_diff")]
    pub metric: String,
    /// Sweeps, comma-separated: resid_pre, attn_out, mlp_out (layer × position), z_head, q_head,
    /// pattern_head (layer × head), k_head, v_head (layer × key/value head), z_head_pos
    /// (layer × head × position).
    /// (Default: resid_pre,attn_out,mlp_out,z_head, or none with --path-to.)
    #[arg(long, value_delimiter = ',')]
    pub sweep: Option<Vec<String>>,
    /// Path patching from every head to these receivers, comma-separated: `logits`, or head
    /// inputs such as `L9H6.q,L9H9.q` (`.k`, `.v` for keys and values).
    #[arg(long, value_delimiter = ',')]
    pub path_to: Option<Vec<String>>,
    /// With --path-to: also hold every MLP at its base value (by default MLPs recompute).
    #[arg(long, requires = "path_to")]
    pub freeze_mlps: bool,
    /// denoise: run the corrupt prompts, patch in clean activations; noise: the reverse.
    #[arg(long, default_value = "denoise")]
    pub direction: String,
    /// exact, attribution, or both (both also reports their correlation per sweep).
    #[arg(long, default_value = "exact")]
    pub method: String,
    /// Folder for SVG heatmaps and patching.json.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Cells listed per sweep, largest |score| first (JSON always has every cell).
    #[arg(long, default_value_t = 8)]
    pub top: usize,
    /// Also write the pairs used (e.g. generated ones) to this JSONL file.
    #[arg(long)]
    pub save_pairs: Option<PathBuf>,
}

/// Pairs as text and as tokens, and per-position IOI role labels when they share a template.
pub type LoadedPairs = (Vec<PromptPair>, Vec<TokenPair>, Option<Vec<String>>);

/// Where the prompt pairs come from.
#[derive(clap::Args, Debug)]
pub struct PairArgs {
    /// A JSONL file of {"clean", "corrupt", "answer", "wrong"} lines.
    #[arg(long, conflicts_with_all = ["ioi", "factual", "clean"])]
    pub pairs: Option<PathBuf>,
    /// Generate this many IOI pairs (ABC corruption).
    #[arg(long, conflicts_with_all = ["factual", "clean"])]
    pub ioi: Option<usize>,
    /// With --ioi: use only this template (so all prompts have one length, as position sweeps
    /// need). Default: the template of the first pair drawn when a position sweep is asked for.
    #[arg(long, requires = "ioi")]
    pub template: Option<usize>,
    /// Generate this many factual-recall pairs.
    #[arg(long, conflicts_with = "clean")]
    pub factual: Option<usize>,
    /// Seed of the generated pairs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// One pair given on the command line: the clean prompt…
    #[arg(long, requires_all = ["corrupt", "answer", "wrong"])]
    pub clean: Option<String>,
    /// …the corrupt prompt (same token length)…
    #[arg(long)]
    pub corrupt: Option<String>,
    /// …the right answer (one token, e.g. " Mary")…
    #[arg(long)]
    pub answer: Option<String>,
    /// …and the wrong one.
    #[arg(long)]
    pub wrong: Option<String>,
}

impl PairArgs {
    /// The pairs as text and tokens, and per-position role labels when every pair shares one
    /// IOI template.
    pub fn load(&self, tok: &Tokenizer, one_length: bool) -> Result<LoadedPairs> {
        let mut roles = None;
        let text: Vec<PromptPair> = if let Some(path) = &self.pairs {
            pairs::read_jsonl(path)?
        } else if let Some(n) = self.ioi {
            let template = self.template;
            let all = pairs::ioi_with(
                tok,
                &pairs::IoiOptions {
                    n: if template.is_some() || one_length {
                        n * 40
                    } else {
                        n
                    },
                    seed: self.seed,
                    corruption: pairs::Corruption::Abc,
                },
            )?;
            let keep = match template {
                Some(t) => Some(t),
                None if one_length => all.first().map(|p| p.template),
                None => None,
            };
            let chosen: Vec<_> = all
                .into_iter()
                .filter(|p| keep.is_none_or(|t| p.template == t))
                .take(n)
                .collect();
            if chosen.len() < n {
                bail!(
                    "only {} IOI pairs of template {:?} came out of {} draws; ask for fewer or another template",
                    chosen.len(),
                    keep,
                    n * 40
                );
            }
            if keep.is_some() {
                roles = chosen
                    .first()
                    .map(|p| p.labels().into_iter().map(String::from).collect());
            }
            chosen.into_iter().map(|p| p.pair).collect()
        } else if let Some(n) = self.factual {
            pairs::factual(tok, n, self.seed)?
        } else if let (Some(c), Some(k), Some(a), Some(w)) =
            (&self.clean, &self.corrupt, &self.answer, &self.wrong)
        {
            vec![PromptPair {
                clean: c.clone(),
                corrupt: k.clone(),
                answer: a.clone(),
                wrong: w.clone(),
            }]
        } else {
            bail!(
                "no prompt pairs: give --pairs FILE.jsonl, --ioi N, --factual N, or --clean/--corrupt/--answer/--wrong"
            );
        };
        let tokens = pairs::tokenize(tok, &text)?;
        Ok((text, tokens, roles))
    }
}

#[derive(Serialize)]
struct Report<'a> {
    pairs: usize,
    metric: &'a str,
    direction: Direction,
    clean: f64,
    corrupt: f64,
    /// Seconds to run and cache the clean and corrupt prompts (shared by every sweep).
    setup_seconds: f64,
    /// Seconds of one plain forward pass over every clean prompt (the unit of cost).
    forward_seconds: f64,
    /// Labels of the position axis: the first pair's clean tokens (and IOI roles).
    positions: Vec<String>,
    grids: Vec<GridReport<'a>>,
}

#[derive(Serialize)]
struct GridReport<'a> {
    #[serde(flatten)]
    grid: &'a PatchGrid,
    seconds: f64,
    /// Pearson correlation of attribution with exact scores (both methods only).
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_with_exact: Option<f64>,
}

/// `scalpel attribute`: the same, by attribution patching unless `--method both` asks for the
/// comparison with exact patching.
pub fn run_attribute(mut args: Args, json: bool) -> Result<()> {
    if args.method == "exact" {
        args.method = "attribution".into();
    }
    run(args, json)
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let direction = match args.direction.as_str() {
        "denoise" | "denoising" => Direction::Denoise,
        "noise" | "noising" => Direction::Noise,
        d => bail!("--direction {d:?}: use denoise or noise"),
    };
    let (exact, attribution) = match args.method.as_str() {
        "exact" => (true, false),
        "attribution" | "attr" => (false, true),
        "both" => (true, true),
        m => bail!("--method {m:?}: use exact, attribution or both"),
    };
    let receivers = args
        .path_to
        .iter()
        .flatten()
        .map(|r| Receiver::parse(r).map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    let sweep_names = match (&args.sweep, receivers.is_empty()) {
        (Some(s), _) => s.clone(),
        (None, true) => ["resid_pre", "attn_out", "mlp_out", "z_head"]
            .map(String::from)
            .to_vec(),
        (None, false) => Vec::new(),
    };
    let sweeps = sweep_names
        .iter()
        .map(|s| Sweep::parse(s).map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    if sweeps.is_empty() && receivers.is_empty() {
        bail!("--sweep names no sweep");
    }
    let loaded = args.model.load()?;
    let model = &loaded.model;
    let tok = loaded.tokenizer()?;
    let metric = Metric::parse(&args.metric, Some(tok))?;
    let one_length = sweeps.iter().any(|s| s.by_position());
    let (text, tokens, roles) = args.pairs.load(tok, one_length)?;
    if let Some(path) = &args.save_pairs {
        pairs::write_jsonl(path, &text)?;
    }
    // Attribution alone needs none of the caches exact and path patching share, so it skips the
    // shared setup and runs its own leaner passes.
    let lean = attribution && !exact && receivers.is_empty();
    let t = Instant::now();
    let patcher = if lean {
        None
    } else {
        Some(Patcher::new(model, &tokens, &metric)?)
    };
    let setup_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (len, members) in pairs::by_length(&tokens) {
        let flat: Vec<u32> = members
            .iter()
            .flat_map(|&i| tokens[i].clean.clone())
            .collect();
        let batch = candle_core::Tensor::from_vec(flat, (members.len(), len), model.device())?;
        model.forward(&batch)?;
    }
    let forward_seconds = t.elapsed().as_secs_f64();
    let mut grids: Vec<(PatchGrid, f64, Option<f64>)> = Vec::new();
    let (clean, corrupt) = match &patcher {
        Some(p) => (p.clean_metric(), p.corrupt_metric()),
        None => {
            let t = Instant::now();
            let out = patching::attribute(model, &tokens, &metric, &sweeps, direction)?;
            let secs = t.elapsed().as_secs_f64() / out.grids.len().max(1) as f64;
            grids.extend(out.grids.into_iter().map(|g| (g, secs, None)));
            (out.clean, out.corrupt)
        }
    };
    let mut positions: Vec<String> = tok.token_strings(&tokens[0].clean);
    if let Some(roles) = &roles {
        for (p, r) in positions.iter_mut().zip(roles) {
            if !r.is_empty() {
                *p = format!("{p} ({r})");
            }
        }
    }
    if !json {
        println!(
            "{} pairs · metric {} · clean {:.4} · corrupt {:.4} · {}",
            text.len(),
            metric.name,
            clean,
            corrupt,
            direction.name()
        );
        println!("  e.g. clean   {:?}", text[0].clean);
        println!("       corrupt {:?}", text[0].corrupt);
    }
    if let (Some(patcher), false) = (&patcher, receivers.is_empty()) {
        let total = patcher.groups() * model.config().n_layers;
        let bar = CountBar::start(total as u64, 0, "path patching".into(), "layers");
        let t = Instant::now();
        let g = patcher.path(&receivers, direction, args.freeze_mlps, |_, _| bar.inc(1))?;
        drop(bar);
        grids.push((g, t.elapsed().as_secs_f64(), None));
    }
    if let (Some(patcher), true, false) = (&patcher, attribution, sweeps.is_empty()) {
        let t = Instant::now();
        let out = patcher.attribution(&sweeps, direction)?;
        let secs = t.elapsed().as_secs_f64() / out.len() as f64;
        grids.extend(out.into_iter().map(|g| (g, secs, None)));
    }
    if let (Some(patcher), true) = (&patcher, exact) {
        for &s in &sweeps {
            let total = patcher.planned_runs(s);
            let bar = CountBar::start(total as u64, 0, format!("patching {}", s.name()), "runs");
            let t = Instant::now();
            let g = patcher.exact(s, direction, |_, _| bar.inc(1))?;
            drop(bar);
            let secs = t.elapsed().as_secs_f64();
            let corr = grids
                .iter()
                .find(|(a, _, _)| a.sweep == s && a.method == "attribution")
                .and_then(|(a, _, _)| correlation(&a.scores, &g.scores));
            grids.push((g, secs, corr));
        }
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the output folder {}", dir.display()))?;
        for (g, _, _) in &grids {
            plot(dir, g, &positions, model.config().n_heads)?;
        }
    }
    let report = Report {
        pairs: text.len(),
        metric: &metric.name,
        direction,
        clean,
        corrupt,
        setup_seconds,
        forward_seconds,
        positions: positions.clone(),
        grids: grids
            .iter()
            .map(|(g, s, c)| GridReport {
                grid: g,
                seconds: *s,
                correlation_with_exact: *c,
            })
            .collect(),
    };
    if let Some(dir) = &args.out {
        let text = serde_json::to_string_pretty(&report)?;
        scalpel_models::files::write_atomically(&dir.join("patching.json"), |w| {
            writeln!(w, "{text}")
        })
        .map_err(|(path, e)| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
    if json {
        return print_json(&report);
    }
    for (g, secs, corr) in &grids {
        let extra = match corr {
            Some(c) => format!(" · correlation with attribution {c:.3}"),
            None => String::new(),
        };
        println!(
            "\n{} {} ({}) · {:.2} s · {} runs{extra}",
            g.method,
            g.sweep.name(),
            g.axes.join(" × "),
            secs,
            g.runs
        );
        let mut cells: Vec<usize> = (0..g.scores.len()).collect();
        cells.sort_by(|&a, &b| g.scores[b].abs().total_cmp(&g.scores[a].abs()));
        for &c in cells.iter().take(args.top) {
            println!("  {:>8.3}  {}", g.scores[c], cell_label(g, c, &positions));
        }
    }
    if let Some(dir) = &args.out {
        println!("\nheatmaps and patching.json in {}", dir.display());
    }
    Ok(())
}

/// `L9 H6 pos 14 " Mary"`-style name of a flat cell index.
fn cell_label(g: &PatchGrid, flat: usize, positions: &[String]) -> String {
    let mut idx = vec![0; g.shape.len()];
    let mut rest = flat;
    for (i, n) in g.shape.iter().enumerate().rev() {
        idx[i] = rest % n;
        rest /= n;
    }
    g.axes
        .iter()
        .zip(&idx)
        .map(|(axis, &i)| match *axis {
            "layer" => format!("L{i}"),
            "head" => format!("H{i}"),
            "kv_head" => format!("KV{i}"),
            "position" => format!("pos {i} {:?}", positions.get(i).map_or("", |s| s.as_str())),
            _ => format!("{axis} {i}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One heatmap per grid: layers down, positions or heads across (layer·head rows for the
/// head × position sweep).
fn plot(dir: &Path, g: &PatchGrid, positions: &[String], n_heads: usize) -> Result<()> {
    let cols = *g.shape.last().unwrap_or(&1);
    let rows: Vec<Vec<f64>> = g.scores.chunks(cols).map(|c| c.to_vec()).collect();
    let last_axis = *g.axes.last().unwrap_or(&"");
    let col_labels: Vec<String> = match last_axis {
        "position" => positions
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{i} {t}"))
            .collect(),
        "kv_head" => (0..cols).map(|h| format!("KV{h}")).collect(),
        _ => (0..cols).map(|h| format!("H{h}")).collect(),
    };
    let row_labels: Vec<String> = if g.shape.len() == 3 {
        (0..rows.len())
            .map(|r| format!("L{}H{}", r / n_heads, r % n_heads))
            .collect()
    } else {
        (0..rows.len()).map(|l| format!("L{l}")).collect()
    };
    let title = format!(
        "{} patching ({}) of {}: normalised {}",
        g.method,
        g.direction.name(),
        g.sweep.name(),
        g.metric
    );
    let x_label = match last_axis {
        "position" => "position (token)",
        "kv_head" => "key/value head",
        _ => "head",
    };
    let y_label = if g.shape.len() == 3 {
        "layer, head"
    } else {
        "layer"
    };
    let method = if g.method.starts_with("path") {
        "path"
    } else {
        g.method.as_str()
    };
    let path = dir.join(format!(
        "{}_{}_{method}.svg",
        g.direction.name(),
        g.sweep.name()
    ));
    heatmap(
        &path,
        &Heatmap {
            title: &title,
            values: &rows,
            row_labels: Some(row_labels),
            col_labels: Some(col_labels),
            x_label,
            y_label,
            diverging: true,
        },
    )?;
    Ok(())
}
