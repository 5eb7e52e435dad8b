//! The `--model` flag every subcommand shares, and loading with a spinner on stderr.

use anyhow::{Context, Result};
use candle_core::Device;
use scalpel_models::hub::DEFAULT_MODEL;
use scalpel_models::loader::{self, LoadedModel};

use crate::progress::Spinner;

/// Which model to load.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: `smollm2-135m` (the default), `hf:org/name[@revision]`, a Hugging Face directory
    /// containing config.json, or a .gguf file.
    #[arg(long, value_name = "SPEC", default_value = DEFAULT_MODEL)]
    pub model: String,
}

impl ModelArgs {
    /// Resolves and loads the model on the CPU.
    pub fn load(&self) -> Result<LoadedModel> {
        let spinner = Spinner::start(format!("loading {}", self.model));
        let start = std::time::Instant::now();
        let loaded = loader::load(&self.model, &Device::Cpu)
            .with_context(|| format!("loading model `{}`", self.model))?;
        drop(spinner);
        tracing::debug!(
            model = %self.model,
            secs = format!("{:.2}", start.elapsed().as_secs_f64()),
            "model loaded"
        );
        Ok(loaded)
    }
}

/// Refuses a `--context-size` longer than the model's context.
pub fn check_context_size(
    model: &scalpel_models::transformer::Model,
    context_size: usize,
) -> anyhow::Result<()> {
    let n_ctx = model.config().n_ctx;
    if context_size > n_ctx {
        anyhow::bail!(
            "--context-size {context_size} is longer than the model's context of {n_ctx}"
        );
    }
    Ok(())
}
