//! Steering on the default model (SmolLM2-135M-Instruct, fetched once into the cache): coefficient
//! 0 is the identity, positions stay right across KV-cached generation steps, each source of
//! vectors computes what it says, side effects grow with the coefficient, bad input is refused.

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, D};
use scalpel_circuits::steer::{
    actadd, max_activation, mean_difference, read_contrast_pairs, sae_clamp, sae_decoder_row,
    steer_generate, sweep, target_logprob, windows, Direction, Positions, SteeringVector,
    SweepInput, HELD_OUT_TEXT,
};
use scalpel_core::{BlockHook, HookPoint, Hooks};
use scalpel_dict::{Architecture, DictConfig, Sae};
use scalpel_models::generation::{generate, GenerateOptions};
use scalpel_models::loader::{load, LoadedModel};
use scalpel_models::tokenizer::Tokenizer;
use scalpel_models::transformer::Model;

fn lm() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| load("smollm2-135m", &Device::Cpu).unwrap())
}

fn model() -> &'static Model {
    &lm().model
}

fn tok() -> &'static Tokenizer {
    lm().tokenizer().unwrap()
}

fn ids(text: &str) -> Vec<u32> {
    tok().encode(text, true).unwrap()
}

fn pad() -> u32 {
    tok().encode(" ", false).unwrap()[0]
}

/// "Love" − "Hate" at `blocks.6.hook_resid_pre` (Turner et al.'s example contrast).
fn love_hate() -> SteeringVector {
    actadd(
        model(),
        HookPoint::resid_pre(6),
        &ids("Love"),
        &ids("Hate"),
        pad(),
    )
    .unwrap()
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        ..Default::default()
    }
}

/// The residual at `hook` of `tokens`, read by a full forward pass with a cache (not the
/// library's early-stopping path).
fn cached(tokens: &[u32], hook: HookPoint) -> Tensor {
    let t = Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let (_, cache) = model().run_with_cache(&t, |h| h == hook).unwrap();
    cache.get(hook).unwrap().squeeze(0).unwrap()
}

/// The largest `|a − b|` over all elements.
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn coefficient_zero_reproduces_unsteered_generation() {
    let m = model();
    let prompt = ids("I hate you because");
    let v = love_hate();
    let pos = Positions::First(v.rows());
    let plain = generate(m, &prompt, &greedy(12), &mut Hooks::new(), |_| {}).unwrap();
    let zero = steer_generate(m, &prompt, &v, 0.0, &pos, &greedy(12)).unwrap();
    assert_eq!(zero.tokens, plain.tokens);
    // The hook is live: a real coefficient changes the text.
    let five = steer_generate(m, &prompt, &v, 5.0, &pos, &greedy(12)).unwrap();
    assert_ne!(five.tokens, plain.tokens);
}

