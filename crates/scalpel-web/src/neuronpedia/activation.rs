//! `/v1/activation/*`: latent activations of the loaded dictionaries over a prompt, as whole
//! rankings (`all`), one latent or a custom direction (`single`), every active latent of one
//! source (`source`), or the strongest latents at each token (`topk-by-token`).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use candle_core::{DType, Device, Tensor};
use scalpel_core::HookPoint;
use serde::{Deserialize, Serialize};

use super::{check_batch, check_latent, check_model, source, token_texts, NpJson, OrApi};
use crate::state::AppState;
use crate::ApiError;

/// Most latents `activation/all` returns, whatever `num_results` asks.
const MAX_ALL_RESULTS: usize = 1024;
/// `num_results` when the request leaves it out (the protocol's default).
const DEFAULT_ALL_RESULTS: i64 = 25;
/// `top_k` when the request leaves it out.
const DEFAULT_TOP_K: i64 = 5;

// ---------------------------------------------------------------- activation/all

#[derive(Deserialize)]
pub struct AllOptions {
    model: String,
    source_set: String,
    selected_sources: Vec<String>,
    sort_by_token_indexes: Vec<i64>,
    ignore_bos: bool,
    #[serde(default)]
    num_results: Option<i64>,
}

#[derive(Deserialize)]
pub struct AllRequest {
    prompt: String,
    #[serde(flatten)]
    opts: AllOptions,
}

#[derive(Deserialize)]
pub struct AllBatchRequest {
    prompts: Vec<String>,
    #[serde(flatten)]
    opts: AllOptions,
}

/// One latent's activations over the prompt.
#[derive(Serialize)]
struct LatentValues {
    source: String,
    index: usize,
    values: Vec<f32>,
    sum_values: f32,
    max_value: f32,
    max_value_index: usize,
}

#[derive(Serialize)]
pub struct AllResponse {
    activations: Vec<LatentValues>,
    tokens: Vec<String>,
}

#[derive(Serialize)]
pub struct AllBatchResponse {
    results: Vec<AllResponse>,
}

pub async fn all(
    State(state): State<Arc<AppState>>,
    NpJson(req): NpJson<AllRequest>,
) -> Result<Json<AllResponse>, ApiError> {
    let dicts = all_sources(&state, &req.opts)?;
    state
        .run_model(move |s| rank_all(s, &req.prompt, &req.opts, &dicts))
        .await
        .map(Json)
}

pub async fn all_batch(
    State(state): State<Arc<AppState>>,
    NpJson(req): NpJson<AllBatchRequest>,
) -> Result<Json<AllBatchResponse>, ApiError> {
    check_batch(&req.prompts)?;
    let dicts = all_sources(&state, &req.opts)?;
    state
        .run_model(move |s| {
            let results = req
                .prompts
                .iter()
                .map(|p| rank_all(s, p, &req.opts, &dicts))
                .collect::<Result<_, _>>()?;
            Ok(AllBatchResponse { results })
        })
        .await
        .map(Json)
}

/// The dictionaries `activation/all` reads: the selected sources (each must be loaded and of the
/// source set), or every loaded source of the set when none is selected.
fn all_sources(state: &AppState, opts: &AllOptions) -> Result<Vec<usize>, ApiError> {
    check_model(state, &opts.model)?;
    let in_set = |id: &str| set_of(id) == Some(opts.source_set.as_str());
    if opts.selected_sources.is_empty() {
        let found: Vec<usize> = (0..state.dicts.len())
            .filter(|&i| in_set(&state.dicts[i].id))
            .collect();
        if found.is_empty() {
            return Err(ApiError::not_found(format!(
                "no loaded source belongs to source set `{}` (a source `12-{0}` would)",
                opts.source_set
            )));
        }
        return Ok(found);
    }
    opts.selected_sources
        .iter()
        .map(|id| {
            let (at, _) = source(state, id)?;
            if !in_set(id) {
                return Err(ApiError::bad_request(format!(
                    "source `{id}` is not in source set `{}`",
                    opts.source_set
                )));
            }
            Ok(at)
        })
        .collect()
}

/// The source set of a source id as Neuronpedia writes them: `15-res-9k` is layer 15 of set
/// `res-9k`.
fn set_of(id: &str) -> Option<&str> {
    let (layer, set) = id.split_once('-')?;
    layer.parse::<usize>().ok().map(|_| set)
}

