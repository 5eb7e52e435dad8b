//! What the server holds: the model, its tokenizer, the loaded dictionaries, the dashboard
//! database, the limits on requests, and the bounded queue in front of model work.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use scalpel_core::{ActivationCache, HookPoint};
use scalpel_dict::Sae;
use scalpel_models::tokenizer::Tokenizer;
use scalpel_models::transformer::Model;
use tokio::sync::Semaphore;

use crate::dashboards::DashboardDb;
use crate::{ApiError, Error, Result};

/// A dictionary loaded for live encoding.
pub struct LoadedDict {
    /// The id pages, the API and Neuronpedia's protocol use (e.g. `15-res-9k`).
    pub id: String,
    /// The hook it reads.
    pub hook: HookPoint,
    pub layer: usize,
    pub sae: Sae,
}

/// Bounds on what one request may ask for.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Longest prompt, in tokens.
    pub max_prompt_tokens: usize,
    /// Most tokens one generation request may ask for.
    pub max_new_tokens: usize,
    /// Model jobs run at once.
    pub workers: usize,
    /// Model jobs waiting beyond those running; further requests get 503.
    pub queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 256 * 1024,
            max_prompt_tokens: 512,
            max_new_tokens: 256,
            workers: 1,
            queue: 32,
        }
    }
}

/// The server's shared state (behind an `Arc`).
pub struct AppState {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// The model's id as pages and Neuronpedia's protocol name it (e.g. `smollm2-135m`).
    pub model_id: String,
    pub dicts: Vec<LoadedDict>,
    pub db: Option<DashboardDb>,
    pub limits: Limits,
    /// When set, Neuronpedia's routes require header `X-SECRET-KEY` with this value.
    pub secret: Option<String>,
    admitted: Semaphore,
    running: Semaphore,
}

impl AppState {
    pub fn new(
        model: Model,
        tokenizer: Tokenizer,
        model_id: impl Into<String>,
        dicts: Vec<LoadedDict>,
        db: Option<DashboardDb>,
        limits: Limits,
        secret: Option<String>,
    ) -> Arc<AppState> {
        let workers = limits.workers.max(1);
        let admitted = Semaphore::new(workers + limits.queue);
        Arc::new(AppState {
            model,
            tokenizer,
            model_id: model_id.into(),
            dicts,
            db,
            limits,
            secret,
            admitted,
            running: Semaphore::new(workers),
        })
    }

    /// Runs model work `f` on a blocking thread, behind the bounded queue: when `workers + queue`
    /// jobs are already admitted the request is refused at once with 503, never left hanging.
    pub async fn run_model<T, F>(self: &Arc<Self>, f: F) -> std::result::Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&AppState) -> std::result::Result<T, ApiError> + Send + 'static,
    {
        let _admitted = self.admitted.try_acquire().map_err(|_| ApiError::busy())?;
        let _running = self
            .running
            .acquire()
            .await
            .map_err(|_| ApiError::internal("the model queue is closed"))?;
        let state = Arc::clone(self);
        match tokio::task::spawn_blocking(move || f(&state)).await {
            Ok(r) => r,
            Err(e) => Err(ApiError::internal(format!("model job failed: {e}"))),
        }
    }

    /// The loaded dictionary with this id, or 404 naming the ids there are.
    pub fn dict(&self, id: &str) -> std::result::Result<&LoadedDict, ApiError> {
        self.dicts.iter().find(|d| d.id == id).ok_or_else(|| {
            let known: Vec<&str> = self.dicts.iter().map(|d| d.id.as_str()).collect();
            ApiError::not_found(format!(
                "no dictionary `{id}` is loaded (loaded: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ))
        })
    }

    /// Token ids of a prompt (special tokens as the model's tokenizer adds them), refusing empty
    /// prompts and prompts longer than the limit or the model's context.
    pub fn tokenize(&self, text: &str) -> std::result::Result<Vec<u32>, ApiError> {
        let ids = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ApiError::bad_request(format!("could not tokenise the prompt: {e}")))?;
        self.check_tokens(&ids)?;
        Ok(ids)
    }

    /// Refuses empty token lists, ids outside the vocabulary, and lists over the length limit.
    pub fn check_tokens(&self, ids: &[u32]) -> std::result::Result<(), ApiError> {
        if ids.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty (0 tokens)"));
        }
        let max = self.limits.max_prompt_tokens.min(self.model.config().n_ctx);
        if ids.len() > max {
            return Err(ApiError::bad_request(format!(
                "the prompt has {} tokens; at most {max} are accepted",
                ids.len()
            )));
        }
        let vocab = self.model.config().d_vocab;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::bad_request(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(())
    }

    /// One forward pass over `tokens`: the logits `[seq, d_vocab]` and, for each dictionary index
    /// in `dicts`, its latent activations `[seq, d_sae]` at its hook.
    pub fn dict_activations(
        &self,
        tokens: &[u32],
        dicts: &[usize],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let hooks = self.dict_hooks(dicts)?;
        let input = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
        let (logits, cache) = self.model.run_with_cache(&input, |p| hooks.contains(&p))?;
        let out = self.encode_cached(&cache, tokens.len(), dicts)?;
        Ok((logits.squeeze(0)?, out))
    }

    /// The hooks dictionaries `dicts` (indices into `self.dicts`) read, for a forward pass that
    /// must record them.
    pub fn dict_hooks(&self, dicts: &[usize]) -> Result<Vec<HookPoint>> {
        dicts
            .iter()
            .map(|&i| {
                self.dicts
                    .get(i)
                    .map(|d| d.hook)
                    .ok_or_else(|| Error::msg("no such dictionary"))
            })
            .collect()
    }

    /// Latent activations `[seq, d_sae]` of each dictionary in `dicts`, encoding what `cache`
    /// recorded at their hooks during a forward pass over one sequence of `seq` tokens.
    pub fn encode_cached(
        &self,
        cache: &ActivationCache,
        seq: usize,
        dicts: &[usize],
    ) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(dicts.len());
        for (&i, hook) in dicts.iter().zip(self.dict_hooks(dicts)?) {
            let act = cache
                .get(hook)
                .ok_or_else(|| Error::msg(format!("the model did not record {hook}")))?;
            let x = act
                .reshape((seq, act.elem_count() / seq.max(1)))?
                .to_dtype(DType::F32)?;
            out.push(self.dicts[i].sae.encode(&x)?);
        }
        Ok(out)
    }
}