/// In one forward pass over a 4-token prompt and 2 generated tokens, exactly the chosen positions
/// change at the hook.
#[test]
fn exactly_the_chosen_positions_are_steered() {
    let hook = HookPoint::resid_pre(2);
    let seq = ids("one two three four five six");
    assert!(seq.len() >= 6);
    let seq = &seq[..6];
    let x = cached(seq, hook);
    let v = SteeringVector {
        hook,
        direction: Direction::Add(Tensor::ones(576, DType::F32, &Device::Cpu).unwrap()),
    };
    for (positions, want) in [
        (Positions::All, vec![0, 1, 2, 3, 4, 5]),
        (Positions::Generated, vec![4, 5]),
        (Positions::First(2), vec![0, 1]),
        (Positions::List(vec![3, 0]), vec![0, 3]),
    ] {
        let mut hooks = v
            .install(Hooks::new().with_cache_points([hook]), 1.0, &positions, 4)
            .unwrap();
        let t = Tensor::new(seq, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        model().run_with_hooks(&t, &mut hooks).unwrap();
        let y = hooks.take_cache().get(hook).unwrap().squeeze(0).unwrap();
        let changed: Vec<usize> = (0..6)
            .filter(|&i| max_diff(&x.get(i).unwrap(), &y.get(i).unwrap()) > 0.5)
            .collect();
        assert_eq!(changed, want, "{positions:?}");
    }
}

/// Generation with a KV cache runs the hook once per step on the new positions only; the
/// steered generation must equal the greedy reading of one full forward pass with the same
/// steering over the prompt and the generated tokens.
#[test]
fn positions_are_right_across_cached_generation_steps() {
    let m = model();
    let prompt = ids("The weather today is");
    let p = prompt.len();
    let contrast = vec![(ids("I am very happy"), ids("I am very sad"))];
    let happy = mean_difference(m, HookPoint::resid_pre(6), &contrast).unwrap();
    let n = 6;
    let plain = generate(m, &prompt, &greedy(n), &mut Hooks::new(), |_| {})
        .unwrap()
        .tokens;
    for (positions, coef) in [
        (Positions::Generated, 6.0),
        (Positions::All, 4.0),
        (Positions::List(vec![p - 1, 1]), 8.0),
    ] {
        let gen = steer_generate(m, &prompt, &happy, coef, &positions, &greedy(n))
            .unwrap()
            .tokens;
        assert_ne!(gen, plain, "{positions:?}: steering changed nothing");
        let seq: Vec<u32> = prompt.iter().chain(&gen[..n - 1]).copied().collect();
        let t = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut hooks = happy.hooks(coef, &positions, p).unwrap();
        let logits = m
            .run_with_hooks(&t, &mut hooks)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let full: Vec<u32> = logits
            .narrow(0, p - 1, n)
            .unwrap()
            .argmax(D::Minus1)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(gen, full, "{positions:?}");
    }
}

#[test]
fn actadd_subtracts_padded_residuals_position_by_position() {
    let hook = HookPoint::Block(4, BlockHook::ResidPost);
    let (pos, neg) = (ids("Love"), ids("Hate"));
    let v = actadd(model(), hook, &pos, &neg, pad()).unwrap();
    let k = pos.len().max(neg.len());
    assert_eq!(v.rows(), k);
    let padded = |t: &[u32]| {
        let mut t = t.to_vec();
        t.resize(k, pad());
        t
    };
    let want = (cached(&padded(&pos), hook) - cached(&padded(&neg), hook)).unwrap();
    let Direction::Add(got) = &v.direction else {
        panic!("ActAdd adds")
    };
    assert!(max_diff(got, &want) < 1e-3, "{}", max_diff(got, &want));
}

#[test]
fn mean_difference_reads_the_last_tokens_of_a_jsonl() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("steer-pairs-{}.jsonl", std::process::id()));
    let lines = [
        ("The movie was wonderful", "The movie was terrible and long"),
        ("I feel great", "I feel awful"),
    ];
    let text: String = lines
        .iter()
        .map(|(p, n)| format!("{{\"positive\": {p:?}, \"negative\": {n:?}}}\n\n"))
        .collect();
    std::fs::write(&path, text).unwrap();
    let pairs = read_contrast_pairs(&path).unwrap();
    assert_eq!(pairs.len(), 2);
    let hook = HookPoint::resid_pre(8);
    let tokens: Vec<(Vec<u32>, Vec<u32>)> = pairs
        .iter()
        .map(|p| (ids(&p.positive), ids(&p.negative)))
        .collect();
    let v = mean_difference(model(), hook, &tokens).unwrap();
    let last = |t: &[u32]| cached(t, hook).get(t.len() - 1).unwrap();
    let mut want = Tensor::zeros(576, DType::F32, &Device::Cpu).unwrap();
    for (p, n) in &tokens {
        want = (want + (last(p) - last(n)).unwrap()).unwrap();
    }
    let want = (want / 2.0).unwrap();
    let Direction::Add(got) = &v.direction else {
        panic!("a mean difference adds")
    };
    assert_eq!(got.dims(), [576]);
    assert!(max_diff(got, &want) < 1e-3, "{}", max_diff(got, &want));
    std::fs::remove_file(&path).ok();
}