/// The latents of `dicts` ranked over `prompt`: by the sum of their activations at the
/// requested token indexes, or by their largest activation when none are given. Latents never
/// active on the prompt are left out, and with `ignore_bos` so are those peaking on a BOS token.
fn rank_all(
    state: &AppState,
    prompt: &str,
    opts: &AllOptions,
    dicts: &[usize],
) -> Result<AllResponse, ApiError> {
    let ids = state.tokenize(prompt)?;
    let sort_at = opts
        .sort_by_token_indexes
        .iter()
        .map(|&t| {
            usize::try_from(t)
                .ok()
                .filter(|&t| t < ids.len())
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "sort_by_token_indexes holds {t}, outside the prompt's {} tokens",
                        ids.len()
                    ))
                })
        })
        .collect::<Result<Vec<usize>, _>>()?;
    let n = match opts.num_results {
        None => DEFAULT_ALL_RESULTS,
        Some(n) if n < 0 => {
            return Err(ApiError::bad_request(format!(
                "num_results must be >= 0, got {n}"
            )))
        }
        Some(n) => n,
    };
    let n = (n as usize).min(MAX_ALL_RESULTS);
    let skip_bos = opts.ignore_bos && state.tokenizer.bos_id() == Some(ids[0]);
    let (_, acts) = state.dict_activations(&ids, dicts)?;
    let acts: Vec<Vec<Vec<f32>>> = acts
        .iter()
        .map(|a| a.to_vec2())
        .collect::<Result<_, _>>()
        .api()?;

    // (rank key, which dictionary, latent, max, argmax, sum)
    let mut ranked: Vec<(f32, usize, usize, f32, usize, f32)> = Vec::new();
    for (k, rows) in acts.iter().enumerate() {
        let d_sae = rows.first().map_or(0, Vec::len);
        let mut max = vec![f32::NEG_INFINITY; d_sae];
        let mut argmax = vec![0usize; d_sae];
        let mut sum = vec![0f32; d_sae];
        for (t, row) in rows.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                if v > max[j] {
                    max[j] = v;
                    argmax[j] = t;
                }
                if sort_at.is_empty() || sort_at.contains(&t) {
                    sum[j] += v;
                }
            }
        }
        for j in 0..d_sae {
            if max[j] <= 0.0 || (skip_bos && argmax[j] == 0) {
                continue;
            }
            let key = if sort_at.is_empty() { max[j] } else { sum[j] };
            ranked.push((key, k, j, max[j], argmax[j], sum[j]));
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    ranked.truncate(n);
    let activations = ranked
        .into_iter()
        .map(|(_, k, j, max, argmax, sum)| LatentValues {
            source: state.dicts[dicts[k]].id.clone(),
            index: j,
            values: acts[k].iter().map(|row| row[j]).collect(),
            sum_values: sum,
            max_value: max,
            max_value_index: argmax,
        })
        .collect();
    Ok(AllResponse {
        activations,
        tokens: state.tokenizer.token_strings(&ids),
    })
}

// ---------------------------------------------------------------- activation/single

#[derive(Deserialize)]
pub struct ProbeSpec {
    model: String,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    index: Option<LatentIndex>,
    #[serde(default)]
    vector: Option<Vec<f32>>,
    #[serde(default)]
    hook: Option<String>,
}

#[derive(Deserialize)]
pub struct SingleRequest {
    prompt: String,
    #[serde(flatten)]
    spec: ProbeSpec,
}

#[derive(Deserialize)]
pub struct SingleBatchRequest {
    prompts: Vec<String>,
    #[serde(flatten)]
    spec: ProbeSpec,
}

#[derive(Serialize)]
struct SingleActivation {
    values: Vec<f32>,
    max_value: f32,
    max_value_index: usize,
}

#[derive(Serialize)]
pub struct SingleResponse {
    activation: SingleActivation,
    tokens: Vec<String>,
    tokens_is_special: Vec<bool>,
}

#[derive(Serialize)]
pub struct SingleBatchResponse {
    results: Vec<SingleResponse>,
}

/// A latent index: a string in this protocol (`"42"`), a plain number also accepted.
#[derive(Deserialize)]
#[serde(untagged)]
enum LatentIndex {
    Text(String),
    Number(i64),
}

/// What `activation/single` reads at each token.
enum Probe {
    /// Latent `index` of dictionary `dict` (a position in `AppState::dicts`).
    Latent { dict: usize, index: usize },
    /// The dot product of the activation at `hook` with `vector`.
    Direction { hook: HookPoint, vector: Vec<f32> },
}

pub async fn single(
    State(state): State<Arc<AppState>>,
    NpJson(req): NpJson<SingleRequest>,
) -> Result<Json<SingleResponse>, ApiError> {
    let probe = probe(&state, req.spec)?;
    state
        .run_model(move |s| read_probe(s, &req.prompt, &probe))
        .await
        .map(Json)
}

