//! `scalpel convert`: rewrite a dictionary saved by another tool (sparsify, Gemma Scope,
//! circuit-tracer) or an older SAELens version as a SAELens 6.x directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use scalpel_dict::{import, saelens, Sae};

/// Convert options.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The source format: sparsify, gemma-scope, circuit-tracer or saelens.
    #[arg(long, value_parser = ["sparsify", "gemma-scope", "circuit-tracer", "saelens"])]
    pub from: String,
    /// The source: a sparsify hookpoint directory, a Gemma Scope `params.npz`, a circuit-tracer
    /// `config.yaml`, or a SAELens directory.
    pub src: PathBuf,
    /// Output directory (circuit-tracer: one `layer_N` subdirectory per layer).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The hook the dictionary reads (required for gemma-scope, whose file does not say;
    /// overrides sparsify's directory name).
    #[arg(long)]
    pub hook: Option<String>,
    /// A Gemma Scope transcoder's output hook.
    #[arg(long)]
    pub hook_out: Option<String>,
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let cpu = Device::Cpu;
    let src = args.src.as_path();
    let saes: Vec<(PathBuf, Sae)> = match args.from.as_str() {
        "sparsify" => vec![(
            args.out.clone(),
            import::sparsify(src, args.hook.as_deref(), &cpu)?,
        )],
        "gemma-scope" => {
            let Some(hook) = &args.hook else {
                bail!(
                    "--hook is required for gemma-scope (params.npz does not say where it applies)"
                );
            };
            let sae = import::gemma_scope(src, hook, args.hook_out.as_deref(), &cpu)?;
            vec![(args.out.clone(), sae)]
        }
        "circuit-tracer" => import::circuit_tracer(src, &cpu)?
            .into_iter()
            .enumerate()
            .map(|(layer, sae)| (args.out.join(format!("layer_{layer}")), sae))
            .collect(),
        _ => vec![(args.out.clone(), saelens::load(src, &cpu)?)],
    };
    let mut report = Vec::with_capacity(saes.len());
    for (dir, sae) in &saes {
        saelens::save(sae, dir).with_context(|| format!("writing {}", dir.display()))?;
        report.push(describe(dir, sae));
    }
    if json {
        return crate::output::print_json(&report);
    }
    let mut out = std::io::stdout().lock();
    for r in &report {
        writeln!(
            out,
            "{}: {} d_in {} d_sae {} at {}",
            r["dir"].as_str().unwrap_or_default(),
            r["architecture"].as_str().unwrap_or_default(),
            r["d_in"],
            r["d_sae"],
            r["hook_name"].as_str().unwrap_or("(no hook)")
        )?;
    }
    Ok(out.flush()?)
}

fn describe(dir: &Path, sae: &Sae) -> serde_json::Value {
    serde_json::json!({
        "dir": dir.display().to_string(),
        "architecture": sae.cfg.architecture.name(),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "d_out": sae.cfg.d_out,
        "hook_name": sae.cfg.metadata.hook_name,
        "hook_name_out": sae.cfg.metadata.hook_name_out,
    })
}
