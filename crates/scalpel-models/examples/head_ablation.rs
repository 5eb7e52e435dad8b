//! Which attention heads of one layer matter for a prediction? Zero-ablate each head's `hook_z`
//! in turn and measure the change of the correct answer's logit.
//!
//! ```sh
//! cargo run --release -p scalpel-models --example head_ablation -- [LAYER]
//! ```

use candle_core::{Device, Tensor, D};
use scalpel_core::{BlockHook, HookPoint, Hooks};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let layer: usize = std::env::args().nth(1).map_or(Ok(20), |s| s.parse())?;
    let lm = scalpel_models::loader::load("smollm2-135m", &Device::Cpu)?;
    let tok = lm.tokenizer()?;
    let ids = tok.encode("The capital of France is", false)?;
    let answer = tok.encode(" Paris", false)?[0];
    let tokens = Tensor::new(vec![ids.clone()], &Device::Cpu)?;
    let last = ids.len() - 1;
    let logit_of = |logits: &Tensor| -> candle_core::Result<f32> {
        logits
            .get(0)?
            .get(last)?
            .get(answer as usize)?
            .to_scalar::<f32>()
    };
    let clean = lm.model.forward(&tokens)?;
    let top = clean
        .get(0)?
        .get(last)?
        .argmax(D::Minus1)?
        .to_scalar::<u32>()?;
    println!(
        "clean: top prediction {:?}, logit of \" Paris\" {:.3}",
        tok.decode(&[top], false)?,
        logit_of(&clean)?
    );
    let n_heads = lm.model.config().n_heads;
    for head in 0..n_heads {
        let mut hooks =
            Hooks::new().with_hook(HookPoint::Block(layer, BlockHook::Z), move |z, _| {
                // z: [b, p, h, dh]; zero head `head` at every position.
                let h = z.dim(2)?;
                let keep: Vec<f32> = (0..h).map(|i| if i == head { 0.0 } else { 1.0 }).collect();
                let keep = Tensor::from_vec(keep, (1, 1, h, 1), z.device())?;
                Ok(Some(z.broadcast_mul(&keep)?))
            });
        let logits = lm.model.run_with_hooks(&tokens, &mut hooks)?;
        println!(
            "L{layer}H{head}: Δ logit(\" Paris\") = {:+.3}",
            logit_of(&logits)? - logit_of(&clean)?
        );
    }
    Ok(())
}
