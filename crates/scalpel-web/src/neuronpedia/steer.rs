//! `/v1/steer/completion` and `/v1/steer/completion-chat`: the prompt continued with and without
//! steering vectors (dictionary decoder rows or given vectors) added to the residual stream.
//!
//! Each `strength × strength_multiplier × vector` is added at its hook at every position, at
//! every step of a KV-cached generation, through `scalpel_circuits::steer`. Sampling follows
//! TransformerLens's `generate` as Neuronpedia's server uses it: temperature 0 is greedy;
//! otherwise the logits are divided by the temperature, lowered by `freq_penalty` times the number
//! of times each token already occurs in the sequence (prompt included), and sampled with a
//! generator seeded by `seed` afresh for each output type, so a steering of strength 0 gives
//! exactly the default text.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use scalpel_circuits::steer::{Direction, Positions, SteeringVector};
use scalpel_core::{HookPoint, Hooks};
use scalpel_models::chat::ChatMessage;
use scalpel_models::transformer::KvCache;
use serde::{Deserialize, Serialize};

use super::{check_latent, check_model, l2_norm, source, token_texts, NpJson, OrApi};
use crate::state::AppState;
use crate::ApiError;

/// Most candidates per position `n_logprobs` may ask for (the protocol's bound).
const MAX_LOGPROBS: i64 = 10;

