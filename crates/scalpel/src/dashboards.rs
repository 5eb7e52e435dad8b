//! `scalpel dashboards`: feature dashboards for every latent of one or more dictionaries, in one
//! streaming pass over an activation store or a corpus run through the model, kept in a SQLite
//! database; `scalpel dashboards export` writes Neuronpedia batch files or HTML pages from it.
//!
//! The pass checkpoints next to the database (`DB.ckpt`) and resumes from it when run again with
//! the same inputs.

use std::cell::Cell;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use candle_core::Tensor;
use scalpel_core::HookPoint;
use scalpel_data::packing::{self, Packer, PackingConfig};
use scalpel_data::store::StoreReader;
use scalpel_data::{corpus, harvest};
use scalpel_dict::Sae;
use scalpel_models::loader::LoadedModel;
use scalpel_web::dashboards::compute::{self, Chunk, DictSource, Options, Run, Unembed};
use scalpel_web::dashboards::{export, DashboardDb, DictInfo};
use scalpel_web::state::LoadedDict;

use crate::progress::CountBar;

/// Dashboard options (the main form computes; `export` writes files from a database).
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Sub>,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum Sub {
    /// Export a dictionary's dashboards as Neuronpedia batch files and/or HTML pages.
    Export(ExportArgs),
}

#[derive(clap::Args, Debug)]
pub struct ComputeArgs {
    /// A SAELens dictionary folder, as `PATH` or `ID=PATH` (the id defaults to the folder's
    /// name); repeat for several dictionaries (one pass over the data serves all).
    #[arg(long = "dict", value_name = "[ID=]PATH")]
    pub dicts: Vec<String>,
    /// An activation store (`scalpel harvest --out`) holding the dictionaries' hooks, or a corpus
    /// (as `scalpel harvest --data`: a file, a folder, `demo`...) to run through the model.
    #[arg(long)]
    pub data: Option<String>,
    /// The dashboard database to write (created; a dictionary already there is replaced).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Model for a corpus (a store names its own model).
    #[arg(long, value_name = "SPEC")]
    pub model: Option<String>,
    /// Tokens of a corpus to use (rounded up to whole contexts); a store is used whole.
    #[arg(long)]
    pub tokens: Option<u64>,
    /// Tokens per context of a corpus.
    #[arg(long, default_value_t = 128)]
    pub context_size: usize,
    /// JSONL key or Parquet column holding a corpus's text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Top-activating contexts kept per latent.
    #[arg(long, default_value_t = 20)]
    pub top_k: usize,
    /// Tokens shown before the peak token of a context.
    #[arg(long, default_value_t = 16)]
    pub before: usize,
    /// Tokens shown after the peak token of a context.
    #[arg(long, default_value_t = 4)]
    pub after: usize,
    /// Equal-width activation bands of the quantile samples.
    #[arg(long, default_value_t = 10)]
    pub bands: usize,
    /// Contexts shown per band.
    #[arg(long, default_value_t = 5)]
    pub per_band: usize,
    /// Firings kept per latent in the reservoir the bands are sampled from.
    #[arg(long, default_value_t = 50)]
    pub reservoir: usize,
    /// Contexts encoded at once.
    #[arg(long, default_value_t = 8)]
    pub batch_contexts: usize,
    /// Write the checkpoint every this many shards (store) or chunks of 64 contexts (corpus).
    #[arg(long, default_value_t = 16)]
    pub checkpoint_every: usize,
    /// Logit effects straight through the unembedding, without folding in the final
    /// normaliser's weight (folded in by default, as TransformerLens's `W_U` that SAEDashboard
    /// reads).
    #[arg(long)]
    pub no_final_norm: bool,
    /// Threads scanning latents (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Stop after this many shards or chunks, leaving the checkpoint (for testing resumes).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The dashboard database.
    #[arg(long)]
    pub db: PathBuf,
    /// The dictionary id in the database.
    #[arg(long)]
    pub dict: String,
    /// Write Neuronpedia batch files (`features/` and `activations/batch-N.jsonl.gz`) here.
    #[arg(long)]
    pub neuronpedia: Option<PathBuf>,
    /// Write one self-contained HTML page per latent here.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Neuronpedia source id (its `layer` field); default `{layer}-{dict id}`.
    #[arg(long)]
    pub source: Option<String>,
    /// Latents per Neuronpedia batch file.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
}

