//! The harvest loop on a tiny real checkpoint: truncated forwards give the same activations as a
//! full cached forward, hook_z is flattened per position, patterns are refused, and the streaming
//! mode yields every row exactly once.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use scalpel_core::{BlockHook, HookPoint};
use scalpel_data::harvest::{harvest, stop_layer, ActivationStream};
use scalpel_models::loader::load_hf_dir;
use scalpel_models::transformer::Model;

fn tiny() -> Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../scalpel-models/tests/fixtures/models/llama");
    load_hf_dir(&dir, &Device::Cpu).unwrap().0
}

fn contexts(n: usize, len: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|c| {
            (0..len)
                .map(|i| ((c * 31 + i * 7) % 500) as u32 + 1)
                .collect()
        })
        .collect()
}

#[test]
fn truncation_depth_follows_the_deepest_hook() {
    let m = tiny();
    assert_eq!(stop_layer(&m, &[HookPoint::resid_post(0)]), Some(1));
    assert_eq!(
        stop_layer(&m, &[HookPoint::resid_pre(1), HookPoint::resid_post(0)]),
        Some(2)
    );
    assert_eq!(stop_layer(&m, &[HookPoint::Embed]), Some(0));
    assert_eq!(stop_layer(&m, &[HookPoint::UnembedIn]), None);
}

#[test]
fn harvested_rows_equal_a_full_cached_forward() {
    let m = tiny();
    let hooks = [
        HookPoint::resid_post(0),
        HookPoint::Block(0, BlockHook::Z),
        HookPoint::Block(1, BlockHook::MlpIn),
    ];
    let ctxs = contexts(5, 8);
    type Row = (Vec<u32>, Vec<(HookPoint, Tensor)>);
    let mut got: Vec<Row> = Vec::new();
    let mut progress = 0;
    let n = harvest(
        &m,
        ctxs.clone().into_iter().map(Ok),
        &hooks,
        2,
        |t, acts| {
            got.push((t.to_vec(), acts.to_vec()));
            Ok(())
        },
        |k| progress += k,
    )
    .unwrap();
    assert_eq!(n, 40);
    assert_eq!(progress, 40);
    assert_eq!(got.len(), 5);
    let tokens = Tensor::new(ctxs.clone(), &Device::Cpu).unwrap();
    let (_, cache) = m.run_with_cache(&tokens, |p| hooks.contains(&p)).unwrap();
    for (i, (t, acts)) in got.iter().enumerate() {
        assert_eq!(t, &ctxs[i]);
        for (hp, a) in acts {
            let want = cache.get(*hp).unwrap().get(i).unwrap();
            let want = want.reshape((8, ())).unwrap();
            assert_eq!(a.dims(), want.dims(), "{hp}");
            let diff = (a - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "{hp} context {i}: {diff}");
        }
    }
    // hook_z [p, h, dh] is stored flattened as [p, h·dh].
    assert_eq!(got[0].1[1].1.dims(), &[8, 4 * 16]);
}

#[test]
fn non_positional_hooks_and_empty_requests_are_refused() {
    let m = tiny();
    let err = harvest(
        &m,
        contexts(1, 4).into_iter().map(Ok),
        &[HookPoint::Block(0, BlockHook::Pattern)],
        1,
        |_, _| Ok(()),
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("blocks.0.attn.hook_pattern") && err.contains("per-position"),
        "{err}"
    );
    assert!(harvest(
        &m,
        contexts(1, 4).into_iter().map(Ok),
        &[],
        1,
        |_, _| Ok(()),
        |_| {}
    )
    .is_err());
}

#[test]
fn the_stream_yields_every_row_once_in_shuffled_batches() {
    let m = tiny();
    let hp = HookPoint::resid_post(1);
    let ctxs = contexts(6, 8); // 48 rows
    let stream =
        ActivationStream::new(&m, ctxs.clone().into_iter().map(Ok), hp, 2, 8, 24, 0).unwrap();
    let batches: Vec<Tensor> = stream.map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 6);
    assert!(batches.iter().all(|b| b.dims() == [8, 64]));
    let mut got: Vec<Vec<f32>> = batches
        .iter()
        .flat_map(|b| b.to_vec2::<f32>().unwrap())
        .collect();
    let tokens = Tensor::new(ctxs, &Device::Cpu).unwrap();
    let (_, cache) = m.run_with_cache(&tokens, |p| p == hp).unwrap();
    let mut want: Vec<Vec<f32>> = cache
        .get(hp)
        .unwrap()
        .reshape((48, 64))
        .unwrap()
        .to_vec2()
        .unwrap();
    // Shuffled: the order differs from the forward order.
    assert_ne!(got, want);
    let key = |r: &Vec<f32>| r.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    got.sort_by_key(key);
    want.sort_by_key(key);
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(&want) {
        assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5));
    }
}