#[derive(Deserialize, Serialize, Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[serde(rename_all = "UPPERCASE")]
pub enum SteerType {
    Steered,
    Default,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SteerMethod {
    SimpleAdditive,
    OrthogonalDecomp,
    ProjectionCap,
}

#[derive(Deserialize)]
pub struct SteerFeature {
    model: String,
    source: String,
    index: i64,
    strength: f64,
    #[serde(default)]
    steering_vector: Option<Vec<f32>>,
}

#[derive(Deserialize)]
pub struct SteerVector {
    steering_vector: Vec<f32>,
    strength: f64,
    hook: String,
}

/// The fields both steering routes share.
#[derive(Deserialize)]
pub struct SteerOptions {
    model: String,
    steer_method: SteerMethod,
    normalize_steering: bool,
    types: Vec<SteerType>,
    #[serde(default)]
    features: Option<Vec<SteerFeature>>,
    #[serde(default)]
    vectors: Option<Vec<SteerVector>>,
    n_completion_tokens: i64,
    temperature: f64,
    strength_multiplier: f64,
    freq_penalty: f64,
    seed: f64,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    n_logprobs: Option<i64>,
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    prompt: String,
    #[serde(flatten)]
    opts: SteerOptions,
}

#[derive(Deserialize, Serialize, Clone)]
pub struct ChatTurn {
    content: String,
    role: String,
}

#[derive(Deserialize)]
pub struct ChatRequest {
    prompt: Vec<ChatTurn>,
    steer_special_tokens: bool,
    #[serde(default)]
    is_assistant_axis: Option<bool>,
    #[serde(flatten)]
    opts: SteerOptions,
}

#[derive(Serialize, Clone)]
struct LogprobTop {
    token: String,
    logprob: f64,
}

#[derive(Serialize, Clone)]
struct Logprob {
    token: String,
    logprob: f64,
    top_logprobs: Vec<LogprobTop>,
}

#[derive(Serialize)]
struct CompletionOutput {
    #[serde(rename = "type")]
    kind: SteerType,
    output: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<Vec<Logprob>>,
}

#[derive(Serialize)]
pub struct CompletionResponse {
    outputs: Vec<CompletionOutput>,
}

#[derive(Serialize)]
struct ChatResult {
    chat_template: Vec<ChatTurn>,
    raw: String,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<SteerType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<Vec<Logprob>>,
}

#[derive(Serialize)]
pub struct ChatResponse {
    outputs: Vec<ChatResult>,
    input: ChatResult,
}

/// A checked steering request.
struct Plan {
    /// Each vector with its coefficient `strength × strength_multiplier`.
    vectors: Vec<(SteeringVector, f64)>,
    types: Vec<SteerType>,
    n_new: usize,
    temperature: f64,
    freq_penalty: f64,
    seed: u64,
    n_logprobs: usize,
    stream: bool,
}

/// One generated continuation.
#[derive(Clone)]
struct Continuation {
    tokens: Vec<u32>,
    logprobs: Option<Vec<Logprob>>,
}

pub async fn completion(
    State(state): State<Arc<AppState>>,
    NpJson(req): NpJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let plan = plan(&state, &req.opts)?;
    let stream = plan.stream;
    let response = state
        .run_model(move |s| {
            let ids = s.tokenize(&req.prompt)?;
            let outputs = continue_each(s, &ids, &plan, &[Positions::All])?
                .into_iter()
                .map(|(kind, c)| {
                    Ok(CompletionOutput {
                        kind,
                        output: format!(
                            "{}{}",
                            req.prompt,
                            s.tokenizer.decode(&c.tokens, false).api()?
                        ),
                        logprobs: c.logprobs,
                    })
                })
                .collect::<Result<_, ApiError>>()?;
            Ok(CompletionResponse { outputs })
        })
        .await?;
    Ok(respond(&response, stream))
}

pub async fn completion_chat(
    State(state): State<Arc<AppState>>,
    NpJson(req): NpJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let plan = plan(&state, &req.opts)?;
    if req.is_assistant_axis == Some(true) {
        return Err(ApiError::bad_request(
            "is_assistant_axis (persona monitoring) is not supported",
        ));
    }
    if req.prompt.is_empty() {
        return Err(ApiError::bad_request("the chat `prompt` has no messages"));
    }
    let stream = plan.stream;
    let response = state
        .run_model(move |s| {
            let messages: Vec<ChatMessage> = req
                .prompt
                .iter()
                .map(|m| ChatMessage::new(&m.role, &m.content))
                .collect();
            let text = s.tokenizer.apply_chat_template(&messages, true).api()?;
            // The template writes any special tokens (BOS included) itself.
            let ids = s.tokenizer.encode(&text, false).api()?;
            s.check_tokens(&ids)?;
            let positions = if req.steer_special_tokens {
                vec![Positions::All]
            } else {
                let (_, special) = token_texts(s, &ids);
                let content: Vec<usize> = (0..ids.len()).filter(|&i| !special[i]).collect();
                let mut p = vec![Positions::Generated];
                if !content.is_empty() {
                    p.push(Positions::List(content));
                }
                p
            };
            let outputs = continue_each(s, &ids, &plan, &positions)?
                .into_iter()
                .map(|(kind, c)| {
                    let reply = s.tokenizer.decode(&c.tokens, true).api()?;
                    let mut chat_template = req.prompt.clone();
                    chat_template.push(ChatTurn {
                        content: reply,
                        role: "assistant".into(),
                    });
                    Ok(ChatResult {
                        chat_template,
                        raw: format!("{text}{}", s.tokenizer.decode(&c.tokens, false).api()?),
                        kind: Some(kind),
                        logprobs: c.logprobs,
                    })
                })
                .collect::<Result<_, ApiError>>()?;
            let input = ChatResult {
                chat_template: req.prompt,
                raw: text,
                kind: None,
                logprobs: None,
            };
            Ok(ChatResponse { outputs, input })
        })
        .await?;
    Ok(respond(&response, stream))
}

/// JSON, or with `stream` one server-sent event holding the whole result (the last, complete
/// message Neuronpedia's streaming clients read).
fn respond(value: &impl Serialize, stream: bool) -> Response {
    if !stream {
        return Json(value).into_response();
    }
    match serde_json::to_string(value) {
        Ok(json) => (
            [(header::CONTENT_TYPE, "text/event-stream")],
            Body::from(format!("data: {json}\n\n")),
        )
            .into_response(),
        Err(e) => ApiError::internal(format!("could not write the response: {e}")).into_response(),
    }
}

/// Checks every field and builds the steering vectors.
fn plan(state: &AppState, o: &SteerOptions) -> Result<Plan, ApiError> {
    check_model(state, &o.model)?;
    if o.steer_method != SteerMethod::SimpleAdditive {
        return Err(ApiError::bad_request(format!(
            "steer_method {:?} is not supported; scalpel steers with SIMPLE_ADDITIVE only",
            o.steer_method
        )));
    }
    if o.types.is_empty() {
        return Err(ApiError::bad_request(
            "`types` is empty; ask for STEERED, DEFAULT or both",
        ));
    }
    let max_new = state.limits.max_new_tokens;
    let n_new = usize::try_from(o.n_completion_tokens)
        .ok()
        .filter(|n| (1..=max_new).contains(n))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "n_completion_tokens must be in 1..={max_new}, got {}",
                o.n_completion_tokens
            ))
        })?;
    for (name, x) in [
        ("temperature", o.temperature),
        ("strength_multiplier", o.strength_multiplier),
        ("freq_penalty", o.freq_penalty),
        ("seed", o.seed),
    ] {
        if !x.is_finite() {
            return Err(ApiError::bad_request(format!(
                "{name} must be a finite number, got {x}"
            )));
        }
    }
    if o.temperature < 0.0 {
        return Err(ApiError::bad_request(format!(
            "temperature must be >= 0, got {}",
            o.temperature
        )));
    }
    let n_logprobs = o.n_logprobs.unwrap_or(0);
    if !(0..=MAX_LOGPROBS).contains(&n_logprobs) {
        return Err(ApiError::bad_request(format!(
            "n_logprobs must be in 0..={MAX_LOGPROBS}, got {n_logprobs}"
        )));
    }
    let wanted: Vec<(HookPoint, Tensor, f64)> = match (&o.features, &o.vectors) {
        (Some(features), None) => features
            .iter()
            .map(|f| {
                check_model(state, &f.model)?;
                let (_, dict) = source(state, &f.source)?;
                let index = check_latent(dict, f.index)?;
                let v = match &f.steering_vector {
                    Some(v) => Tensor::new(v.as_slice(), &Device::Cpu).api()?,
                    None => dict
                        .sae
                        .tensor("W_dec")
                        .ok_or_else(|| {
                            ApiError::bad_request(format!("`{}` has no W_dec", dict.id))
                        })?
                        .get(index)
                        .api()?,
                };
                Ok((dict.hook, v, f.strength))
            })
            .collect::<Result<_, ApiError>>()?,
        (None, Some(vectors)) => vectors
            .iter()
            .map(|v| {
                let hook = state
                    .model
                    .hook_point(&v.hook)
                    .map_err(|e| ApiError::bad_request(format!("hook `{}`: {e}", v.hook)))?;
                Ok((
                    hook,
                    Tensor::new(v.steering_vector.as_slice(), &Device::Cpu).api()?,
                    v.strength,
                ))
            })
            .collect::<Result<_, ApiError>>()?,
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of `features` and `vectors`",
            ))
        }
    };
    let mut vectors = Vec::with_capacity(wanted.len());
    for (hook, v, strength) in wanted {
        let v = v.to_dtype(DType::F32).api()?;
        let norm = l2_norm(&v)?;
        if !norm.is_finite() {
            return Err(ApiError::bad_request(
                "a steering vector holds a non-finite value",
            ));
        }
        let v = if o.normalize_steering {
            if norm == 0.0 {
                return Err(ApiError::bad_request(
                    "cannot normalise a steering vector of norm 0",
                ));
            }
            v.affine(1.0 / norm as f64, 0.0).api()?
        } else {
            v
        };
        let coef = strength * o.strength_multiplier;
        if !coef.is_finite() {
            return Err(ApiError::bad_request(format!(
                "the steering strength {coef} is not finite"
            )));
        }
        let sv = SteeringVector {
            hook,
            direction: Direction::Add(v),
        };
        sv.check(&state.model).api()?;
        vectors.push((sv, coef));
    }
    Ok(Plan {
        vectors,
        types: o.types.clone(),
        n_new,
        temperature: o.temperature,
        freq_penalty: o.freq_penalty,
        // Neuronpedia's server takes `int(seed)`; negative seeds wrap.
        seed: o.seed as i64 as u64,
        n_logprobs: n_logprobs as usize,
        stream: o.stream.unwrap_or(false),
    })
}

