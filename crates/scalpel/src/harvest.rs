//! `scalpel harvest`: run a model over a corpus and store activations of any hook points on disk
//! (sharded safetensors + manifest), resumable after a kill.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use scalpel_core::HookPoint;
use scalpel_data::packing::{Packer, PackingConfig, Separator};
use scalpel_data::store::{HookMeta, SeqPosSlice, StoreDType, StoreMeta, StoreWriter};
use scalpel_data::{corpus, harvest};
use scalpel_models::loader::LoadedModel;
use sha2::{Digest, Sha256};

use crate::model::ModelArgs;
use crate::progress::CountBar;

/// Harvest options.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Corpus: a .txt/.jsonl/.parquet file, a directory of them, `demo` (the built-in demo
    /// corpus, fetched once), `demo:heldout` (its held-out split) or
    /// `hf-dataset:org/name[@revision][:prefix]` (a Hugging Face dataset's parquet/jsonl files).
    #[arg(long)]
    pub data: String,
    /// Comma-separated hook points (TransformerLens names or shorthand), e.g. `resid_post.6`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub hooks: Vec<String>,
    /// Tokens to harvest (rounded up to whole contexts).
    #[arg(long)]
    pub tokens: u64,
    /// Output directory (created; an existing store from the same settings is resumed).
    #[arg(long)]
    pub out: PathBuf,
    /// JSONL key or Parquet column holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Tokens per context.
    #[arg(long, default_value_t = 128)]
    pub context_size: usize,
    /// Do not start each context with BOS.
    #[arg(long)]
    pub no_prepend_bos: bool,
    /// Token between concatenated documents: `bos`, `eos`, `none` or a token id.
    #[arg(long, default_value = "bos")]
    pub separator: String,
    /// Never mix documents in one context.
    #[arg(long)]
    pub disable_concat: bool,
    /// Positions holding special tokens (BOS, EOS, chat markers) are skipped by readers of the
    /// store (SAELens's `exclude_special_tokens`).
    #[arg(long)]
    pub exclude_special_tokens: bool,
    /// Positions of each context that readers keep, as a Python slice `start:end[:step]`
    /// (SAELens's `seqpos_slice`), e.g. `1:` to skip the BOS position.
    #[arg(long)]
    pub seqpos_slice: Option<String>,
    /// Contexts per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Contexts per shard file.
    #[arg(long, default_value_t = 64)]
    pub contexts_per_shard: usize,
    /// Storage type of activations: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

fn separator(s: &str) -> Result<Separator> {
    Ok(match s {
        "bos" => Separator::Bos,
        "eos" => Separator::Eos,
        "none" => Separator::None,
        id => {
            Separator::Id(id.parse().with_context(|| {
                format!("--separator: `{id}` is not bos, eos, none or a token id")
            })?)
        }
    })
}

fn dtype(s: &str) -> Result<StoreDType> {
    Ok(match s {
        "f32" => StoreDType::F32,
        "bf16" => StoreDType::Bf16,
        "f16" => StoreDType::F16,
        other => bail!("--dtype: `{other}` is not f32, bf16 or f16"),
    })
}

