//! `/api/steer`: the steering playground. The same prompt continued twice, without and with a
//! steering vector added to the residual stream entering a layer, streamed as NDJSON one token
//! at a time, the two streams interleaved.
//!
//! Both generations run step by step in one model job, each with its own KV cache; a token
//! line goes out as soon as it is chosen. A request that is wrong in any way is refused with a
//! 4xx before the first line; a client that goes away stops the job at its next token.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use candle_core::{Device, Tensor, D};
use rand::{Rng, SeedableRng};
use scalpel_circuits::steer::{self, Positions, SteeringVector};
use scalpel_core::{HookPoint, Hooks};
use scalpel_models::transformer::KvCache;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::extract::{check_count, model_error, ApiJson};
use crate::state::AppState;
use crate::ApiError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteerRequest {
    prompt: String,
    layer: usize,
    coefficient: f64,
    /// 32 (or the server's limit, if lower) when absent.
    max_new_tokens: Option<usize>,
    source: Source,
    /// 0: greedy.
    #[serde(default)]
    temperature: f64,
    #[serde(default)]
    seed: u64,
}

/// New tokens generated when a request does not say.
const DEFAULT_NEW_TOKENS: usize = 32;

/// Where the steering vector comes from.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// A loaded dictionary's decoder row `W_dec[latent]`.
    Latent { dict: String, latent: usize },
    /// The residual at the last token of `positive` minus that of `negative`.
    Contrast { positive: String, negative: String },
    /// A raw `[d_model]` vector.
    Vector(Vec<f32>),
}

/// A checked request, ready for the model.
struct Job {
    prompt: Vec<u32>,
    hook: HookPoint,
    coefficient: f64,
    max_new_tokens: usize,
    temperature: f64,
    seed: u64,
    source: Checked,
}

enum Checked {
    Latent {
        dict: usize,
        latent: usize,
    },
    Contrast {
        positive: Vec<u32>,
        negative: Vec<u32>,
    },
    Vector(Vec<f32>),
}

/// What the model job tells the response.
enum Event {
    /// The request was accepted; lines follow.
    Started,
    Line(Bytes),
    Failed(ApiError),
}

