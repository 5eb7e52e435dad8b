//! `scalpel store`: look at, verify and time an activation store written by `scalpel harvest`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use scalpel_data::store::StoreReader;

/// Store subcommands.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(clap::Subcommand, Debug)]
pub enum Action {
    /// Summarise a store: model, hooks, contexts, tokens, shards.
    Info {
        /// The store directory.
        dir: PathBuf,
    },
    /// Check every shard against the sha256 recorded in the manifest.
    Verify {
        /// The store directory.
        dir: PathBuf,
    },
    /// Read one epoch of shuffled batches and report the rate (GB/s of activations).
    Bench {
        /// The store directory.
        dir: PathBuf,
        /// Hook to read (default: the first one stored).
        #[arg(long)]
        hook: Option<String>,
        /// Rows per batch.
        #[arg(long, default_value_t = 4096)]
        batch: usize,
        /// Shards mixed in the shuffle buffer.
        #[arg(long, default_value_t = 4)]
        buffer_shards: usize,
        /// Shuffle seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let report = match args.action {
        Action::Info { dir } => {
            let r = StoreReader::open(&dir)?;
            let m = r.manifest();
            serde_json::json!({
                "dir": dir,
                "model": m.meta.model,
                "hooks": m.meta.hooks,
                "dtype": m.meta.dtype,
                "context_size": m.meta.context_size,
                "contexts": m.n_contexts(),
                "tokens": m.n_contexts() * m.meta.context_size,
                "planned_tokens": m.meta.n_tokens,
                "shards": m.shards.len(),
                "corpus": m.meta.corpus,
                "packing": m.meta.packing,
            })
        }
        Action::Verify { dir } => {
            let r = StoreReader::open(&dir)?;
            let t = Instant::now();
            r.verify()?;
            serde_json::json!({"dir": dir, "shards_ok": r.n_shards(), "seconds": t.elapsed().as_secs_f64()})
        }
        Action::Bench {
            dir,
            hook,
            batch,
            buffer_shards,
            seed,
        } => {
            let r = StoreReader::open(&dir)?;
            let hook = match hook {
                Some(h) => h,
                None => r
                    .manifest()
                    .meta
                    .hooks
                    .first()
                    .map(|h| h.name.clone())
                    .ok_or_else(|| anyhow::anyhow!("the store records no hooks"))?,
            };
            let t = Instant::now();
            let (mut rows, mut bytes) = (0usize, 0usize);
            for b in r.batches(&hook, batch, seed, buffer_shards)? {
                let b = b?;
                rows += b.dim(0)?;
                bytes += b.elem_count() * 4;
            }
            let secs = t.elapsed().as_secs_f64();
            serde_json::json!({
                "dir": dir, "hook": hook, "rows": rows, "gigabytes": bytes as f64 / 1e9,
                "seconds": secs, "gb_per_s": bytes as f64 / 1e9 / secs.max(1e-9),
                "rows_per_s": rows as f64 / secs.max(1e-9),
            })
        }
    };
    if json {
        return crate::output::print_json(&report);
    }
    let mut out = std::io::stdout().lock();
    if let Some(obj) = report.as_object() {
        for (k, v) in obj {
            writeln!(out, "{k:<16} {v}")?;
        }
    }
    Ok(out.flush()?)
}
