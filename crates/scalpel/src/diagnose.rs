//! `scalpel diagnose`: tell a memorising model from a generalising one from the inside. Takes
//! grokking checkpoints (or report folders, whose newest checkpoint is used) and reports, from the
//! weights and the training pairs only, how much of each model's training performance its few key
//! Fourier frequencies carry. Held-out accuracy is printed beside the verdict for checking; the
//! verdict never reads it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use scalpel_toys::diagnose::{diagnose_checkpoint, Diagnosis, GENERALISING_SCORE};
use scalpel_toys::grokking;

use crate::output::print_json;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Grokking checkpoints (`checkpoint-*.safetensors`) or `scalpel toy grokking` report
    /// folders (their newest checkpoint), two or more.
    #[arg(required = true, num_args = 1..)]
    pub models: Vec<PathBuf>,
}

fn resolve(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        for dir in [path.join("checkpoints"), path.to_path_buf()] {
            if let Some((_, newest)) = grokking::list_checkpoints(&dir)?.pop() {
                return Ok(newest);
            }
        }
        bail!("{} holds no grokking checkpoint", path.display());
    }
    bail!("{}: no such file or folder", path.display())
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let mut out: Vec<Diagnosis> = Vec::new();
    for m in &args.models {
        let path = resolve(m)?;
        out.push(
            diagnose_checkpoint(&path)
                .with_context(|| format!("cannot diagnose {}", path.display()))?,
        );
    }
    if json {
        return print_json(&out);
    }
    println!(
        "{:<10} {:>7} {:>9} {:>10} {:>10} {:>10} {:>6} {:<13} {:>9}  model",
        "verdict",
        "epoch",
        "train_acc",
        "restricted",
        "excluded",
        "top5_share",
        "score",
        "key_freqs",
        "held_out"
    );
    for d in &out {
        println!(
            "{:<10} {:>7} {:>9.3} {:>10.2e} {:>10.2e} {:>10.3} {:>6.2} {:<13} {:>9.3}  {}",
            if d.verdict == "generalising" {
                "GENERALISES"
            } else {
                "MEMORISES"
            },
            d.epoch.map_or("-".into(), |e| e.to_string()),
            d.train_acc,
            d.restricted_loss,
            d.excluded_loss,
            d.top5_share,
            d.fourier_score,
            format!("{:?}", d.key_frequencies),
            d.held_out_acc,
            d.name
        );
    }
    println!(
        "score: how much of the way from chance (ln p) to the training loss the key-frequency part \
         of the logits alone gets, on training pairs; ≥ {GENERALISING_SCORE} → generalises. \
         held_out is shown for checking and is not used."
    );
    Ok(())
}