/// One continuation per requested type, in the request's order (each type generated once).
fn continue_each(
    state: &AppState,
    prompt: &[u32],
    plan: &Plan,
    positions: &[Positions],
) -> Result<Vec<(SteerType, Continuation)>, ApiError> {
    let mut made: HashMap<SteerType, Continuation> = HashMap::new();
    for &kind in &plan.types {
        if let std::collections::hash_map::Entry::Vacant(slot) = made.entry(kind) {
            slot.insert(generate(
                state,
                prompt,
                plan,
                kind == SteerType::Steered,
                positions,
            )?);
        }
    }
    Ok(plan
        .types
        .iter()
        .filter_map(|k| Some((*k, made.get(k)?.clone())))
        .collect())
}

/// Continues `prompt` up to `plan.n_new` tokens (stopping after an end-of-sequence token or at
/// the model's context), with the steering installed at `positions` when `steered`.
fn generate(
    state: &AppState,
    prompt: &[u32],
    plan: &Plan,
    steered: bool,
    positions: &[Positions],
) -> Result<Continuation, ApiError> {
    let model = &state.model;
    let mut hooks = Hooks::new();
    if steered {
        for (sv, coef) in &plan.vectors {
            for p in positions {
                p.check(prompt.len()).api()?;
                hooks = sv.install(hooks, *coef, p, prompt.len()).api()?;
            }
        }
    }
    let n_ctx = model.config().n_ctx;
    let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed);
    let mut counts: HashMap<u32, f64> = HashMap::new();
    for &t in prompt {
        *counts.entry(t).or_default() += 1.0;
    }
    let mut cache = KvCache::default();
    let mut input = Tensor::new(prompt, model.device())
        .api()?
        .unsqueeze(0)
        .api()?;
    let mut tokens = Vec::with_capacity(plan.n_new);
    let mut logprobs = Vec::new();
    while tokens.len() < plan.n_new {
        if cache.len() + input.dim(1).api()? > n_ctx {
            break;
        }
        let logits = model
            .forward_cached(&input, None, &mut hooks, &mut cache)
            .api()?; // [1, p, v]
        let last = logits.dim(1).api()? - 1;
        let last: Vec<f32> = logits
            .squeeze(0)
            .api()?
            .get(last)
            .api()?
            .to_dtype(DType::F32)
            .api()?
            .to_vec1()
            .api()?;
        let next = choose(&last, plan, &counts, &mut rng);
        if plan.n_logprobs > 0 {
            logprobs.push(score(state, &last, next, plan.n_logprobs));
        }
        tokens.push(next);
        *counts.entry(next).or_default() += 1.0;
        if state.tokenizer.eos_ids().contains(&next) {
            break;
        }
        input = Tensor::new(&[next], model.device())
            .api()?
            .unsqueeze(0)
            .api()?;
    }
    let logprobs = (plan.n_logprobs > 0).then_some(logprobs);
    Ok(Continuation { tokens, logprobs })
}

