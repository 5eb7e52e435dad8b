//! Tiny random models of every normaliser, shared by the circuit tests.

#![allow(dead_code)]

use candle_core::{Device, Tensor};
use scalpel_models::config::{Act, Config, Mlp, Norm, Pos};
use scalpel_models::transformer::{Model, WeightSource};

/// Tiny models with every weight random: LayerNorm with biases, RMSNorm with rotary and a gated
/// MLP, no normaliser at all, and attention only.
pub fn models() -> Vec<(&'static str, Model)> {
    let dev = Device::Cpu;
    let gpt2ish = Config::toy(2, 16, 4, 37, 12, false);
    let mut llamaish = Config::toy(2, 16, 4, 37, 12, false);
    llamaish.norm = Norm::RmsNorm;
    llamaish.pos = Pos::Rotary {
        theta: 10_000.0,
        scaling: None,
    };
    llamaish.mlp = Some(Mlp::Gated { act: Act::Silu });
    llamaish.qkv_bias = false;
    llamaish.attn_out_bias = false;
    llamaish.mlp_bias = false;
    let mut bare = Config::toy(1, 16, 2, 37, 12, false);
    bare.norm = Norm::None;
    bare.final_norm = false;
    let attn_only = Config::toy(2, 16, 2, 37, 12, true);
    vec![
        ("LayerNorm", gpt2ish),
        ("RMSNorm", llamaish),
        ("no norm", bare),
        ("attention only", attn_only),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (n, c))| {
        // Every weight random, biases and norm weights included, so every part and the
        // normaliser's weight and bias all matter.
        let mut init = Gaussian(i as u64 + 1);
        let m = Model::load(c, &mut init, &dev).unwrap();
        (n, m)
    })
    .collect()
}

/// Normal draws for every tensor: biases N(0, 0.2²), norm weights N(0, 0.8²), matrices
/// N(0, 0.36/fan_in).
pub struct Gaussian(u64);

impl WeightSource for Gaussian {
    fn get(&mut self, name: &str, shape: &[usize], dev: &Device) -> scalpel_models::Result<Tensor> {
        use rand::{Rng, SeedableRng};
        self.0 += 1;
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.0);
        let std = if name.ends_with(".b") {
            0.2
        } else if shape.len() == 1 {
            0.8
        } else {
            0.6 / (shape[1] as f64).sqrt()
        };
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| {
                let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
                (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect();
        Ok(Tensor::from_vec(data, shape, dev)?)
    }
}
