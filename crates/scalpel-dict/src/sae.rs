//! A sparse dictionary's weights and inference, following SAELens 6.x
//! (`sae_lens/saes/{standard,topk,jumprelu,gated}_sae.py`, `transcoder.py`) operation by
//! operation, so outputs match it to float rounding.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};

use crate::{Architecture, DictConfig, DictError, NormalizeActivations, Result};

/// A sparse autoencoder or transcoder. Weights are f32, in SAELens orientation.
///
/// # Shapes
/// - `W_enc [d_in, d_sae]`, `b_enc [d_sae]` (not gated), `W_dec [d_sae, d_out]`, `b_dec [d_out]`
/// - jumprelu: `threshold [d_sae]`; gated: `b_gate`, `r_mag`, `b_mag [d_sae]`
/// - skip transcoder: `W_skip [d_out, d_in]`, applied as `x @ W_skip^T`
///
/// `d_out` is `d_in` except for transcoders.
#[derive(Debug, Clone)]
pub struct Sae {
    pub cfg: DictConfig,
    /// Every tensor by its SAELens name (`W_enc`, `b_enc`, `W_dec`, `b_dec`, `threshold`, ...).
    tensors: HashMap<String, Tensor>,
    /// `sparsity.safetensors`' `sparsity` (log10 feature density, `[d_sae]`), when present.
    pub sparsity: Option<Tensor>,
}

/// What an input normalisation must remember to be undone on the output.
#[derive(Debug, Clone)]
pub enum InputNorm {
    /// Nothing to undo.
    Identity,
    /// `constant_norm_rescale`: the input was multiplied by this `[n, 1]` coefficient.
    Scale(Tensor),
    /// `layer_norm`: the input was `(x - mu) / (std + eps)`; `mu`, `std` are `[n, 1]`.
    Standardised { mu: Tensor, std: Tensor },
}

const LN_EPS: f64 = 1e-5;

impl Sae {
    /// The tensor names and shapes an architecture needs, in SAELens's state-dict order.
    pub fn expected_tensors(cfg: &DictConfig) -> Vec<(&'static str, Vec<usize>)> {
        let (d_in, d_sae, d_out) = (cfg.d_in, cfg.d_sae, cfg.d_out());
        let mut v = vec![("W_enc", vec![d_in, d_sae])];
        match cfg.architecture {
            Architecture::Gated => {
                v.push(("b_gate", vec![d_sae]));
                v.push(("r_mag", vec![d_sae]));
                v.push(("b_mag", vec![d_sae]));
            }
            _ => v.push(("b_enc", vec![d_sae])),
        }
        v.push(("W_dec", vec![d_sae, d_out]));
        v.push(("b_dec", vec![d_out]));
        if cfg.architecture.is_jumprelu() {
            v.push(("threshold", vec![d_sae]));
        }
        if cfg.architecture.has_skip() {
            v.push(("W_skip", vec![d_out, d_in]));
        }
        v
    }

    /// Builds a dictionary from named tensors, checking that every tensor the architecture needs
    /// is there with the right shape. `source` (a file or a description) is named in errors.
    /// Tensors are converted to f32; unknown extra tensors are ignored with a warning.
    pub fn from_tensors(
        cfg: DictConfig,
        mut tensors: HashMap<String, Tensor>,
        source: &str,
    ) -> Result<Self> {
        cfg.validate(source)?;
        let mut kept = HashMap::new();
        for (name, shape) in Self::expected_tensors(&cfg) {
            let t = tensors
                .remove(name)
                .ok_or_else(|| DictError::MissingTensor {
                    source_name: source.to_string(),
                    tensor: name.to_string(),
                    architecture: cfg.architecture.name().to_string(),
                })?;
            if t.dims() != shape.as_slice() {
                let transposed =
                    t.rank() == 2 && t.dims()[0] == shape[1] && t.dims()[1] == shape[0];
                return Err(DictError::Shape {
                    source_name: source.to_string(),
                    tensor: name.to_string(),
                    expected: shape,
                    found: t.dims().to_vec(),
                    hint: if transposed {
                        " (transposed? SAELens stores W_enc as [d_in, d_sae] and W_dec as \
                         [d_sae, d_out]; sparsify and circuit-tracer store W_enc as [d_sae, d_in])"
                    } else {
                        ""
                    },
                });
            }
            kept.insert(name.to_string(), t.to_dtype(DType::F32)?);
        }
        for name in tensors.keys() {
            tracing::warn!(
                "{source}: ignoring tensor `{name}` unknown to a {} dictionary",
                cfg.architecture.name()
            );
        }
        Ok(Sae {
            cfg,
            tensors: kept,
            sparsity: None,
        })
    }

