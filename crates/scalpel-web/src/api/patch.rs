//! `/api/patch`: one activation-patching sweep over a clean/corrupt prompt pair, for the
//! patching heatmap.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use scalpel_circuits::metric::Metric;
use scalpel_circuits::pairs::{self, PromptPair};
use scalpel_circuits::patching::{Direction, PatchGrid, Patcher, Sweep};
use serde::{Deserialize, Serialize};

use super::extract::{model_error, ApiJson};
use crate::state::AppState;
use crate::ApiError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchRequest {
    clean: String,
    corrupt: String,
    /// The token the clean prompt should be followed by, and the one the corrupt prompt pushes
    /// towards (one token each).
    answer: String,
    wrong: String,
    #[serde(default = "default_sweep")]
    sweep: String,
    #[serde(default = "default_method")]
    method: String,
    #[serde(default = "default_metric")]
    metric: String,
}

fn default_sweep() -> String {
    "resid_pre".into()
}
fn default_method() -> String {
    "exact".into()
}
fn default_metric() -> String {
    "logit_diff".into()
}

#[derive(Serialize)]
pub struct PatchView {
    grid: PatchGrid,
    /// One label per row (`L0`, `L1`, ...) and per column (token texts, or `H0`, `H1`, ...).
    row_labels: Vec<String>,
    col_labels: Vec<String>,
}

pub async fn patch(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<PatchRequest>,
) -> Result<Json<PatchView>, ApiError> {
    let sweep = Sweep::parse(&req.sweep).map_err(model_error)?;
    if sweep.axes().len() != 2 {
        return Err(ApiError::bad_request(format!(
            "the patching view shows two-axis sweeps; {} has axes {:?}",
            sweep.name(),
            sweep.axes()
        )));
    }
    let exact = match req.method.as_str() {
        "exact" => true,
        "attribution" => false,
        m => {
            return Err(ApiError::bad_request(format!(
                "unknown method {m:?}; methods: exact, attribution"
            )))
        }
    };
    let metric = Metric::parse(&req.metric, Some(&state.tokenizer)).map_err(model_error)?;
    let pair = PromptPair {
        clean: req.clean,
        corrupt: req.corrupt,
        answer: req.answer,
        wrong: req.wrong,
    };
    let tokens =
        pairs::tokenize(&state.tokenizer, std::slice::from_ref(&pair)).map_err(model_error)?;
    state.check_tokens(&tokens[0].clean)?;
    let view = state
        .run_model(move |s| {
            let patcher = Patcher::new(&s.model, &tokens, &metric).map_err(model_error)?;
            let grid = if exact {
                patcher
                    .exact(sweep, Direction::Denoise, |_, _| {})
                    .map_err(model_error)?
            } else {
                patcher
                    .attribution(&[sweep], Direction::Denoise)
                    .map_err(model_error)?
                    .into_iter()
                    .next()
                    .ok_or_else(|| ApiError::internal("attribution patching returned no grid"))?
            };
            let row_labels = (0..grid.shape[0]).map(|l| format!("L{l}")).collect();
            let col_labels = if sweep.by_position() {
                s.tokenizer.token_strings(&tokens[0].clean)
            } else {
                (0..grid.shape[1]).map(|h| format!("H{h}")).collect()
            };
            Ok(PatchView {
                grid,
                row_labels,
                col_labels,
            })
        })
        .await?;
    Ok(Json(view))
}
