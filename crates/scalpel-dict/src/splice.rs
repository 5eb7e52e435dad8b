//! Splicing a dictionary into a forward pass: the activation at a hook point is replaced by the
//! dictionary's output, optionally plus the error term `x − x̂` (which makes the pass reproduce
//! the clean model while still exposing the features, as SAELens's `use_error_term`).
//!
//! A transcoder reads one hook and writes another: its input is read (and kept in a `RefCell`)
//! at `metadata.hook_name`, and its output replaces the activation at `metadata.hook_name_out`,
//! which the model must reach later in the same pass. With `keep_error`, the error term is the
//! true output minus the transcoder's prediction.

use std::cell::RefCell;
use std::rc::Rc;

use candle_core::Tensor;
use scalpel_core::{HookPoint, Hooks};

use crate::{DictError, Result, Sae};

/// Adds a hook that replaces the activation `[b, p, d]` at `point` with `sae`'s output
/// (reconstruction, plus the error term when `keep_error`). For a transcoder `point` is the output
/// hook and the input hook is `sae.cfg.metadata.hook_name` (resolved with [`HookPoint::parse`]).
pub fn splice<'a>(
    sae: &'a Sae,
    hooks: Hooks<'a>,
    point: HookPoint,
    keep_error: bool,
) -> Result<Hooks<'a>> {
    let input = if sae.cfg.architecture.is_transcoder() {
        let name = sae
            .cfg
            .metadata
            .hook_name
            .as_deref()
            .ok_or_else(|| DictError::Config {
                source_name: "transcoder config".into(),
                field: "metadata.hook_name".into(),
                reason: "a transcoder needs its input hook".into(),
            })?;
        HookPoint::parse(name).map_err(|source| DictError::Hook {
            field: "metadata.hook_name",
            source: Box::new(source),
        })?
    } else {
        point
    };
    Ok(splice_at(sae, hooks, input, point, keep_error))
}

/// [`splice`] with explicit hooks: reads the dictionary's input at `input` and replaces the
/// activation at `output` (the same point for an SAE).
pub fn splice_at<'a>(
    sae: &'a Sae,
    hooks: Hooks<'a>,
    input: HookPoint,
    output: HookPoint,
    keep_error: bool,
) -> Hooks<'a> {
    let seen: Rc<RefCell<Option<Tensor>>> = Rc::default();
    let hooks = if input != output {
        let seen = seen.clone();
        hooks.with_hook(input, move |x, _| {
            *seen.borrow_mut() = Some(x.clone());
            Ok(None)
        })
    } else {
        hooks
    };
    hooks.with_hook(output, move |y, ctx| {
        let x = if input == output {
            y.clone()
        } else {
            seen.borrow_mut().take().ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "transcoder input `{input}` was not seen before its output `{}`",
                    ctx.point
                ))
            })?
        };
        let out = apply(sae, &x).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let out = out.reshape(y.dims())?.to_dtype(y.dtype())?;
        if keep_error {
            // x̂ + (y − x̂), as SAELens's use_error_term.
            Ok(Some((&out + (y - &out)?)?))
        } else {
            Ok(Some(out))
        }
    })
}

/// `sae.forward` on an activation `[.., d_in]` (or `[.., n_heads, d_head]` for a "hook_z"
/// dictionary), flattened to rows: `[rows, d_out]`. The caller reshapes to the output hook's shape.
fn apply(sae: &Sae, x: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let r = dims.len();
    let d = if sae.cfg.reshape_activations == "hook_z" && r >= 2 {
        dims[r - 2] * dims[r - 1]
    } else {
        dims.last().copied().unwrap_or(1)
    };
    let rows = x.reshape((x.elem_count() / d.max(1), d))?; // [b·p, d_in]
    sae.forward(&rows) // [b·p, d_out]
}