pub fn run(args: Args, json: bool) -> Result<()> {
    match args.command {
        Some(Sub::Export(e)) => run_export(e, json),
        None => run_compute(args.compute, json),
    }
}

fn run_export(args: ExportArgs, json: bool) -> Result<()> {
    if args.neuronpedia.is_none() && args.html.is_none() {
        bail!("nothing to export: give --neuronpedia DIR and/or --html DIR");
    }
    let db = DashboardDb::open(&args.db)?;
    let mut summary = serde_json::Map::new();
    if let Some(dir) = &args.neuronpedia {
        let s = export::neuronpedia(
            &db,
            &args.dict,
            dir,
            args.source.as_deref(),
            args.batch_size,
        )?;
        summary.insert("neuronpedia".into(), serde_json::to_value(&s)?);
    }
    if let Some(dir) = &args.html {
        let s = export::html(&db, &args.dict, dir)?;
        summary.insert("html".into(), serde_json::to_value(&s)?);
    }
    if json {
        return crate::output::print_json(&summary);
    }
    let mut out = std::io::stdout().lock();
    for (what, s) in &summary {
        writeln!(
            out,
            "{what}: {} latents, {} files",
            s["latents"], s["files"]
        )?;
    }
    Ok(out.flush()?)
}

fn run_compute(args: ComputeArgs, json: bool) -> Result<()> {
    if args.dicts.is_empty() {
        bail!("give at least one --dict (a SAELens dictionary folder)");
    }
    let Some(data) = args.data.clone() else {
        bail!("--data is required: an activation store or a corpus");
    };
    let Some(out) = args.out.clone() else {
        bail!("--out is required: the dashboard database to write");
    };
    let opts = Options {
        top_k: args.top_k,
        before: args.before,
        after: args.after,
        n_bands: args.bands,
        per_band: args.per_band,
        reservoir: args.reservoir,
        batch_contexts: args.batch_contexts,
        threads: args.threads,
        ..Options::default()
    };
    opts.check()?;
    let store_dir = Path::new(&data);
    let store = if store_dir.join("manifest.json").is_file() {
        Some(StoreReader::open(store_dir).with_context(|| format!("--data {data}"))?)
    } else {
        None
    };
    let model_spec = match (&store, &args.model) {
        (Some(s), Some(m)) if *m != s.manifest().meta.model => {
            bail!(
                "--model {m}: the store was made by `{}`",
                s.manifest().meta.model
            )
        }
        (Some(s), _) => s.manifest().meta.model.clone(),
        (None, m) => m.clone().unwrap_or_else(|| "smollm2-135m".into()),
    };
    let lm = crate::model::ModelArgs {
        model: model_spec.clone(),
    }
    .load()?;
    let tokenizer = lm.tokenizer()?;
    let dicts = crate::serve::load_dicts(&args.dicts, &lm.model)?;
    let ckpt = checkpoint_path(&out);
    let start = Instant::now();
    let saes: Vec<&Sae> = dicts.iter().map(|d| &d.sae).collect();
    let d_saes: Vec<usize> = dicts.iter().map(|d| d.sae.cfg.d_sae).collect();

    let run = match &store {
        Some(reader) => {
            reader.check_model(&crate::harvest::model_fingerprint(&lm)?)?;
            let manifest = serde_json::to_string(reader.manifest())?;
            let fp = compute::fingerprint(&manifest, &saes)?;
            let mut run = Run::start(&d_saes, &opts, &ckpt, &fp)?;
            let sources: Vec<DictSource> = dicts
                .iter()
                .map(|d| DictSource {
                    sae: &d.sae,
                    hook: d.hook.to_string(),
                })
                .collect();
            let cs = reader.manifest().meta.context_size as u64;
            let total = reader.n_rows() as u64;
            let bar = CountBar::start(
                total,
                run.contexts_done() * cs,
                "dashboards".into(),
                "tokens",
            );
            compute::run_store(
                &mut run,
                reader,
                &sources,
                args.checkpoint_every,
                args.stop_after,
                &mut |n| bar.inc(n),
            )?;
            if run.contexts_done() < reader.manifest().n_contexts() as u64 {
                return stopped(&ckpt, run.contexts_done(), json);
            }
            run
        }
        None => {
            let Some(tokens) = args.tokens else {
                bail!(
                    "--data {data}: not an activation store (no manifest.json there); to run a \
                     corpus through the model, give --tokens"
                );
            };
            let run = corpus_pass(&args, &data, tokens, &lm, &dicts, &opts, &ckpt)?;
            let n_contexts = tokens.div_ceil(args.context_size as u64);
            if args.stop_after.is_some() && run.contexts_done() < n_contexts {
                return stopped(&ckpt, run.contexts_done(), json);
            }
            run.save()?;
            run
        }
    };
    let pass_secs = start.elapsed().as_secs_f64();

    // Logit effects, similar latents, and the database.
    let db = DashboardDb::create(&out)?;
    let norm = if args.no_final_norm {
        None
    } else {
        lm.model.ln_final().map(|n| &n.w)
    };
    let unembed = Unembed {
        w_u_rows: lm.model.w_u_rows(),
        norm_weight: norm,
    };
    let token_text = |ids: &[u32]| tokenizer.token_strings(ids);
    let total: u64 = d_saes.iter().map(|&d| d as u64).sum();
    let bar = CountBar::start(total, 0, "writing".into(), "latents");
    let mut per_dict = Vec::new();
    for (d, pass) in dicts.iter().zip(&run.passes) {
        let info = DictInfo {
            id: d.id.clone(),
            hook: d.hook.to_string(),
            layer: d.hook.layer().unwrap_or(0),
            d_in: d.sae.cfg.d_in,
            d_sae: d.sae.cfg.d_sae,
            architecture: d.sae.cfg.architecture.name().to_string(),
            model: model_spec.clone(),
            n_tokens: pass.n_tokens(),
        };
        compute::store_dashboards(
            &db,
            &info,
            pass,
            &d.sae,
            Some(&unembed),
            &token_text,
            512,
            &mut |n| bar.inc(n),
        )?;
        per_dict.push(serde_json::json!({
            "id": info.id, "hook": info.hook, "d_sae": info.d_sae, "tokens": info.n_tokens,
        }));
    }
    drop(bar);
    run.remove_checkpoint()?;
    let secs = start.elapsed().as_secs_f64();
    let n_tokens = run.passes.first().map_or(0, |p| p.n_tokens());
    let summary = serde_json::json!({
        "out": out,
        "dictionaries": per_dict,
        "tokens": n_tokens,
        "pass_seconds": round2(pass_secs),
        "seconds": round2(secs),
        "tokens_per_second": (n_tokens as f64 / secs.max(1e-9)).round(),
        "logit_effects_through_final_norm": norm.is_some(),
    });
    if json {
        return crate::output::print_json(&summary);
    }
    let mut o = std::io::stdout().lock();
    writeln!(
        o,
        "{}: dashboards of {} dictionar{} over {n_tokens} tokens in {secs:.1} s ({} tokens/s)",
        out.display(),
        dicts.len(),
        if dicts.len() == 1 { "y" } else { "ies" },
        summary["tokens_per_second"]
    )?;
    Ok(o.flush()?)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn checkpoint_path(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".ckpt");
    out.with_file_name(name)
}

