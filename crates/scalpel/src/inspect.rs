//! `scalpel inspect`: what a model is: its config, parameter count, files, tokenizer, and the
//! tensors as stored in the checkpoint (a dtype histogram always, every tensor with `--tensors`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use scalpel_models::config::Config;
use scalpel_models::hub::ModelFiles;
use scalpel_models::loader::StoredTensor;
use scalpel_models::tokenizer::Tokenizer;
use serde::Serialize;

use crate::model::ModelArgs;
use crate::output::print_json;

/// Options of `scalpel inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Also list every stored tensor with its dtype and shape.
    #[arg(long)]
    pub tensors: bool,
}

#[derive(Serialize)]
struct Report {
    model: String,
    /// `gguf` or `hf` (a Hugging Face directory).
    format: &'static str,
    files: Vec<FileEntry>,
    n_params: usize,
    config: Config,
    /// Null for checkpoints without a tokenizer.
    tokenizer: Option<TokenizerSummary>,
    /// Number of stored tensors per dtype.
    dtypes: BTreeMap<String, usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tensors: Option<Vec<StoredTensor>>,
}

#[derive(Serialize)]
struct FileEntry {
    path: PathBuf,
    bytes: Option<u64>,
}

#[derive(Serialize)]
struct TokenizerSummary {
    vocab_size: usize,
    bos: Option<Special>,
    eos: Vec<Special>,
    add_bos: bool,
    chat_template: bool,
}

#[derive(Serialize)]
struct Special {
    id: u32,
    text: String,
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let loaded = args.model.load()?;
    let (format, files) = match &loaded.files {
        ModelFiles::Gguf(path) => ("gguf", vec![file_entry(path)]),
        ModelFiles::HfDir(dir) => ("hf", dir_files(dir)?),
    };
    let mut dtypes = BTreeMap::new();
    for t in &loaded.stored {
        *dtypes.entry(t.dtype.clone()).or_insert(0) += 1;
    }
    let report = Report {
        model: args.model.model,
        format,
        files,
        n_params: loaded.model.n_params(),
        config: loaded.model.config().clone(),
        tokenizer: loaded.tokenizer.as_ref().map(summary),
        dtypes,
        tensors: args.tensors.then_some(loaded.stored),
    };
    if json {
        print_json(&report)
    } else {
        print_human(&report)
    }
}

fn file_entry(path: &Path) -> FileEntry {
    FileEntry {
        path: path.to_path_buf(),
        bytes: std::fs::metadata(path).ok().map(|m| m.len()),
    }
}

/// The regular files of a checkpoint directory, sorted by name.
fn dir_files(dir: &Path) -> Result<Vec<FileEntry>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths.iter().map(|p| file_entry(p)).collect())
}

fn summary(tok: &Tokenizer) -> TokenizerSummary {
    let special = |id: u32| Special {
        id,
        text: tok.token_strings(&[id]).remove(0),
    };
    TokenizerSummary {
        vocab_size: tok.vocab_size(),
        bos: tok.bos_id().map(special),
        eos: tok.eos_ids().iter().map(|&id| special(id)).collect(),
        add_bos: tok.add_bos(),
        chat_template: tok.chat_template().is_some(),
    }
}

fn print_human(r: &Report) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let c = &r.config;
    writeln!(out, "model        {} ({})", r.model, r.format)?;
    for f in &r.files {
        let size = f
            .bytes
            .map_or(String::new(), |b| format!(" ({:.1} MB)", b as f64 / 1e6));
        writeln!(out, "file         {}{size}", f.path.display())?;
    }
    writeln!(
        out,
        "parameters   {} ({:.1} M)",
        r.n_params,
        r.n_params as f64 / 1e6
    )?;
    writeln!(out, "family       {}", c.family)?;
    writeln!(
        out,
        "shape        n_layers {}  d_model {}  n_heads {}  n_kv_heads {}  d_head {}  d_mlp {}  d_vocab {}  n_ctx {}",
        c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_head, c.d_mlp, c.d_vocab, c.n_ctx
    )?;
    writeln!(out, "norm         {:?} (eps {:e})", c.norm, c.norm_eps)?;
    writeln!(out, "positions    {:?}", c.pos)?;
    writeln!(out, "mlp          {:?}", c.mlp)?;
    writeln!(
        out,
        "biases       qkv {}  attn_out {}  mlp {}",
        c.qkv_bias, c.attn_out_bias, c.mlp_bias
    )?;
    writeln!(
        out,
        "embeddings   tied {}  final_norm {}",
        c.tied_embeddings, c.final_norm
    )?;
    match &r.tokenizer {
        Some(t) => {
            let show = |s: &Special| format!("{} {:?}", s.id, s.text);
            let eos: Vec<String> = t.eos.iter().map(show).collect();
            writeln!(
                out,
                "tokenizer    vocab {}  bos {}  eos [{}]  add_bos {}  chat template {}",
                t.vocab_size,
                t.bos.as_ref().map_or("none".into(), show),
                eos.join(", "),
                t.add_bos,
                if t.chat_template { "yes" } else { "no" }
            )?;
        }
        None => writeln!(out, "tokenizer    none")?,
    }
    let hist: Vec<String> = r.dtypes.iter().map(|(d, n)| format!("{d} {n}")).collect();
    writeln!(out, "dtypes       {}", hist.join(", "))?;
    if let Some(tensors) = &r.tensors {
        let width = tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
        writeln!(out)?;
        for t in tensors {
            writeln!(out, "{:<width$}  {:<6} {:?}", t.name, t.dtype, t.shape)?;
        }
    }
    Ok(())
}
