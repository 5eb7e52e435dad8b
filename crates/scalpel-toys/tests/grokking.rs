//! Grokking of modular addition at a small modulus, the Fourier analyses, the progress measures
//! and the memorisation/generalisation diagnosis.

use scalpel_toys::diagnose::{diagnose, diagnose_checkpoint};
use scalpel_toys::grokking::{
    self, fourier_basis, frequency_energy, gini, key_frequencies, Dataset, GrokConfig,
};
use scalpel_toys::ToyError;

fn small(epochs: usize) -> GrokConfig {
    GrokConfig {
        epochs,
        eval_every: 50,
        checkpoint_every: 100,
        ..GrokConfig::quick()
    }
}

#[test]
fn fourier_basis_is_orthonormal_and_finds_a_pure_frequency() {
    for p in [7usize, 8, 31] {
        let b = fourier_basis(p);
        assert_eq!(b.len(), p);
        for i in 0..p {
            for j in 0..p {
                let d: f64 = b[i].iter().zip(&b[j]).map(|(x, y)| x * y).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((d - want).abs() < 1e-9, "p {p}: <b{i}, b{j}> = {d}");
            }
        }
    }
    // An embedding made of cos and sin of frequency 3 (two columns) has all its energy there.
    let p = 31;
    let w = |x: usize| 2.0 * std::f64::consts::PI * (3 * x) as f64 / p as f64;
    let m: Vec<Vec<f64>> = (0..p).map(|x| vec![w(x).cos(), 2.0 * w(x).sin()]).collect();
    let e = frequency_energy(&m, p);
    let total: f64 = e.iter().sum();
    assert!((e[2] / total - 1.0).abs() < 1e-9, "{e:?}");
    assert_eq!(key_frequencies(&e, 3.0), vec![3]);
    assert!((gini(&[1.0; 10])).abs() < 1e-12);
    assert!((gini(&[0.0, 0.0, 0.0, 5.0]) - 0.75).abs() < 1e-12);
}

#[test]
fn small_modulus_memorises_then_generalises_on_a_few_frequencies() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small(1100);
    let run = grokking::train(&cfg, Some(dir.path()), &mut |_, _| {}).unwrap();
    let memorised = run.points.iter().find(|p| p.train_acc >= 0.99).unwrap();
    let last = run.points.last().unwrap();
    // Memorisation first: train accuracy saturates while test accuracy is still far from it.
    assert!(memorised.test_acc < 0.5, "{memorised:?}");
    // Then generalisation.
    assert!(last.train_acc == 1.0 && last.test_acc > 0.95, "{last:?}");
    // The embedding concentrates on a few frequencies: of (31 − 1)/2 = 15 frequencies, at most
    // 6 are key and the 5 strongest hold most of the energy (a flat spectrum gives them 1/3).
    let prog = grokking::progress(&run.model, &run.data, &[], 5).unwrap();
    let key = key_frequencies(&prog.embed_energy, 3.0);
    assert!((1..=6).contains(&key.len()), "key frequencies {key:?}");
    assert!(prog.top_share > 0.7, "top-5 share {}", prog.top_share);
    // Progress measures at the end: the key frequencies alone carry the training performance,
    // and removing them destroys it.
    let with_key = grokking::progress(&run.model, &run.data, &key, 5).unwrap();
    assert!(
        with_key.restricted_loss < 0.05,
        "{}",
        with_key.restricted_loss
    );
    assert!(with_key.excluded_loss > 1.0, "{}", with_key.excluded_loss);

    // The diagnosis tells the memorised checkpoint from the final one without test data. Both
    // fit the training set perfectly.
    let (e0, first) = run.checkpoints.first().unwrap().clone();
    let early = diagnose_checkpoint(&first).unwrap();
    let late = diagnose_checkpoint(&run.checkpoints.last().unwrap().1).unwrap();
    assert_eq!(e0, 100);
    assert_eq!(early.train_acc, 1.0);
    assert_eq!(late.train_acc, 1.0);
    assert_eq!(early.verdict, "memorising", "{early:?}");
    assert_eq!(late.verdict, "generalising", "{late:?}");
    // ... and the verdicts agree with the held-out data they never saw.
    assert!(early.held_out_acc < 0.5 && late.held_out_acc > 0.95);

    // Resuming from the checkpoints continues the same run exactly.
    let mut longer = cfg.clone();
    longer.epochs = 1200;
    let resumed = grokking::train(&longer, Some(dir.path()), &mut |_, _| {}).unwrap();
    assert_eq!(resumed.points.len(), run.points.len() + 2);
    assert_eq!(&resumed.points[..run.points.len()], &run.points[..]);
    // A different configuration in the same folder is refused.
    let mut other = longer.clone();
    other.lr = 1e-3;
    assert!(matches!(
        grokking::train(&other, Some(dir.path()), &mut |_, _| {}),
        Err(ToyError::Config(_))
    ));
}