fn stopped(ckpt: &Path, contexts: u64, json: bool) -> Result<()> {
    if json {
        return crate::output::print_json(&serde_json::json!({
            "stopped": true, "contexts_done": contexts, "checkpoint": ckpt,
        }));
    }
    println!(
        "stopped after {contexts} contexts; checkpoint {}",
        ckpt.display()
    );
    Ok(())
}

/// Contexts folded into the pass at once when reading a corpus.
const CORPUS_CHUNK: usize = 64;

/// The pass over a corpus: contexts are run through the model (up to the deepest hook a
/// dictionary reads) and folded in chunks of [`CORPUS_CHUNK`] contexts.
fn corpus_pass(
    args: &ComputeArgs,
    data: &str,
    tokens: u64,
    lm: &LoadedModel,
    dicts: &[LoadedDict],
    opts: &Options,
    ckpt: &Path,
) -> Result<Run> {
    let model = &lm.model;
    let tokenizer = lm.tokenizer()?;
    crate::model::check_context_size(model, args.context_size)?;
    let packing = PackingConfig {
        context_size: args.context_size,
        exclude_special_tokens: true,
        ..PackingConfig::default()
    };
    let path = corpus::resolve(data)?;
    let n_contexts = tokens.div_ceil(args.context_size as u64) as usize;
    let saes: Vec<&Sae> = dicts.iter().map(|d| &d.sae).collect();
    let described = serde_json::json!({
        "corpus": data,
        "corpus_hash": corpus::corpus_hash(&path)?,
        "model": crate::harvest::model_fingerprint(lm)?,
        "packing": packing,
        "contexts": n_contexts,
    });
    let fp = compute::fingerprint(&described.to_string(), &saes)?;
    let d_saes: Vec<usize> = dicts.iter().map(|d| d.sae.cfg.d_sae).collect();
    let mut run = Run::start(&d_saes, opts, ckpt, &fp)?;
    let skip = run.contexts_done() as usize;
    let mut hooks: Vec<HookPoint> = dicts.iter().map(|d| d.hook).collect();
    hooks.sort_by_key(|h| h.to_string());
    hooks.dedup();
    let specials = packing::special_ids(tokenizer);
    let docs = corpus::open(&path, &args.text_field)?;
    let contexts = Packer::new(tokenizer, &packing, docs)?
        .skip(skip)
        .take(n_contexts.saturating_sub(skip));
    let cs = args.context_size;
    let bar = CountBar::start(
        (n_contexts * cs) as u64,
        (skip * cs) as u64,
        "dashboards".into(),
        "tokens",
    );
    let stop = Cell::new(false);
    let mut buf = ChunkBuf::default();
    let mut chunks = 0usize;
    harvest::harvest(
        model,
        contexts.take_while(|_| !stop.get()),
        &hooks,
        8,
        |ctx, acts| {
            if stop.get() {
                return Ok(()); // contexts already batched past the stopping point
            }
            buf.tokens.extend_from_slice(ctx);
            for (hp, t) in acts {
                buf.acts.entry(*hp).or_default().push(t.clone());
            }
            buf.contexts += 1;
            if buf.contexts == CORPUS_CHUNK {
                let mut fold = || -> Result<()> {
                    buf.fold(&mut run, dicts, cs, &specials)?;
                    chunks += 1;
                    if args.checkpoint_every > 0 && chunks.is_multiple_of(args.checkpoint_every) {
                        run.save()?;
                    }
                    Ok(())
                };
                fold().map_err(|e| scalpel_data::DataError::Input(format!("{e:#}")))?;
                if args.stop_after.is_some_and(|s| chunks >= s) {
                    stop.set(true);
                }
            }
            Ok(())
        },
        |n| bar.inc(n as u64),
    )?;
    if !stop.get() {
        buf.fold(&mut run, dicts, cs, &specials)?;
    }
    drop(bar);
    Ok(run)
}

