//! `scalpel eval`: how well a sparse dictionary stands in for the activation it was trained on,
//! with SAELens's metrics (reconstruction, sparsity, downstream loss and KL, feature density) over
//! held-out text. Writes nothing unless `--out` is given.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use scalpel_data::corpus;
use scalpel_data::packing::{special_ids, Packer, PackingConfig, Separator};
use scalpel_dict::eval::{self, EvalOptions, EvalReport};
use scalpel_dict::{import, saelens, Sae};
use scalpel_models::files::write_atomically;
use serde::Serialize;

use crate::model::ModelArgs;
use crate::output::print_json;
use crate::progress::CountBar;

/// Options of `scalpel eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The dictionary: a SAELens directory (cfg.json + sae_weights.safetensors), a sparsify
    /// directory (cfg.json + sae.safetensors) or a Gemma Scope params.npz (needs --hook).
    #[arg(long)]
    pub dict: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Corpus: a .txt/.jsonl/.parquet file, a directory of them, `demo`, `demo:heldout` or
    /// `hf-dataset:org/name[@revision][:prefix]`.
    #[arg(long, default_value = "demo:heldout")]
    pub data: String,
    /// JSONL key or Parquet column holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Tokens to evaluate (rounded up to whole contexts).
    #[arg(long, default_value_t = 20_480)]
    pub tokens: u64,
    /// Tokens per context (each starts with BOS unless the dictionary's metadata says
    /// `prepend_bos: false`).
    #[arg(long, default_value_t = 128)]
    pub context_size: usize,
    /// Contexts per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// The hook the dictionary reads, instead of its metadata's `hook_name`.
    #[arg(long)]
    pub hook: Option<String>,
    /// Count positions holding special tokens (BOS, EOS, chat markers) too; by default they are
    /// left out, as SAELens's `exclude_special_tokens`.
    #[arg(long)]
    pub include_special_tokens: bool,
    /// Also run with the error term kept, reporting `ce_loss_with_error_term` (must equal
    /// `ce_loss_without_sae`: a check of the splice).
    #[arg(long)]
    pub error_term: bool,
    /// Write the full report as JSON to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The report with what was evaluated.
#[derive(Serialize)]
struct Report {
    dict: PathBuf,
    model: String,
    data: String,
    #[serde(flatten)]
    eval: EvalReport,
}

/// Reads a dictionary in any format scalpel imports, by what the path holds.
fn load_dict(path: &Path, hook: Option<&str>) -> Result<Sae> {
    let dev = &Device::Cpu;
    let sae = if path.extension().is_some_and(|e| e == "npz") {
        let hook =
            hook.context("a Gemma Scope params.npz does not say where it applies: give --hook")?;
        import::gemma_scope(path, hook, None, dev)?
    } else if path.join("sae.safetensors").exists()
        && !path.join(saelens::WEIGHTS_FILENAME).exists()
    {
        import::sparsify(path, hook, dev)?
    } else {
        saelens::load(path, dev)?
    };
    Ok(sae)
}

pub fn run(args: Args, json: bool) -> Result<()> {
    if args.tokens == 0 || args.context_size < 2 || args.batch == 0 {
        bail!("--tokens and --batch must be positive and --context-size at least 2");
    }
    let sae = load_dict(&args.dict, args.hook.as_deref())
        .with_context(|| format!("loading dictionary `{}`", args.dict.display()))?;
    let lm = args.model.load()?;
    let model = &lm.model;
    crate::model::check_context_size(model, args.context_size)?;
    // Check the hooks and widths before reading any text.
    eval::eval_points(model, &sae, args.hook.as_deref())?;
    let tokenizer = lm.tokenizer()?;
    let packing = PackingConfig {
        context_size: args.context_size,
        prepend_bos: sae.cfg.metadata.prepend_bos.unwrap_or(true),
        sequence_separator_token: Separator::Bos,
        disable_concat_sequences: false,
        exclude_special_tokens: !args.include_special_tokens,
    };
    let path = corpus::resolve(&args.data)?;
    let n_contexts = args.tokens.div_ceil(args.context_size as u64) as usize;
    let docs = corpus::open(&path, &args.text_field)?;
    let contexts = Packer::new(tokenizer, &packing, docs)?
        .take(n_contexts)
        .collect::<Result<Vec<_>, _>>()?;
    if contexts.is_empty() {
        bail!(
            "the corpus `{}` holds no context of {} tokens",
            args.data,
            args.context_size
        );
    }
    if contexts.len() < n_contexts {
        tracing::warn!(
            contexts = contexts.len(),
            asked = n_contexts,
            "the corpus ran out before --tokens was reached"
        );
    }
    let opts = EvalOptions {
        batch_contexts: args.batch,
        exclude_token_ids: if args.include_special_tokens {
            Vec::new()
        } else {
            special_ids(tokenizer)
        },
        hook: args.hook.clone(),
        error_term: args.error_term,
        ..EvalOptions::default()
    };
    let bar = CountBar::start(
        (contexts.len() * args.context_size) as u64,
        0,
        "evaluating".into(),
        "tokens",
    );
    let report = eval::evaluate(model, &sae, &contexts, &opts, |n| bar.inc(n as u64))?;
    drop(bar);
    let report = Report {
        dict: args.dict,
        model: args.model.model,
        data: args.data,
        eval: report,
    };
    if let Some(out) = &args.out {
        let text = serde_json::to_string_pretty(&report)?;
        write_atomically(out, |w| writeln!(w, "{text}")).map_err(|(path, e)| {
            anyhow::Error::new(e).context(format!("writing {}", path.display()))
        })?;
    }
    if json {
        print_json(&report)
    } else {
        print_table(&report)
    }
}

