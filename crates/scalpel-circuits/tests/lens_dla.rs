//! Identities of the logit lens and of direct logit attribution on tiny random models of every
//! normaliser (LayerNorm with biases, RMSNorm with rotary and a gated MLP, none).

use candle_core::{Device, Tensor};
use scalpel_circuits::dla::direct_logit_attribution;
use scalpel_circuits::lens::logit_lens;
use scalpel_circuits::CircuitError;

mod common;
use common::models;

fn prompt() -> Tensor {
    Tensor::new(&[[3u32, 14, 15, 9, 26, 5, 35, 8]], &Device::Cpu).unwrap()
}

#[test]
fn the_last_lens_depth_is_the_models_prediction() {
    for (name, m) in models() {
        let tokens = prompt();
        let lens = logit_lens(&m, &tokens, 5, &[7, 30]).unwrap();
        assert_eq!(lens.depths, m.config().n_layers + 1);
        let logits = m
            .forward(&tokens)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (pos, row) in logits.iter().enumerate() {
            let cell = lens.cell(lens.depths - 1, pos).unwrap();
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            let prob = |t: usize| (row[t] as f64 - max).exp() / z;
            let best = (0..row.len())
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap();
            assert_eq!(cell.top[0].token as usize, best, "{name} position {pos}");
            assert!((cell.top[0].prob - prob(best)).abs() < 1e-5, "{name}");
            for t in &cell.targets {
                assert!((t.prob - prob(t.token as usize)).abs() < 1e-5, "{name}");
                let rank = row.iter().filter(|&&x| x > row[t.token as usize]).count();
                assert_eq!(t.rank, rank, "{name}");
            }
            // Probabilities of the top list are sorted and below 1.
            assert!(cell.top.windows(2).all(|w| w[0].prob >= w[1].prob));
        }
        // Earlier depths differ from the last (the blocks do something).
        let first = lens.cell(0, 3).unwrap();
        let last = lens.cell(lens.depths - 1, 3).unwrap();
        assert_ne!(first.top, last.top, "{name}");
    }
}

#[test]
fn attribution_parts_sum_to_the_logit_and_the_logit_difference() {
    for (name, m) in models() {
        let tokens = prompt();
        for pos in [0usize, 4, 7] {
            for wrong in [None, Some(21u32)] {
                let a = direct_logit_attribution(&m, &tokens, Some(pos), 7, wrong).unwrap();
                let tol = 1e-4 * (1.0 + a.logit.abs());
                assert!(
                    (a.total - a.logit).abs() <= tol,
                    "{name} position {pos} wrong {wrong:?}: parts sum to {} but the logit is {}",
                    a.total,
                    a.logit
                );
                let heads = a.parts.iter().filter(|p| p.name.contains('H')).count();
                assert_eq!(heads, m.config().n_layers * m.config().n_heads, "{name}");
                // No single part carries everything: the decomposition is not trivial.
                assert!(
                    a.parts.iter().filter(|p| p.value.abs() > 1e-6).count() > 3,
                    "{name}"
                );
            }
        }
    }
}

#[test]
fn bad_requests_are_errors() {
    let (_, m) = models().remove(0);
    let tokens = prompt();
    assert!(matches!(
        direct_logit_attribution(&m, &tokens, Some(8), 7, None),
        Err(CircuitError::Input(_))
    ));
    assert!(matches!(
        direct_logit_attribution(&m, &tokens, None, 37, None),
        Err(CircuitError::Input(_))
    ));
    assert!(matches!(
        logit_lens(&m, &tokens, 3, &[99]),
        Err(CircuitError::Input(_))
    ));
    let batch = Tensor::new(&[[1u32, 2], [3, 4]], &Device::Cpu).unwrap();
    assert!(logit_lens(&m, &batch, 3, &[]).is_err());
}

#[test]
fn head_scores_of_hand_made_patterns() {
    use scalpel_circuits::heads::{duplicate_token_scores, induction_scores, prev_token_scores};
    let half = 4;
    let p = 2 * half;
    // Head 0 looks at the earlier copy of its own token (i − half), head 1 at i − 1, head 2 at
    // the token after the earlier copy (i − half + 1); before the repeat every head looks at 0.
    let mut data = vec![0f32; 3 * p * p];
    for (h, key) in [
        (
            0usize,
            Box::new(move |i: usize| i - half) as Box<dyn Fn(usize) -> usize>,
        ),
        (1, Box::new(|i: usize| i - 1)),
        (2, Box::new(move |i: usize| i - half + 1)),
    ] {
        for i in 0..p {
            let k = if i >= half {
                key(i)
            } else if h == 1 && i > 0 {
                i - 1
            } else {
                0
            };
            data[(h * p + i) * p + k] = 1.0;
        }
    }
    let pat = Tensor::from_vec(data, (1, 3, p, p), &Device::Cpu).unwrap();
    assert_eq!(
        duplicate_token_scores(&pat, half).unwrap(),
        vec![1.0, 0.0, 0.0]
    );
    assert_eq!(induction_scores(&pat, half).unwrap(), vec![0.0, 0.0, 1.0]);
    assert_eq!(prev_token_scores(&pat).unwrap()[1], 1.0);
    assert!(duplicate_token_scores(&pat, 3).is_err());
}