/// Contexts run through the model and not yet folded into the pass.
#[derive(Default)]
struct ChunkBuf {
    contexts: usize,
    tokens: Vec<u32>,
    /// Per hook, one `[context_size, d]` tensor per context.
    acts: HashMap<HookPoint, Vec<Tensor>>,
}

impl ChunkBuf {
    /// Folds the buffered contexts into every dictionary's pass (special tokens excluded) and
    /// empties the buffer.
    fn fold(
        &mut self,
        run: &mut Run,
        dicts: &[LoadedDict],
        cs: usize,
        specials: &[u32],
    ) -> Result<()> {
        if self.contexts == 0 {
            return Ok(());
        }
        let keep: Vec<bool> = packing::special_positions(&self.tokens, specials)
            .into_iter()
            .map(|s| !s)
            .collect();
        let first = run.contexts_done();
        for (d, pass) in dicts.iter().zip(run.passes.iter_mut()) {
            let parts = self
                .acts
                .get(&d.hook)
                .context("internal: a dictionary's hook was not harvested")?;
            let acts = Tensor::cat(parts, 0)?; // [rows, d_in]
            let chunk = Chunk {
                first_context: first,
                context_size: cs,
                tokens: &self.tokens,
                acts: &acts,
                keep: &keep,
            };
            pass.push(&d.sae, &chunk)?;
        }
        *self = ChunkBuf::default();
        Ok(())
    }
}