pub async fn steer(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<SteerRequest>,
) -> Result<Response, ApiError> {
    let job = check(&state, req)?;
    let (tx, mut rx) = mpsc::channel::<Event>(64);
    let runner = Arc::clone(&state);
    let failed = tx.clone();
    tokio::spawn(async move {
        if let Err(e) = runner.run_model(move |s| steer_job(s, job, &tx)).await {
            let _ = failed.send(Event::Failed(e)).await;
        }
    });
    // The status is decided by the first event: a refusal (503, or an error building the
    // vector) is an ordinary JSON error; after `Started` the answer is a stream.
    match rx.recv().await {
        Some(Event::Started) => {}
        Some(Event::Failed(e)) => return Err(e),
        Some(Event::Line(_)) | None => {
            return Err(ApiError::internal(
                "the steering job ended before it started",
            ))
        }
    }
    let lines = futures_util::stream::unfold(rx, |mut rx| async move {
        let bytes = match rx.recv().await? {
            Event::Line(b) => b,
            Event::Failed(e) => error_line(&e.message),
            Event::Started => return Some((Ok::<_, Infallible>(Bytes::new()), rx)),
        };
        Some((Ok(bytes), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

/// Everything about a request that can be checked without the model.
fn check(state: &AppState, req: SteerRequest) -> Result<Job, ApiError> {
    let c = state.model.config();
    let prompt = state.tokenize(&req.prompt)?;
    if req.layer >= c.n_layers {
        return Err(ApiError::bad_request(format!(
            "layer {} is out of range: the model has layers 0..={}",
            req.layer,
            c.n_layers - 1
        )));
    }
    if !req.coefficient.is_finite() {
        return Err(ApiError::bad_request(
            "`coefficient` must be a finite number",
        ));
    }
    if !(req.temperature.is_finite() && req.temperature >= 0.0) {
        return Err(ApiError::bad_request(format!(
            "`temperature` must be a finite number ≥ 0 (0 is greedy), got {}",
            req.temperature
        )));
    }
    let max_new_tokens = check_count(
        "max_new_tokens",
        req.max_new_tokens
            .unwrap_or(DEFAULT_NEW_TOKENS.min(state.limits.max_new_tokens)),
        state.limits.max_new_tokens,
    )?;
    let source = match req.source {
        Source::Latent { dict, latent } => {
            let d = state.dict_index(&dict)?;
            let cfg = &state.dicts[d].sae.cfg;
            if latent >= cfg.d_sae {
                return Err(ApiError::not_found(format!(
                    "latent {latent} is out of range: dictionary `{dict}` has latents 0..={}",
                    cfg.d_sae - 1
                )));
            }
            if cfg.architecture.is_transcoder() || cfg.d_in != c.d_model {
                return Err(ApiError::bad_request(format!(
                    "dictionary `{dict}` does not read the residual stream (width {}, model \
                     d_model {}), so its decoder rows cannot steer it",
                    cfg.d_in, c.d_model
                )));
            }
            Checked::Latent { dict: d, latent }
        }
        Source::Contrast { positive, negative } => {
            let tokens = |name: &str, text: &str| {
                state
                    .tokenize(text)
                    .map_err(|e| ApiError::new(e.status, format!("the {name} text: {}", e.message)))
            };
            Checked::Contrast {
                positive: tokens("positive", &positive)?,
                negative: tokens("negative", &negative)?,
            }
        }
        Source::Vector(v) => {
            if v.len() != c.d_model {
                return Err(ApiError::bad_request(format!(
                    "a steering vector has d_model = {} numbers, got {}",
                    c.d_model,
                    v.len()
                )));
            }
            if v.iter().any(|x| !x.is_finite()) {
                return Err(ApiError::bad_request(
                    "the steering vector has a non-finite number",
                ));
            }
            Checked::Vector(v)
        }
    };
    Ok(Job {
        prompt,
        hook: HookPoint::resid_pre(req.layer),
        coefficient: req.coefficient,
        max_new_tokens,
        temperature: req.temperature,
        seed: req.seed,
        source,
    })
}

/// One of the two generations.
struct Generation<'a> {
    stream: &'static str,
    hooks: Hooks<'a>,
    cache: KvCache,
    input: Tensor,
    tokens: Vec<u32>,
    rng: rand::rngs::StdRng,
    done: bool,
}

fn steer_job(s: &AppState, job: Job, tx: &mpsc::Sender<Event>) -> Result<(), ApiError> {
    let model = &s.model;
    let vector = match &job.source {
        Checked::Latent { dict, latent } => {
            steer::sae_decoder_row(&s.dicts[*dict].sae, *latent, 1.0, job.hook)
        }
        Checked::Contrast { positive, negative } => {
            steer::mean_difference(model, job.hook, &[(positive.clone(), negative.clone())])
        }
        Checked::Vector(v) => Tensor::new(v.as_slice(), &Device::Cpu)
            .map_err(Into::into)
            .map(|t| SteeringVector {
                hook: job.hook,
                direction: steer::Direction::Add(t),
            }),
    }
    .map_err(model_error)?;
    vector.check(model).map_err(model_error)?;
    let positions = Positions::All;
    let steered = vector
        .hooks(job.coefficient, &positions, job.prompt.len())
        .map_err(model_error)?;
    let input = Tensor::new(job.prompt.as_slice(), &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .map_err(model_error)?;
    let fresh = |stream, hooks| Generation {
        stream,
        hooks,
        cache: KvCache::default(),
        input: input.clone(),
        tokens: Vec::new(),
        rng: rand::rngs::StdRng::seed_from_u64(job.seed),
        done: false,
    };
    let mut gens = [fresh("baseline", Hooks::new()), fresh("steered", steered)];
    if tx.blocking_send(Event::Started).is_err() {
        return Ok(());
    }
    let n_ctx = model.config().n_ctx;
    let stops = s.tokenizer.eos_ids();
    for _ in 0..job.max_new_tokens {
        for g in gens.iter_mut().filter(|g| !g.done) {
            if g.cache.len() + g.input.dim(1).map_err(model_error)? > n_ctx {
                g.done = true;
                continue;
            }
            let logits = model
                .forward_cached(&g.input, None, &mut g.hooks, &mut g.cache)
                .map_err(model_error)?; // [1, p, v]
            let last = logits
                .squeeze(0)
                .and_then(|l| l.get(l.dim(0)? - 1))
                .map_err(model_error)?; // [v]
            let next = pick(&last, job.temperature, &mut g.rng).map_err(model_error)?;
            g.tokens.push(next);
            g.done = stops.contains(&next);
            g.input = Tensor::new(&[next], &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .map_err(model_error)?;
            let text = s.tokenizer.token_strings(&[next]).remove(0);
            let line = serde_json::json!({ "stream": g.stream, "id": next, "text": text });
            if tx.blocking_send(Event::Line(ndjson(&line))).is_err() {
                return Ok(()); // the client went away
            }
        }
        if gens.iter().all(|g| g.done) {
            break;
        }
    }
    let text = |g: &Generation| s.tokenizer.decode(&g.tokens, false).unwrap_or_default();
    let done = serde_json::json!({
        "done": true,
        "baseline": text(&gens[0]),
        "steered": text(&gens[1]),
    });
    let _ = tx.blocking_send(Event::Line(ndjson(&done)));
    Ok(())
}

/// The next token from logits `[v]`: the argmax at temperature 0, else a sample from
/// `softmax(logits / temperature)`.
fn pick(logits: &Tensor, temperature: f64, rng: &mut impl Rng) -> candle_core::Result<u32> {
    if temperature == 0.0 {
        return logits.argmax(D::Minus1)?.to_scalar::<u32>();
    }
    let row: Vec<f32> = logits.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let weights: Vec<f64> = row
        .iter()
        .map(|&x| ((x as f64 - max) / temperature).exp())
        .collect();
    let mut u = rng.gen::<f64>() * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return Ok(i as u32);
        }
        u -= w;
    }
    Ok(row.len().saturating_sub(1) as u32)
}

fn ndjson(v: &serde_json::Value) -> Bytes {
    let mut line = v.to_string();
    line.push('\n');
    Bytes::from(line)
}

fn error_line(message: &str) -> Bytes {
    ndjson(&serde_json::json!({ "error": message }))
}