pub async fn single_batch(
    State(state): State<Arc<AppState>>,
    NpJson(req): NpJson<SingleBatchRequest>,
) -> Result<Json<SingleBatchResponse>, ApiError> {
    check_batch(&req.prompts)?;
    let probe = probe(&state, req.spec)?;
    state
        .run_model(move |s| {
            let results = req
                .prompts
                .iter()
                .map(|p| read_probe(s, p, &probe))
                .collect::<Result<_, _>>()?;
            Ok(SingleBatchResponse { results })
        })
        .await
        .map(Json)
}

/// Checks the request names either a source and a latent, or a hook and a vector for it.
fn probe(state: &AppState, spec: ProbeSpec) -> Result<Probe, ApiError> {
    check_model(state, &spec.model)?;
    match (spec.source, spec.index, spec.vector, spec.hook) {
        (Some(src), Some(index), None, None) => {
            let (at, dict) = source(state, &src)?;
            let index: i64 = match index {
                LatentIndex::Number(i) => i,
                LatentIndex::Text(t) => t.trim().parse().map_err(|_| {
                    ApiError::bad_request(format!("index `{t}` is not a latent number"))
                })?,
            };
            Ok(Probe::Latent {
                dict: at,
                index: check_latent(dict, index)?,
            })
        }
        (None, None, Some(vector), Some(hook)) => {
            let hook = state
                .model
                .hook_point(&hook)
                .map_err(|e| ApiError::bad_request(format!("hook `{hook}`: {e}")))?;
            let width = *state.model.hook_shape(hook, 1, 1).last().unwrap_or(&0);
            if vector.len() != width {
                return Err(ApiError::bad_request(format!(
                    "the vector has {} values but {hook} has width {width}",
                    vector.len()
                )));
            }
            if vector.iter().any(|v| !v.is_finite()) {
                return Err(ApiError::bad_request("the vector holds a non-finite value"));
            }
            Ok(Probe::Direction { hook, vector })
        }
        _ => Err(ApiError::bad_request(
            "give either `source` and `index`, or `vector` and `hook` (and not both pairs)",
        )),
    }
}