    /// A dictionary with Gaussian random weights (scale `std`) and positive thresholds, for tests
    /// and demos.
    pub fn random(cfg: DictConfig, std: f64, device: &Device) -> Result<Self> {
        let mut tensors = HashMap::new();
        for (name, shape) in Self::expected_tensors(&cfg) {
            let t = Tensor::randn(0f32, std as f32, shape, device)?;
            let t = if name == "threshold" { t.abs()? } else { t };
            tensors.insert(name.to_string(), t);
        }
        Self::from_tensors(cfg, tensors, "random")
    }

    /// The tensor called `name` (SAELens name), if this architecture has one.
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Every tensor with its SAELens name, in SAELens's order.
    pub fn named_tensors(&self) -> Vec<(&'static str, &Tensor)> {
        Self::expected_tensors(&self.cfg)
            .into_iter()
            .filter_map(|(n, _)| self.tensors.get(n).map(|t| (n, t)))
            .collect()
    }

    fn t(&self, name: &str) -> &Tensor {
        // from_tensors guarantees every expected tensor exists.
        match self.tensors.get(name) {
            Some(t) => t,
            None => panic!("internal: {name} missing from a checked dictionary"),
        }
    }

    fn check_input(&self, x: &Tensor, what: &'static str, width: usize) -> Result<()> {
        if x.rank() != 2 || x.dims()[1] != width {
            return Err(DictError::Input {
                what,
                expected: width,
                found: x.dims().to_vec(),
            });
        }
        Ok(())
    }

    /// SAELens's `run_time_activation_norm_fn_in`.
    fn normalise_in(&self, x: &Tensor) -> Result<(Tensor, InputNorm)> {
        Ok(match self.cfg.normalize_activations {
            NormalizeActivations::None | NormalizeActivations::ExpectedAverageOnlyIn => {
                (x.clone(), InputNorm::Identity)
            }
            NormalizeActivations::ConstantNormRescale => {
                // coeff = √d_in / ‖x‖  [n, 1]
                let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
                let coeff = norm.recip()?.affine((self.cfg.d_in as f64).sqrt(), 0.0)?;
                (x.broadcast_mul(&coeff)?, InputNorm::Scale(coeff))
            }
            NormalizeActivations::LayerNorm => {
                let d = x.dim(D::Minus1)?;
                let mu = x.mean_keepdim(D::Minus1)?; // [n, 1]
                let xc = x.broadcast_sub(&mu)?;
                // torch.std: unbiased (divides by d - 1).
                let std = (xc.sqr()?.sum_keepdim(D::Minus1)? / (d as f64 - 1.0))?.sqrt()?;
                let xn = xc.broadcast_div(&(&std + LN_EPS)?)?;
                (xn, InputNorm::Standardised { mu, std })
            }
        })
    }