fn random_sae(d_sae: usize) -> Sae {
    Sae::random(
        DictConfig::new(Architecture::Standard, 576, d_sae),
        0.05,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn sae_steering_adds_the_decoder_row_or_holds_the_latent() {
    let m = model();
    let hook = HookPoint::resid_pre(3);
    let sae = random_sae(32);
    let prompt = ids("A quiet afternoon in the park");
    let p = prompt.len();
    let x = cached(&prompt, hook); // [p, d]
    let steered = |v: &SteeringVector, coef: f64, pos: &Positions| {
        let hooks = v
            .install(Hooks::new().with_cache_points([hook]), coef, pos, p)
            .unwrap();
        let mut hooks = hooks;
        let t = Tensor::new(prompt.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        m.run_with_hooks(&t, &mut hooks).unwrap();
        hooks.take_cache().get(hook).unwrap().squeeze(0).unwrap()
    };
    let (feature, max_act, coef) = (5, 3.0, 2.0);
    let w = sae.tensor("W_dec").unwrap().get(feature).unwrap(); // [d]

    // Adding: coef × max_act × W_dec[i] at every position.
    let add = sae_decoder_row(&sae, feature, max_act, hook).unwrap();
    let got = (steered(&add, coef, &Positions::All) - &x).unwrap();
    let want = w
        .affine(coef * max_act, 0.0)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .broadcast_as(got.dims())
        .unwrap()
        .contiguous()
        .unwrap();
    assert!(max_diff(&got, &want) < 1e-3);

    // Clamping at positions 1 and 3: (coef × max_act − f_i(x)) × W_dec[i] there, nothing
    // elsewhere.
    let clamp = sae_clamp(sae.clone(), feature, max_act, hook).unwrap();
    let got = (steered(&clamp, coef, &Positions::List(vec![3, 1])) - &x).unwrap();
    let f: Vec<f32> = sae
        .encode(&x)
        .unwrap()
        .narrow(1, feature, 1)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let rows: Vec<Tensor> = (0..p)
        .map(|i| {
            let scale = if i == 1 || i == 3 {
                coef * max_act - f[i] as f64
            } else {
                0.0
            };
            w.affine(scale, 0.0).unwrap()
        })
        .collect();
    let want = Tensor::stack(&rows, 0).unwrap();
    assert!(max_diff(&got, &want) < 1e-3, "{}", max_diff(&got, &want));

    // The measured maximum is the largest activation over the texts.
    let texts = vec![prompt.clone(), ids("Another sentence")];
    let measured = max_activation(m, &sae, hook, feature, &texts).unwrap();
    let second = sae.encode(&cached(&texts[1], hook)).unwrap();
    let second = second.narrow(1, feature, 1).unwrap().max_all().unwrap();
    let best = f
        .iter()
        .copied()
        .fold(second.to_scalar::<f32>().unwrap(), f32::max);
    assert!(
        (measured - best as f64).abs() < 1e-4,
        "{measured} vs {best}"
    );
}

/// Turner et al.'s contrast on SmolLM2: "Love" − "Hate" at layer 6 with coefficient 5 makes
/// " love" more likely next after "I hate you because", and more likely relative to " hate"; a
/// negative coefficient makes it less likely.
#[test]
fn love_minus_hate_raises_love() {
    let m = model();
    let prompt = ids("I hate you because");
    let v = love_hate();
    let pos = Positions::First(v.rows());
    let logp = |coef: f64, word: &str| {
        let t = tok().encode(word, false).unwrap();
        let mut hooks = v.hooks(coef, &pos, prompt.len()).unwrap();
        target_logprob(m, &mut hooks, &prompt, &t).unwrap()
    };
    let (love0, love5) = (logp(0.0, " love"), logp(5.0, " love"));
    let (hate0, hate5) = (logp(0.0, " hate"), logp(5.0, " hate"));
    assert!(love5 - love0 > 1.0, "log p(love): {love0} → {love5}");
    assert!(
        (love5 - hate5) - (love0 - hate0) > 1.0,
        "love − hate: {} → {}",
        love0 - hate0,
        love5 - hate5
    );
    assert!(logp(-5.0, " love") < love0);
}

#[test]
fn kl_is_zero_at_zero_and_grows_with_the_coefficient() {
    let m = model();
    let contrast = vec![(ids("I am very happy"), ids("I am very sad"))];
    let v = mean_difference(m, HookPoint::resid_pre(6), &contrast).unwrap();
    let text = tok().encode(HELD_OUT_TEXT, false).unwrap();
    let heldout: Vec<Vec<u32>> = windows(&text, 48, None)
        .unwrap()
        .into_iter()
        .take(2)
        .collect();
    let prompt = ids("The weather today is");
    let target = tok().encode(" sunny", false).unwrap();
    let input = SweepInput {
        prompt: &prompt,
        target: Some(&target),
        generate: Some(greedy(4)),
        heldout: &heldout,
    };
    let coefs = [-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0];
    let mut steps = 0;
    let s = sweep(m, &v, &Positions::All, &coefs, &input, || steps += 1).unwrap();
    assert_eq!(steps, input.steps(coefs.len()));
    assert_eq!(s.heldout_tokens, 96);
    let kl: Vec<f64> = s.points.iter().map(|p| p.kl).collect();
    assert!(kl.iter().all(|&k| k >= 0.0), "{kl:?}");
    let zero = &s.points[3];
    assert_eq!(zero.kl, 0.0);
    assert_eq!(zero.loss, s.unsteered.loss);
    assert_eq!(zero.target_logprob, s.unsteered.target_logprob);
    assert_eq!(zero.tokens, s.unsteered.tokens);
    assert!(kl[0] > kl[1] && kl[1] > kl[2] && kl[2] > 0.0, "{kl:?}");
    assert!(kl[6] > kl[5] && kl[5] > kl[4] && kl[4] > 0.0, "{kl:?}");
    assert!(s.points[6].loss > s.unsteered.loss);
}

/// The error message of a call that must fail.
fn err<T>(r: scalpel_circuits::Result<T>) -> String {
    match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_input_is_refused_with_the_reason() {
    let m = model();
    let prompt = ids("I hate you because");
    let v = love_hate();
    let first = Positions::First(v.rows());

    let gen = |v: &SteeringVector, coef: f64, pos: &Positions, prompt: &[u32]| {
        err(steer_generate(m, prompt, v, coef, pos, &greedy(2)).map(|_| ()))
    };
    // Coefficients must be finite.
    for (c, name) in [
        (f64::NAN, "NaN"),
        (f64::INFINITY, "inf"),
        (f64::NEG_INFINITY, "-inf"),
    ] {
        let e = gen(&v, c, &first, &prompt);
        assert!(e.contains(name) && e.contains("finite"), "{e}");
    }
    // Hooks: a layer out of range names the valid range; only residual hooks.
    let e = err(actadd(
        m,
        HookPoint::resid_pre(30),
        &ids("Love"),
        &ids("Hate"),
        pad(),
    ));
    assert!(e.contains("layer 30") && e.contains("0..=29"), "{e}");
    let attn_out = SteeringVector {
        hook: HookPoint::Block(3, BlockHook::AttnOut),
        direction: v.direction.clone(),
    };
    let e = gen(&attn_out, 1.0, &first, &prompt);
    assert!(e.contains("residual") && e.contains("hook_attn_out"), "{e}");
    // Width.
    let narrow = SteeringVector {
        hook: HookPoint::resid_pre(2),
        direction: Direction::Add(Tensor::zeros(100, DType::F32, &Device::Cpu).unwrap()),
    };
    let e = gen(&narrow, 1.0, &Positions::All, &prompt);
    assert!(e.contains("576") && e.contains("[100]"), "{e}");
    // ActAdd longer than the prompt is an error (not clipped).
    let e = gen(&v, 1.0, &first, &prompt[..1]);
    assert!(e.contains("only 1"), "{e}");
    // A per-position vector needs as many positions as rows.
    let e = gen(&v, 1.0, &Positions::All, &prompt);
    assert!(e.contains("rows"), "{e}");
    // Contrastive pairs: an empty file, and a bad line named by number.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let empty = dir.join(format!("steer-empty-{}.jsonl", std::process::id()));
    std::fs::write(&empty, "\n  \n").unwrap();
    let e = err(read_contrast_pairs(&empty));
    assert!(e.contains("no contrastive pairs"), "{e}");
    std::fs::write(
        &empty,
        "{\"positive\": \"a\", \"negative\": \"b\"}\n{\"pos\": 1}\n",
    )
    .unwrap();
    let e = err(read_contrast_pairs(&empty));
    assert!(e.contains("line 2"), "{e}");
    std::fs::remove_file(&empty).ok();
    let e = err(mean_difference(m, HookPoint::resid_pre(2), &[]));
    assert!(e.contains("at least one"), "{e}");
    // SAE latents out of range, and dictionaries of the wrong width.
    let e = err(sae_clamp(random_sae(8), 8, 1.0, HookPoint::resid_pre(2)));
    assert!(e.contains("feature 8") && e.contains("0..=7"), "{e}");
    let small = Sae::random(
        DictConfig::new(Architecture::Standard, 64, 8),
        0.1,
        &Device::Cpu,
    )
    .unwrap();
    let e = err(max_activation(
        m,
        &small,
        HookPoint::resid_pre(2),
        0,
        std::slice::from_ref(&prompt),
    ));
    assert!(e.contains("64") && e.contains("576"), "{e}");
}