/// Identifies the weights: the config, the stored tensor list and a sample of the embedding.
pub fn model_fingerprint(lm: &LoadedModel) -> Result<String> {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(lm.model.config())?);
    for t in &lm.stored {
        h.update(format!("{}:{}:{:?};", t.name, t.dtype, t.shape));
    }
    let w_e = lm.model.w_e();
    let rows = w_e.dim(0)?;
    for r in (0..rows).step_by(97) {
        for x in w_e.get(r)?.to_vec1::<f32>()? {
            h.update(x.to_le_bytes());
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

pub fn run(args: Args, json: bool) -> Result<()> {
    if args.tokens == 0 || args.context_size == 0 || args.batch == 0 || args.contexts_per_shard == 0
    {
        bail!("--tokens, --context-size, --batch and --contexts-per-shard must be positive");
    }
    let lm = args.model.load()?;
    let model = &lm.model;
    crate::model::check_context_size(model, args.context_size)?;
    let tokenizer = lm.tokenizer()?;
    let hooks: Vec<HookPoint> = args
        .hooks
        .iter()
        .map(|h| model.hook_point(h))
        .collect::<Result<_, _>>()?;
    let hook_meta: Vec<HookMeta> = hooks
        .iter()
        .map(|&hp| {
            Ok(HookMeta {
                name: hp.to_string(),
                d: harvest::hook_width(model, hp)?,
            })
        })
        .collect::<Result<_>>()?;
    let packing = PackingConfig {
        context_size: args.context_size,
        prepend_bos: !args.no_prepend_bos,
        sequence_separator_token: separator(&args.separator)?,
        disable_concat_sequences: args.disable_concat,
        exclude_special_tokens: args.exclude_special_tokens,
    };
    let path = corpus::resolve(&args.data)?;
    let n_contexts = args.tokens.div_ceil(args.context_size as u64) as usize;
    let meta = StoreMeta {
        model: args.model.model.clone(),
        model_fingerprint: model_fingerprint(&lm)?,
        hooks: hook_meta,
        dtype: dtype(&args.dtype)?,
        context_size: args.context_size,
        contexts_per_shard: args.contexts_per_shard,
        n_tokens: (n_contexts * args.context_size) as u64,
        corpus: args.data.clone(),
        corpus_hash: corpus::corpus_hash(&path)?,
        packing: serde_json::to_value(&packing)?,
        seqpos_slice: args
            .seqpos_slice
            .as_deref()
            .map(SeqPosSlice::parse)
            .transpose()?,
        exclude_token_ids: if args.exclude_special_tokens {
            scalpel_data::packing::special_ids(tokenizer)
        } else {
            Vec::new()
        },
    };
    let mut writer = StoreWriter::create_or_resume(&args.out, meta)?;
    let skip = writer.contexts_done();
    if skip > 0 {
        tracing::info!(contexts = skip, "resuming: contexts already stored");
    }
    let docs = corpus::open(&path, &args.text_field)?;
    let contexts = Packer::new(tokenizer, &packing, docs)?
        .skip(skip)
        .take(n_contexts.saturating_sub(skip));
    let ctx_tokens = args.context_size as u64;
    let bar = CountBar::start(
        n_contexts as u64 * ctx_tokens,
        skip as u64 * ctx_tokens,
        "harvesting".into(),
        "tokens",
    );
    let names: Vec<String> = hooks.iter().map(|h| h.to_string()).collect();
    let start = Instant::now();
    let done = harvest::harvest(
        model,
        contexts,
        &hooks,
        args.batch,
        |tokens, acts| {
            let named: Vec<(&str, candle_core::Tensor)> = acts
                .iter()
                .zip(&names)
                .map(|((_, t), n)| (n.as_str(), t.clone()))
                .collect();
            writer.push(tokens, &named)
        },
        |n| bar.inc(n as u64),
    )?;
    drop(bar);
    let secs = start.elapsed().as_secs_f64();
    let manifest = writer.finish()?;
    let stored = manifest.n_contexts();
    if stored < n_contexts {
        tracing::warn!(
            stored,
            asked = n_contexts,
            "the corpus ran out before --tokens was reached"
        );
    }
    let summary = serde_json::json!({
        "out": args.out,
        "hooks": names,
        "contexts": stored,
        "tokens": stored * args.context_size,
        "shards": manifest.shards.len(),
        "tokens_this_run": done,
        "seconds": (secs * 100.0).round() / 100.0,
        "tokens_per_second": (done as f64 / secs.max(1e-9)).round(),
    });
    if json {
        return crate::output::print_json(&summary);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: {} contexts ({} tokens) of {} in {} shards; this run {} tokens in {:.1} s ({} tokens/s)",
        args.out.display(),
        stored,
        stored * args.context_size,
        names.join(", "),
        manifest.shards.len(),
        done,
        secs,
        summary["tokens_per_second"]
    )?;
    Ok(out.flush()?)
}
