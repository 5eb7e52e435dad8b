//! `scalpel train`: train sparse dictionaries (SAEs, transcoders) on an activation store or on a
//! model's activations over a corpus, from a TOML run config and/or flags; checkpoints and
//! resumes bit-exactly; writes SAELens directories.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use scalpel_dict::run::{self, DictSpec, RunConfig, TrainOverrides};
use scalpel_dict::train::Activation;

use crate::progress::CountBar;

/// Train options. Flags override the config file's fields; with no `[[dict]]` in the config,
/// `--hook` (and the other dictionary flags) make one.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A TOML run config (see `--print-config`).
    pub config: Option<PathBuf>,
    /// Print the run config (the commented template when no config or flags are given) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Activation store to train on (`scalpel harvest --out`).
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Hook the dictionary reads.
    #[arg(long)]
    pub hook: Option<String>,
    /// Hook a transcoder writes (makes the dictionary a transcoder).
    #[arg(long)]
    pub hook_out: Option<String>,
    /// Sparsity: topk, batchtopk, jumprelu or relu.
    #[arg(long, value_parser = parse_activation)]
    pub activation: Option<Activation>,
    /// Latents.
    #[arg(long)]
    pub d_sae: Option<usize>,
    /// Active latents per token (topk, batchtopk).
    #[arg(long)]
    pub k: Option<usize>,
    /// Peak learning rate (for every dictionary).
    #[arg(long)]
    pub lr: Option<f32>,
    /// Tokens to train on.
    #[arg(long)]
    pub tokens: Option<u64>,
    /// Rows per step.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Output directory (an existing checkpoint of the same run there is resumed).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Seed of the initialisation and the data order.
    #[arg(long)]
    pub seed: Option<u64>,
}

fn parse_activation(s: &str) -> Result<Activation, String> {
    Activation::parse(s).ok_or_else(|| format!("`{s}` is not topk, batchtopk, jumprelu or relu"))
}

impl Args {
    fn has_dict_flags(&self) -> bool {
        self.hook.is_some()
            || self.hook_out.is_some()
            || self.activation.is_some()
            || self.d_sae.is_some()
            || self.k.is_some()
    }

    fn has_flags(&self) -> bool {
        self.has_dict_flags()
            || self.store.is_some()
            || self.lr.is_some()
            || self.tokens.is_some()
            || self.batch.is_some()
            || self.out.is_some()
            || self.seed.is_some()
    }

    /// The config file (or the defaults) with the flags applied.
    fn config(&self) -> Result<RunConfig> {
        let mut cfg = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                RunConfig::from_toml(&text).with_context(|| format!("{}", path.display()))?
            }
            None => RunConfig::default(),
        };
        if let Some(store) = &self.store {
            cfg.data.store = Some(store.clone());
            cfg.data.model = None;
            cfg.data.corpus = None;
        }
        if let Some(v) = self.tokens {
            cfg.tokens = v;
        }
        if let Some(v) = self.batch {
            cfg.batch_size = v;
        }
        if let Some(v) = &self.out {
            cfg.out = v.clone();
        }
        if let Some(v) = self.seed {
            cfg.seed = v;
        }
        if let Some(lr) = self.lr {
            cfg.train.lr = Some(lr);
            for d in &mut cfg.dict {
                d.train.lr = None;
            }
        }
        if self.has_dict_flags() {
            if cfg.dict.is_empty() {
                let Some(hook) = &self.hook else {
                    bail!("--hook is needed to make a dictionary (the config has no [[dict]])");
                };
                cfg.dict.push(DictSpec {
                    name: hook.clone(),
                    hook: hook.clone(),
                    hook_out: None,
                    activation: Activation::TopK,
                    d_sae: 4096,
                    k: 32,
                    skip: false,
                    d_in: None,
                    train: TrainOverrides::default(),
                });
            }
            let [d] = &mut cfg.dict[..] else {
                bail!(
                    "--hook, --hook-out, --activation, --d-sae and --k apply to one dictionary; \
                     the config lists {}",
                    cfg.dict.len()
                );
            };
            if let Some(v) = &self.hook {
                d.hook = v.clone();
            }
            if let Some(v) = &self.hook_out {
                d.hook_out = Some(v.clone());
            }
            if let Some(v) = self.activation {
                d.activation = v;
            }
            if let Some(v) = self.d_sae {
                d.d_sae = v;
            }
            if let Some(v) = self.k {
                d.k = v;
            }
        }
        Ok(cfg)
    }
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let cfg = args.config()?;
    if args.print_config {
        let text = if args.config.is_none() && !args.has_flags() {
            RunConfig::default_toml().to_string()
        } else {
            cfg.to_toml()
        };
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        return Ok(out.flush()?);
    }
    let bar = CountBar::start(
        cfg.total_steps() * cfg.batch_size as u64,
        0,
        "training".into(),
        "tokens",
    );
    let mut shown = 0;
    let summary = run::train(&cfg, &mut |p| {
        // After a resume the first report also moves the bar over the checkpointed tokens.
        bar.inc(p.tokens - shown);
        shown = p.tokens;
        if p.logged {
            for (name, r) in p.dicts {
                tracing::info!(
                    "{name}: step {}/{} tokens {} ({:.0}/s) loss {:.4} mse {:.4} l0 {:.1} \
                     explained variance {:.3} dead {:.1}% lr {:.2e}",
                    p.steps,
                    p.total_steps,
                    p.tokens,
                    p.tokens_per_sec,
                    r.loss,
                    r.mse,
                    r.l0,
                    r.explained_variance,
                    100.0 * r.dead_fraction,
                    r.lr
                );
            }
        }
        if p.checkpointed {
            tracing::info!(tokens = p.tokens, "checkpoint written");
        }
        ControlFlow::Continue(())
    })?;
    drop(bar);
    if json {
        return crate::output::print_json(&summary);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "trained {} dictionar{} on {} tokens in {:.1} s ({:.0} tokens/s){}",
        summary.dicts.len(),
        if summary.dicts.len() == 1 { "y" } else { "ies" },
        summary.tokens,
        summary.seconds,
        summary.tokens_per_second,
        summary
            .resumed_from_tokens
            .map(|t| format!(", resumed at {t}"))
            .unwrap_or_default()
    )?;
    for d in &summary.dicts {
        let stats = d.last.as_ref().map_or(String::new(), |r| {
            format!(
                "mse {:.4}, l0 {:.1}, explained variance {:.3}",
                r.mse, r.l0, r.explained_variance
            )
        });
        writeln!(
            out,
            "  {} ({}, d_sae {}, {}{}): {stats}; {} latents never fired on the sample",
            d.dir.display(),
            d.architecture,
            d.d_sae,
            d.hook_name,
            d.hook_name_out
                .as_ref()
                .map(|h| format!(" -> {h}"))
                .unwrap_or_default(),
            d.dead_on_sample
        )?;
    }
    Ok(out.flush()?)
}