/// Four significant digits or so, without exponents for everyday magnitudes.
fn num(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.3e}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.4}")
    }
}

fn print_table(r: &Report) -> Result<()> {
    let e = &r.eval;
    let mut out = std::io::stdout().lock();
    let at = match &e.hook_name_out {
        Some(o) => format!("{} -> {o}", e.hook_name),
        None => e.hook_name.clone(),
    };
    writeln!(
        out,
        "{} ({}, d_in {}, d_sae {}) at {at}",
        r.dict.display(),
        e.architecture,
        e.d_in,
        e.d_sae
    )?;
    let t = &e.token_stats;
    writeln!(
        out,
        "{} on {}: {} contexts x {} tokens; {} positions evaluated, {} for the loss\n",
        r.model, r.data, t.contexts, t.context_size, t.tokens_evaluated, t.ce_positions
    )?;
    let (q, s, sp, m, b) = (
        &e.reconstruction_quality,
        &e.shrinkage,
        &e.sparsity,
        &e.model_performance_preservation,
        &e.model_behavior_preservation,
    );
    let mut groups: Vec<(&str, Vec<(&str, f64)>)> = vec![
        (
            "reconstruction_quality",
            vec![
                ("explained_variance", q.explained_variance),
                ("explained_variance_legacy", q.explained_variance_legacy),
                ("mse", q.mse),
                ("cossim", q.cossim),
            ],
        ),
        (
            "shrinkage",
            vec![
                ("l2_norm_in", s.l2_norm_in),
                ("l2_norm_out", s.l2_norm_out),
                ("l2_ratio", s.l2_ratio),
                (
                    "relative_reconstruction_bias",
                    s.relative_reconstruction_bias,
                ),
            ],
        ),
        ("sparsity", vec![("l0", sp.l0), ("l1", sp.l1)]),
        (
            "model_performance_preservation",
            vec![
                ("ce_loss_without_sae", m.ce_loss_without_sae),
                ("ce_loss_with_sae", m.ce_loss_with_sae),
                ("ce_loss_with_ablation", m.ce_loss_with_ablation),
                ("ce_loss_score", m.ce_loss_score),
            ],
        ),
        (
            "model_behavior_preservation",
            vec![
                ("kl_div_with_sae", b.kl_div_with_sae),
                ("kl_div_with_ablation", b.kl_div_with_ablation),
                ("kl_div_score", b.kl_div_score),
            ],
        ),
    ];
    if let Some(v) = m.ce_loss_with_error_term {
        groups[3].1.push(("ce_loss_with_error_term", v));
    }
    for (group, rows) in groups {
        writeln!(out, "{group}")?;
        for (name, v) in rows {
            writeln!(out, "  {name:<30} {:>12}", num(v))?;
        }
    }
    let f = &e.features;
    writeln!(
        out,
        "features\n  dead (never fired)             {:>12}\n  dense (> {:.0}% of tokens)        {:>12}",
        format!("{} / {}", f.dead, e.d_sae),
        f.dense_threshold * 100.0,
        f.dense
    )?;
    writeln!(out, "  log10 feature density of the latents that fired:")?;
    let h = &f.log10_density_histogram;
    let max = h.counts.iter().copied().max().unwrap_or(0).max(1);
    for (i, &c) in h.counts.iter().enumerate() {
        let bar = "#".repeat((c * 40).div_ceil(max) as usize);
        writeln!(
            out,
            "  [{:>6.2}, {:>6.2}) {c:>7} {bar}",
            h.edges[i],
            h.edges[i + 1]
        )?;
    }
    Ok(out.flush()?)
}