#[test]
fn shuffled_labels_can_only_be_memorised_and_the_diagnosis_says_so() {
    let cfg = GrokConfig {
        shuffle_labels: true,
        ..small(500)
    };
    let run = grokking::train(&cfg, None, &mut |_, _| {}).unwrap();
    let last = run.points.last().unwrap();
    assert_eq!(last.train_acc, 1.0, "{last:?}");
    let d = diagnose("shuffled", &run.model, &run.data, Some(500)).unwrap();
    assert_eq!(d.verdict, "memorising", "{d:?}");
    assert!(d.fourier_score < 0.2, "{d:?}");
}

#[test]
fn restricted_and_excluded_parts_split_a_fourier_circuit_exactly() {
    // The known algorithm written into logits by hand: logit(a, b, c) = Σ_k cos(w_k(a + b − c))
    // for k in {2, 5}, plus a per-output offset. The key-frequency part (plus each output's mean)
    // is all of it; the excluded part is the offset's deviation from its mean, here 0.
    let p = 13;
    let w = |k: usize, x: i64| 2.0 * std::f64::consts::PI * (k as f64) * x as f64 / p as f64;
    let offset = |c: usize| 0.1 * c as f64;
    let all: Vec<Vec<f64>> = (0..p * p)
        .map(|i| {
            let (a, b) = ((i / p) as i64, (i % p) as i64);
            (0..p)
                .map(|c| w(2, a + b - c as i64).cos() + w(5, a + b - c as i64).cos() + offset(c))
                .collect()
        })
        .collect();
    let (restricted, excluded) = grokking::split_logits(&all, p, &[2, 5]);
    for i in 0..p * p {
        for c in 0..p {
            assert!((restricted[i][c] - all[i][c]).abs() < 1e-9);
            assert!(
                (excluded[i][c] - offset(c)).abs() < 1e-9,
                "excluded keeps the offset"
            );
        }
    }
    // With the wrong frequency nothing of the circuit is kept.
    let (restricted, _) = grokking::split_logits(&all, p, &[3]);
    for (i, row) in restricted.iter().enumerate() {
        for (c, &x) in row.iter().enumerate() {
            assert!((x - offset(c)).abs() < 1e-9, "row {i} column {c}: {x}");
        }
    }
    // The data split holds every pair once, with the right labels.
    let cfg = GrokConfig {
        p,
        ..GrokConfig::quick()
    };
    let data = Dataset::new(&cfg).unwrap();
    assert_eq!(data.train_labels.len() + data.test_labels.len(), p * p);
    for (&pair, &label) in data.train_pairs.iter().zip(&data.train_labels) {
        assert_eq!(label as usize, (pair / p + pair % p) % p);
    }
}

#[test]
fn bad_settings_name_the_field() {
    let cases: Vec<(GrokConfig, &str)> = vec![
        (
            GrokConfig {
                p: 2,
                ..GrokConfig::quick()
            },
            "p must",
        ),
        (
            GrokConfig {
                frac_train: 1.0,
                ..GrokConfig::quick()
            },
            "frac_train",
        ),
        (
            GrokConfig {
                n_heads: 3,
                ..GrokConfig::quick()
            },
            "n_heads",
        ),
        (
            GrokConfig {
                checkpoint_every: 30,
                eval_every: 25,
                ..GrokConfig::quick()
            },
            "checkpoint_every",
        ),
        (
            GrokConfig {
                lr: -1.0,
                ..GrokConfig::quick()
            },
            "lr",
        ),
        (
            GrokConfig {
                epochs: 0,
                ..GrokConfig::quick()
            },
            "epochs",
        ),
    ];
    for (cfg, field) in cases {
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{err} should name {field}");
    }
}