    /// Feature activations for inputs `x [n, d_in]` -> `[n, d_sae]`.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.encode_with_norm(x)?.0)
    }

    /// [`Sae::encode`], also returning what [`Sae::decode_with_norm`] needs to undo a run-time
    /// input normalisation (`constant_norm_rescale`, `layer_norm`).
    pub fn encode_with_norm(&self, x: &Tensor) -> Result<(Tensor, InputNorm)> {
        self.check_input(x, "SAE input", self.cfg.d_in)?;
        let x = x.to_dtype(DType::F32)?;
        let (x, norm) = self.normalise_in(&x)?;
        let sae_in = if self.cfg.apply_b_dec_to_input {
            x.broadcast_sub(self.t("b_dec"))?
        } else {
            x
        };
        let w_enc = self.t("W_enc");
        let f = match self.cfg.architecture {
            Architecture::Gated => {
                // Gate decides which features fire; the magnitude path (sharing W_enc, rescaled
                // per feature by exp(r_mag)) decides how strongly.
                let gate = sae_in.matmul(w_enc)?.broadcast_add(self.t("b_gate"))?;
                let active = gate.gt(0.0)?.to_dtype(DType::F32)?;
                let w_mag = w_enc.broadcast_mul(&self.t("r_mag").exp()?)?;
                let mag = sae_in
                    .matmul(&w_mag)?
                    .broadcast_add(self.t("b_mag"))?
                    .relu()?;
                (active * mag)?
            }
            arch => {
                let pre = sae_in.matmul(w_enc)?.broadcast_add(self.t("b_enc"))?; // [n, d_sae]
                match arch {
                    a if a.is_jumprelu() => {
                        let mask = pre
                            .broadcast_gt(self.t("threshold"))?
                            .to_dtype(DType::F32)?;
                        (pre.relu()? * mask)?
                    }
                    a if a.is_topk() => {
                        let pre = if self.rescale() {
                            pre.broadcast_mul(&self.w_dec_norm()?)?
                        } else {
                            pre
                        };
                        topk_relu(&pre, self.cfg.k())?
                    }
                    _ => pre.relu()?,
                }
            }
        };
        Ok((f, norm))
    }

    fn rescale(&self) -> bool {
        self.cfg.architecture == Architecture::Topk
            && self.cfg.rescale_acts_by_decoder_norm == Some(true)
    }

    /// ‖W_dec row‖ `[d_sae]`.
    fn w_dec_norm(&self) -> Result<Tensor> {
        Ok(self.t("W_dec").sqr()?.sum(1)?.sqrt()?)
    }

    /// The reconstruction `f @ W_dec + b_dec` `[n, d_out]` from features `f [n, d_sae]`, without
    /// undoing a run-time input normalisation (identical to SAELens's `decode` when
    /// `normalize_activations` is "none" or "expected_average_only_in"), and without a skip
    /// transcoder's skip term (as SAELens's `decode`).
    pub fn decode(&self, f: &Tensor) -> Result<Tensor> {
        self.decode_with_norm(f, &InputNorm::Identity)
    }

    /// [`Sae::decode`], then undoing the input normalisation `norm` (not for transcoders, whose
    /// output lives elsewhere: SAELens does not undo it there either).
    pub fn decode_with_norm(&self, f: &Tensor, norm: &InputNorm) -> Result<Tensor> {
        self.check_input(f, "feature activations", self.cfg.d_sae)?;
        let f = f.to_dtype(DType::F32)?;
        let f = if self.rescale() {
            f.broadcast_mul(&self.w_dec_norm()?.recip()?)?
        } else {
            f
        };
        let out = f.matmul(self.t("W_dec"))?.broadcast_add(self.t("b_dec"))?;
        if self.cfg.architecture.is_transcoder() {
            return Ok(out);
        }
        Ok(match norm {
            InputNorm::Identity => out,
            InputNorm::Scale(coeff) => out.broadcast_div(coeff)?,
            InputNorm::Standardised { mu, std } => out.broadcast_mul(std)?.broadcast_add(mu)?,
        })
    }

    /// The full output for inputs `x [n, d_in]` -> `[n, d_out]`: the reconstruction (with the
    /// input normalisation undone), plus `x @ W_skip^T` for a skip transcoder.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (f, norm) = self.encode_with_norm(x)?;
        let out = self.decode_with_norm(&f, &norm)?;
        match self.tensors.get("W_skip") {
            Some(w_skip) => Ok((out + x.to_dtype(DType::F32)?.matmul(&w_skip.t()?)?)?),
            None => Ok(out),
        }
    }
}

/// Keeps the `k` largest entries of each row of `pre [n, d_sae]` (ReLU'd), zeroing the rest, as
/// SAELens's `TopK` (top-k of the pre-activations, then ReLU on the kept values).
fn topk_relu(pre: &Tensor, k: usize) -> Result<Tensor> {
    let (n, d) = pre.dims2()?;
    let rows = pre.to_vec2::<f32>()?;
    let mut out = vec![0f32; n * d];
    let mut idx: Vec<usize> = Vec::with_capacity(d);
    for (r, row) in rows.iter().enumerate() {
        idx.clear();
        idx.extend(0..d);
        // Partition so the k largest come first (NaN sorts as smallest).
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            row[b]
                .partial_cmp(&row[a])
                .unwrap_or(std::cmp::Ordering::Less)
        });
        for &i in &idx[..k] {
            out[r * d + i] = row[i].max(0.0);
        }
    }
    Ok(Tensor::from_vec(out, (n, d), pre.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_keeps_the_k_largest_relu() {
        let pre = Tensor::new(
            &[[0.5f32, -1.0, 2.0, 1.0], [-3.0, -2.0, -1.0, 0.25]],
            &Device::Cpu,
        )
        .unwrap();
        let f = topk_relu(&pre, 2).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(f, vec![vec![0.0, 0.0, 2.0, 1.0], vec![0.0, 0.0, 0.0, 0.25]]);
    }
}