fn read_probe(state: &AppState, prompt: &str, probe: &Probe) -> Result<SingleResponse, ApiError> {
    let ids = state.tokenize(prompt)?;
    let values: Vec<f32> = match probe {
        Probe::Latent { dict, index } => {
            let (_, acts) = state.dict_activations(&ids, &[*dict])?;
            acts[0]
                .narrow(1, *index, 1)
                .and_then(|a| a.flatten_all()?.to_vec1())
                .api()?
        }
        Probe::Direction { hook, vector } => {
            let input = Tensor::new(ids.as_slice(), &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .api()?;
            let (_, cache) = state.model.run_with_cache(&input, |p| p == *hook).api()?;
            let act = cache
                .get(*hook)
                .ok_or_else(|| ApiError::internal(format!("the model did not record {hook}")))?;
            let n = ids.len();
            let x = act
                .reshape((n, act.elem_count() / n))
                .and_then(|x| x.to_dtype(DType::F32)); // [p, d]
            let v = Tensor::from_slice(vector, (vector.len(), 1), &Device::Cpu); // [d, 1]
            x.and_then(|x| x.matmul(&v?)?.flatten_all()?.to_vec1())
                .api()?
        }
    };
    let (max_value_index, max_value) = arg_max(&values);
    let (tokens, tokens_is_special) = token_texts(state, &ids);
    Ok(SingleResponse {
        activation: SingleActivation {
            values,
            max_value,
            max_value_index,
        },
        tokens,
        tokens_is_special,
    })
}

/// The first position of the largest value, and the value (0, -inf for an empty slice).
fn arg_max(values: &[f32]) -> (usize, f32) {
    values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
}

// ---------------------------------------------------------------- activation/source

#[derive(Deserialize)]
pub struct SourceRequest {
    prompts: Vec<String>,
    model: String,
    source: String,
}

#[derive(Serialize)]
struct SourceResult {
    tokens: Vec<String>,
    /// Latent index → `[token index, activation]` for every token where it is above 0.
    #[serde(rename = "activeFeatures")]
    active_features: BTreeMap<String, Vec<(usize, f32)>>,
}

#[derive(Serialize)]
pub struct SourceResponse {
    results: Vec<SourceResult>,
}

pub async fn source_acts(
    State(state): State<Arc<AppState>>,
    NpJson(req): NpJson<SourceRequest>,
) -> Result<Json<SourceResponse>, ApiError> {
    check_model(&state, &req.model)?;
    check_batch(&req.prompts)?;
    let (at, _) = source(&state, &req.source)?;
    state
        .run_model(move |s| {
            let mut results = Vec::with_capacity(req.prompts.len());
            for prompt in &req.prompts {
                let ids = s.tokenize(prompt)?;
                let (_, acts) = s.dict_activations(&ids, &[at])?;
                let rows: Vec<Vec<f32>> = acts[0].to_vec2().api()?;
                let mut active: BTreeMap<usize, Vec<(usize, f32)>> = BTreeMap::new();
                for (t, row) in rows.iter().enumerate() {
                    for (j, &v) in row.iter().enumerate() {
                        if v > 0.0 {
                            active.entry(j).or_default().push((t, v));
                        }
                    }
                }
                results.push(SourceResult {
                    tokens: s.tokenizer.token_strings(&ids),
                    active_features: active
                        .into_iter()
                        .map(|(j, v)| (j.to_string(), v))
                        .collect(),
                });
            }
            Ok(SourceResponse { results })
        })
        .await
        .map(Json)
}

// ---------------------------------------------------------------- activation/topk-by-token

#[derive(Deserialize)]
pub struct TopkOptions {
    model: String,
    source: String,
    #[serde(default)]
    top_k: Option<i64>,
    ignore_bos: bool,
}

#[derive(Deserialize)]
pub struct TopkRequest {
    prompt: String,
    #[serde(flatten)]
    opts: TopkOptions,
}

#[derive(Deserialize)]
pub struct TopkBatchRequest {
    prompts: Vec<String>,
    #[serde(flatten)]
    opts: TopkOptions,
}

#[derive(Serialize)]
struct TopFeature {
    feature_index: usize,
    activation_value: f32,
}

#[derive(Serialize)]
struct TokenTopk {
    token_position: usize,
    token: String,
    is_special: bool,
    top_features: Vec<TopFeature>,
}

#[derive(Serialize)]
pub struct TopkResponse {
    results: Vec<TokenTopk>,
    tokens: Vec<String>,
}

#[derive(Serialize)]
pub struct TopkBatchResponse {
    results: Vec<TopkResponse>,
}

pub async fn topk_by_token(
    State(state): State<Arc<AppState>>,
    NpJson(req): NpJson<TopkRequest>,
) -> Result<Json<TopkResponse>, ApiError> {
    let (at, k) = topk_plan(&state, &req.opts)?;
    let skip_bos = req.opts.ignore_bos;
    state
        .run_model(move |s| topk(s, &req.prompt, at, k, skip_bos))
        .await
        .map(Json)
}

pub async fn topk_by_token_batch(
    State(state): State<Arc<AppState>>,
    NpJson(req): NpJson<TopkBatchRequest>,
) -> Result<Json<TopkBatchResponse>, ApiError> {
    check_batch(&req.prompts)?;
    let (at, k) = topk_plan(&state, &req.opts)?;
    let skip_bos = req.opts.ignore_bos;
    state
        .run_model(move |s| {
            let results = req
                .prompts
                .iter()
                .map(|p| topk(s, p, at, k, skip_bos))
                .collect::<Result<_, _>>()?;
            Ok(TopkBatchResponse { results })
        })
        .await
        .map(Json)
}

/// The dictionary (its position) and how many latents per token.
fn topk_plan(state: &AppState, opts: &TopkOptions) -> Result<(usize, usize), ApiError> {
    check_model(state, &opts.model)?;
    let (at, dict) = source(state, &opts.source)?;
    let k = opts.top_k.unwrap_or(DEFAULT_TOP_K);
    if k < 0 {
        return Err(ApiError::bad_request(format!(
            "top_k must be >= 0, got {k}"
        )));
    }
    Ok((at, (k as usize).min(dict.sae.cfg.d_sae)))
}

/// The `k` most active latents (above 0) at each token; with `ignore_bos` a leading BOS token
/// is left out of the results.
fn topk(
    state: &AppState,
    prompt: &str,
    dict: usize,
    k: usize,
    ignore_bos: bool,
) -> Result<TopkResponse, ApiError> {
    let ids = state.tokenize(prompt)?;
    let (_, acts) = state.dict_activations(&ids, &[dict])?;
    let rows: Vec<Vec<f32>> = acts[0].to_vec2().api()?;
    let (tokens, special) = token_texts(state, &ids);
    let skip_first = ignore_bos && state.tokenizer.bos_id() == Some(ids[0]);
    let results = rows
        .iter()
        .enumerate()
        .skip(usize::from(skip_first))
        .map(|(t, row)| {
            let mut order: Vec<usize> = (0..row.len()).filter(|&j| row[j] > 0.0).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            order.truncate(k);
            TokenTopk {
                token_position: t,
                token: tokens[t].clone(),
                is_special: special[t],
                top_features: order
                    .into_iter()
                    .map(|j| TopFeature {
                        feature_index: j,
                        activation_value: row[j],
                    })
                    .collect(),
            }
        })
        .collect();
    Ok(TopkResponse { results, tokens })
}