/// The next token from logits `[v]`: argmax at temperature 0, else a sample of
/// `softmax(logits / T − freq_penalty × count)`.
fn choose(logits: &[f32], plan: &Plan, counts: &HashMap<u32, f64>, rng: &mut impl Rng) -> u32 {
    if plan.temperature == 0.0 {
        return argmax(logits.iter().map(|&l| l as f64)) as u32;
    }
    let z: Vec<f64> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            l as f64 / plan.temperature
                - plan.freq_penalty * counts.get(&(i as u32)).copied().unwrap_or(0.0)
        })
        .collect();
    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = z.iter().map(|&x| (x - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.gen::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    argmax(z.into_iter()) as u32
}

fn argmax(values: impl Iterator<Item = f64>) -> usize {
    values
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

/// The log-probability the model gave the chosen token, and its `n` likeliest candidates (from
/// the logits before temperature and penalty).
fn score(state: &AppState, logits: &[f32], chosen: u32, n: usize) -> Logprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let lp = |i: usize| logits[i] as f64 - lse;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let n = n.min(order.len());
    order.select_nth_unstable_by(n.saturating_sub(1), |&a, &b| {
        logits[b].total_cmp(&logits[a])
    });
    order.truncate(n);
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let text = |i: u32| {
        state
            .tokenizer
            .token_strings(&[i])
            .pop()
            .unwrap_or_default()
    };
    Logprob {
        token: text(chosen),
        logprob: lp(chosen as usize),
        top_logprobs: order
            .into_iter()
            .map(|i| LogprobTop {
                token: text(i as u32),
                logprob: lp(i),
            })
            .collect(),
    }
}
