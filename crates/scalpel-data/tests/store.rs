//! Activation store: round trip, crash-resume, checksums, meta and shape checks.

use std::fs;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use scalpel_data::store::{
    HookMeta, RowPos, ShardEntry, StoreDType, StoreMeta, StoreReader, StoreWriter,
};

const RESID: &str = "blocks.0.hook_resid_post";
const MLP: &str = "blocks.1.hook_mlp_out";
const CTX: usize = 5;

fn meta(dtype: StoreDType) -> StoreMeta {
    StoreMeta {
        model: "tiny-test".into(),
        model_fingerprint: "fp-aaaa".into(),
        hooks: vec![
            HookMeta {
                name: RESID.into(),
                d: 4,
            },
            HookMeta {
                name: MLP.into(),
                d: 3,
            },
        ],
        dtype,
        context_size: CTX,
        contexts_per_shard: 3,
        n_tokens: 100,
        corpus: "demo".into(),
        corpus_hash: "corpus-bbbb".into(),
        // serde_json's default parser reads these floats back one bit off: resume must still
        // see the same meta.
        packing: serde_json::json!({"bos": true, "n_ctx": CTX, "x": 0.18707229895275582, "y": 1.9666553791728614}),
        exclude_token_ids: Vec::new(),
        seqpos_slice: None,
    }
}

/// Token id of (context, position): unique and easy to check.
fn token(context: usize, position: usize) -> u32 {
    (context * 1000 + position) as u32
}

/// Context `c`: each activation row's first column is its global row id (exact in f32), the rest
/// are non-integers so precision loss would show.
fn context(c: usize) -> (Vec<u32>, Vec<(&'static str, Tensor)>) {
    let tokens = (0..CTX).map(|p| token(c, p)).collect();
    let acts = [(RESID, 4), (MLP, 3)]
        .into_iter()
        .enumerate()
        .map(|(h, (name, d))| {
            let v: Vec<f32> = (0..CTX * d)
                .map(|i| {
                    let (p, j) = (i / d, i % d);
                    let row = (c * CTX + p) as f32;
                    if j == 0 {
                        row
                    } else {
                        row * 0.37 + j as f32 * 0.011 + h as f32
                    }
                })
                .collect();
            (name, Tensor::from_vec(v, (CTX, d), &Device::Cpu).unwrap())
        })
        .collect();
    (tokens, acts)
}

fn push(w: &mut StoreWriter, c: usize) {
    let (tokens, acts) = context(c);
    w.push(&tokens, &acts).unwrap();
}

fn write_store(dir: &Path, n_contexts: usize, dtype: StoreDType) -> Vec<ShardEntry> {
    let mut w = StoreWriter::create_or_resume(dir, meta(dtype)).unwrap();
    assert_eq!(w.contexts_done(), 0);
    for c in 0..n_contexts {
        push(&mut w, c);
    }
    w.finish().unwrap().shards
}

/// All rows of `hook` in harvest order, `[n_rows][d]`.
fn expected_rows(n_contexts: usize, hook: &str) -> Vec<Vec<f32>> {
    (0..n_contexts)
        .flat_map(|c| {
            let (_, acts) = context(c);
            let t = &acts.iter().find(|(n, _)| *n == hook).unwrap().1;
            t.to_vec2::<f32>().unwrap()
        })
        .collect()
}

#[test]
fn round_trip_every_row_once_in_shuffled_batches() {
    let dir = tempfile::tempdir().unwrap();
    let n_contexts = 10;
    let shards = write_store(dir.path(), n_contexts, StoreDType::F32);
    let sizes: Vec<usize> = shards.iter().map(|s| s.n_contexts).collect();
    assert_eq!(sizes, [3, 3, 3, 1]);

    let reader = StoreReader::open(dir.path()).unwrap();
    reader.verify().unwrap();
    reader.check_model("fp-aaaa").unwrap();
    assert_eq!(reader.n_rows(), n_contexts * CTX);

    for hook in [RESID, MLP] {
        let mut rows = Vec::new();
        for batch in reader.batches(hook, 4, 7, 2).unwrap() {
            let batch = batch.unwrap();
            assert!(batch.dims()[0] <= 4 && batch.dims()[0] > 0);
            rows.extend(batch.to_vec2::<f32>().unwrap());
        }
        let want = expected_rows(n_contexts, hook);
        assert_ne!(
            rows, want,
            "{hook}: batches come in harvest order, not shuffled"
        );
        let mut sorted = rows.clone();
        sorted.sort_by(|a, b| a[0].total_cmp(&b[0]));
        assert_eq!(sorted, want, "{hook}: not every row came back exactly once");

        // Same seed, same order; another seed, another order.
        let again: Vec<Vec<f32>> = reader
            .batches(hook, 4, 7, 2)
            .unwrap()
            .flat_map(|b| b.unwrap().to_vec2::<f32>().unwrap())
            .collect();
        assert_eq!(again, rows);
        let other: Vec<Vec<f32>> = reader
            .batches(hook, 4, 8, 2)
            .unwrap()
            .flat_map(|b| b.unwrap().to_vec2::<f32>().unwrap())
            .collect();
        assert_ne!(other, rows);
    }

    // The loader threads change nothing but speed.
    for n_loaders in [1, 3] {
        let rows: Vec<Vec<f32>> = reader
            .batches_with_loaders(MLP, 4, 7, 2, n_loaders)
            .unwrap()
            .flat_map(|b| b.unwrap().to_vec2::<f32>().unwrap())
            .collect();
        let default: Vec<Vec<f32>> = reader
            .batches(MLP, 4, 7, 2)
            .unwrap()
            .flat_map(|b| b.unwrap().to_vec2::<f32>().unwrap())
            .collect();
        assert_eq!(rows, default, "{n_loaders} loaders");
    }

    // Every row maps back to its context and position, and the tokens there are the right ones.
    for i in 0..reader.n_shards() {
        let shard = reader.shard(i).unwrap();
        let tokens = shard.tokens().unwrap().to_vec2::<u32>().unwrap();
        assert_eq!(tokens, reader.tokens(i).unwrap().to_vec2::<u32>().unwrap());
        let acts = shard.activations(MLP).unwrap().to_vec2::<f32>().unwrap();
        let first_ctx = shard.locate(0).context;
        for (r, row) in acts.iter().enumerate() {
            let RowPos { context, position } = shard.locate(r);
            assert_eq!(row[0] as usize, context * CTX + position);
            assert_eq!(
                tokens[context - first_ctx][position],
                token(context, position)
            );
        }
    }
}

#[test]
fn batch_larger_than_shuffle_buffer_still_yields_every_row() {
    let dir = tempfile::tempdir().unwrap();
    write_store(dir.path(), 7, StoreDType::F32);
    let reader = StoreReader::open(dir.path()).unwrap();
    let batches: Vec<Tensor> = reader
        .batches(RESID, 32, 1, 1)
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    let sizes: Vec<usize> = batches.iter().map(|b| b.dims()[0]).collect();
    assert_eq!(sizes, [32, 3]);
    assert!(reader.batches("nope", 4, 0, 1).is_err());
    assert!(reader.batches(RESID, 0, 0, 1).is_err());
}

#[test]
fn bf16_store_holds_bf16_and_reads_f32() {
    let dir = tempfile::tempdir().unwrap();
    write_store(dir.path(), 4, StoreDType::Bf16);
    let reader = StoreReader::open(dir.path()).unwrap();
    let raw = candle_core::safetensors::load(
        dir.path().join("shards/shard-000000.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(raw[RESID].dtype(), DType::BF16);
    assert_eq!(raw["tokens"].dtype(), DType::U32);
    assert_eq!(raw[RESID].dims(), [3 * CTX, 4]);

    let got = reader.shard(0).unwrap().activations(RESID).unwrap();
    assert_eq!(got.dtype(), DType::F32);
    let want: Vec<Tensor> = (0..3).map(|c| context(c).1.remove(0).1).collect();
    let want = Tensor::cat(&want, 0)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(
        got.to_vec2::<f32>().unwrap(),
        want.to_vec2::<f32>().unwrap()
    );
    let n: usize = reader
        .batches(RESID, 5, 3, 1)
        .unwrap()
        .map(|b| b.unwrap().dims()[0])
        .sum();
    assert_eq!(n, 4 * CTX);
}

#[test]
fn resume_after_kills_is_byte_identical_to_an_uninterrupted_run() {
    let n_contexts = 14;
    let reference_dir = tempfile::tempdir().unwrap();
    let reference = write_store(reference_dir.path(), n_contexts, StoreDType::F32);
    assert_eq!(reference.len(), 5);
    // Deterministic writer: the same contents give the same bytes.
    let again_dir = tempfile::tempdir().unwrap();
    assert_eq!(
        write_store(again_dir.path(), n_contexts, StoreDType::F32),
        reference
    );

    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for trial in 0..4 {
        let dir = tempfile::tempdir().unwrap();
        let shards = dir.path().join("shards");
        let mut kill_points: Vec<usize> = (0..3).map(|_| rng.gen_range(0..n_contexts)).collect();
        kill_points.sort();
        for &kill in &kill_points {
            let mut w = StoreWriter::create_or_resume(dir.path(), meta(StoreDType::F32)).unwrap();
            let done = w.contexts_done();
            assert_eq!(done % 3, 0, "resume must restart at a shard boundary");
            for c in done..kill.max(done) {
                push(&mut w, c);
            }
            drop(w); // killed: no finish
                     // What a kill at other instants leaves: a half-written shard, a half-written
                     // manifest, and a shard renamed into place but never recorded.
            let next = StoreReader::open(dir.path()).unwrap().n_shards();
            fs::write(
                shards.join(format!("shard-{next:06}.safetensors.tmp")),
                b"half a shard",
            )
            .unwrap();
            fs::write(dir.path().join("manifest.json.tmp"), b"{\"format_v").unwrap();
            if trial % 2 == 0 {
                fs::write(
                    shards.join(format!("shard-{:06}.safetensors", next + 1)),
                    b"unrecorded",
                )
                .unwrap();
            }
            StoreReader::open(dir.path()).unwrap().verify().unwrap();
        }
        let mut w = StoreWriter::create_or_resume(dir.path(), meta(StoreDType::F32)).unwrap();
        for c in w.contexts_done()..n_contexts {
            push(&mut w, c);
        }
        assert_eq!(
            w.finish().unwrap().shards,
            reference,
            "kills at {kill_points:?}"
        );

        // Resuming a finished store drops its partial last shard and rebuilds it identically.
        let mut w = StoreWriter::create_or_resume(dir.path(), meta(StoreDType::F32)).unwrap();
        assert_eq!(w.contexts_done(), 12);
        for c in 12..n_contexts {
            push(&mut w, c);
        }
        assert_eq!(w.finish().unwrap().shards, reference);

        let mut left: Vec<String> = fs::read_dir(&shards)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let listed: Vec<String> = reference.iter().map(|s| s.file.clone()).collect();
        assert_eq!(left, listed, "leftovers of killed runs were not cleaned");
        assert!(!dir.path().join("manifest.json.tmp").exists());
        StoreReader::open(dir.path()).unwrap().verify().unwrap();
    }
}

#[test]
fn corrupted_shard_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    write_store(dir.path(), 9, StoreDType::F32);
    let path = dir.path().join("shards/shard-000001.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    fs::write(&path, bytes).unwrap();

    let reader = StoreReader::open(dir.path()).unwrap();
    let err = reader.verify().unwrap_err().to_string();
    assert!(
        err.contains("shard-000001.safetensors") && err.contains("sha256"),
        "{err}"
    );
    let err = reader.shard(1).err().unwrap().to_string();
    assert!(err.contains("shard-000001.safetensors"), "{err}");
    reader.shard(0).unwrap();

    let results: Vec<_> = reader.batches(RESID, 4, 0, 1).unwrap().collect();
    let err = results
        .iter()
        .find_map(|r| r.as_ref().err())
        .expect("the corrupt shard was read without complaint")
        .to_string();
    assert!(err.contains("shard-000001.safetensors"), "{err}");
    assert!(
        results.last().unwrap().is_err(),
        "iteration must stop at the error"
    );
}

#[test]
fn store_of_another_model_or_hooks_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_store(dir.path(), 3, StoreDType::F32);

    let reader = StoreReader::open(dir.path()).unwrap();
    let err = reader.check_model("fp-zzzz").unwrap_err().to_string();
    assert!(err.contains("fp-aaaa") && err.contains("fp-zzzz"), "{err}");

    let mut other = meta(StoreDType::F32);
    other.model_fingerprint = "fp-zzzz".into();
    let err = StoreWriter::create_or_resume(dir.path(), other)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model_fingerprint") && err.contains("fp-zzzz"),
        "{err}"
    );

    let mut other = meta(StoreDType::F32);
    other.hooks[1].name = "blocks.1.hook_attn_out".into();
    let err = StoreWriter::create_or_resume(dir.path(), other)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("hooks") && err.contains("hook_attn_out"),
        "{err}"
    );

    let mut other = meta(StoreDType::F32);
    other.packing["bos"] = false.into();
    let err = StoreWriter::create_or_resume(dir.path(), other)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("packing"), "{err}");

    // The refused attempts left the store as it was.
    assert_eq!(StoreReader::open(dir.path()).unwrap().n_shards(), 1);

    // A directory with other content is not taken over.
    let foreign = tempfile::tempdir().unwrap();
    fs::write(foreign.path().join("notes.txt"), b"mine").unwrap();
    let err = StoreWriter::create_or_resume(foreign.path(), meta(StoreDType::F32))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("notes.txt"), "{err}");
}

#[test]
fn manifest_rejects_unknown_fields() {
    let dir = tempfile::tempdir().unwrap();
    write_store(dir.path(), 3, StoreDType::F32);
    let path = dir.path().join("manifest.json");
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.replacen('{', "{\"surprise\": 1,", 1)).unwrap();
    let err = StoreReader::open(dir.path()).err().unwrap().to_string();
    assert!(err.contains("surprise"), "{err}");
}

#[test]
fn wrong_shaped_activation_is_refused_naming_the_hook() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = StoreWriter::create_or_resume(dir.path(), meta(StoreDType::F32)).unwrap();
    let (tokens, mut acts) = context(0);

    let good_mlp = acts[1].1.clone();
    acts[1].1 = Tensor::zeros((CTX, 2), DType::F32, &Device::Cpu).unwrap();
    let err = w.push(&tokens, &acts).unwrap_err().to_string();
    assert!(
        err.contains(MLP) && err.contains("[5, 2]") && err.contains("[5, 3]"),
        "{err}"
    );
    acts[1].1 = good_mlp;

    let err = w.push(&tokens, &acts[..1]).unwrap_err().to_string();
    assert!(err.contains(MLP), "{err}");
    let err = w.push(&tokens[..3], &acts).unwrap_err().to_string();
    assert!(err.contains("3 tokens"), "{err}");

    // Refused pushes buffered nothing: the store holds exactly the good contexts.
    for c in 0..3 {
        push(&mut w, c);
    }
    let shards = w.finish().unwrap().shards;
    assert_eq!(shards.len(), 1);
    assert_eq!(
        shards,
        write_store(tempfile::tempdir().unwrap().path(), 3, StoreDType::F32)
    );
}

/// Shuffled read throughput of a ~200 MB f32 store from a warm page cache.
/// `cargo test --release -p scalpel-data --test store -- --ignored --nocapture`
#[test]
#[ignore = "measurement, not a check: prints read throughput"]
fn shuffled_read_throughput() {
    let (d, ctx, n_contexts) = (512, 128, 800);
    let dir = tempfile::tempdir().unwrap();
    let meta = StoreMeta {
        hooks: vec![HookMeta {
            name: RESID.into(),
            d,
        }],
        context_size: ctx,
        contexts_per_shard: 64,
        ..meta(StoreDType::F32)
    };
    let mut w = StoreWriter::create_or_resume(dir.path(), meta).unwrap();
    let tokens = vec![0u32; ctx];
    for c in 0..n_contexts {
        let t = Tensor::full(c as f32, (ctx, d), &Device::Cpu).unwrap();
        w.push(&tokens, &[(RESID, t)]).unwrap();
    }
    w.finish().unwrap();
    let reader = StoreReader::open(dir.path()).unwrap();
    let gb = (n_contexts * ctx * d * 4) as f64 / 1e9;
    for _ in 0..2 {
        let start = std::time::Instant::now();
        reader.verify().unwrap();
        println!(
            "verify (read + sha256): {:.2} GB/s",
            gb / start.elapsed().as_secs_f64()
        );
        let start = std::time::Instant::now();
        for i in 0..reader.n_shards() {
            reader.shard(i).unwrap().activations(RESID).unwrap();
        }
        println!(
            "read + sha256 + decode: {:.2} GB/s",
            gb / start.elapsed().as_secs_f64()
        );
    }
    for (epoch, n_loaders) in [(0, 1), (1, 1), (2, 2), (3, 4)] {
        let start = std::time::Instant::now();
        let mut rows = 0;
        for batch in reader
            .batches_with_loaders(RESID, 4096, epoch, 4, n_loaders)
            .unwrap()
        {
            rows += batch.unwrap().dims()[0];
        }
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(rows, n_contexts * ctx);
        println!(
            "epoch {epoch}, {n_loaders} loaders: {gb:.3} GB in {secs:.3} s = {:.2} GB/s \
             (batch 4096, shuffle buffer 4 shards of 16.8 MB)",
            gb / secs
        );
    }
}

#[test]
fn excluded_tokens_are_skipped_by_readers() {
    // SAELens's exclude_special_tokens: rows whose token is listed never reach a batch.
    let dir = tempfile::tempdir().unwrap();
    let meta = StoreMeta {
        hooks: vec![HookMeta {
            name: RESID.into(),
            d: 2,
        }],
        exclude_token_ids: vec![token(0, 0), token(1, 0), token(2, 3)],
        ..meta(StoreDType::F32)
    };
    let mut w = StoreWriter::create_or_resume(dir.path(), meta).unwrap();
    for c in 0..4 {
        let tokens: Vec<u32> = (0..CTX).map(|p| token(c, p)).collect();
        // Each row holds its own token id, so the survivors can be named.
        let rows: Vec<f32> = tokens
            .iter()
            .flat_map(|&t| [t as f32, -(t as f32)])
            .collect();
        let t = Tensor::from_vec(rows, (CTX, 2), &Device::Cpu).unwrap();
        w.push(&tokens, &[(RESID, t)]).unwrap();
    }
    w.finish().unwrap();
    let r = StoreReader::open(dir.path()).unwrap();
    let mut seen: Vec<u32> = r
        .batches(RESID, 5, 1, 2)
        .unwrap()
        .flat_map(|b| b.unwrap().to_vec2::<f32>().unwrap())
        .map(|row| row[0] as u32)
        .collect();
    seen.sort();
    let mut want: Vec<u32> = (0..4)
        .flat_map(|c| (0..CTX).map(move |p| token(c, p)))
        .collect();
    want.retain(|t| ![token(0, 0), token(1, 0), token(2, 3)].contains(t));
    assert_eq!(seen, want);
}

#[test]
fn seqpos_slices_follow_python_semantics_and_filter_reads() {
    use scalpel_data::store::SeqPosSlice;
    let m = |s: &str| SeqPosSlice::parse(s).unwrap().mask(5);
    assert_eq!(m("1:"), [false, true, true, true, true]);
    assert_eq!(m(":-1"), [true, true, true, true, false]);
    assert_eq!(m("::2"), [true, false, true, false, true]);
    assert_eq!(m("-2:"), [false, false, false, true, true]);
    assert_eq!(m("3:1"), [false; 5]);
    assert!(SeqPosSlice::parse("1").is_err());
    assert!(SeqPosSlice::parse("::0").is_err());
    assert!(SeqPosSlice::parse("a:b").is_err());

    let dir = tempfile::tempdir().unwrap();
    let meta = StoreMeta {
        hooks: vec![HookMeta {
            name: RESID.into(),
            d: 1,
        }],
        seqpos_slice: Some(SeqPosSlice::parse("1::2").unwrap()),
        ..meta(StoreDType::F32)
    };
    let mut w = StoreWriter::create_or_resume(dir.path(), meta).unwrap();
    for c in 0..3 {
        let tokens: Vec<u32> = (0..CTX).map(|p| token(c, p)).collect();
        let rows: Vec<f32> = tokens.iter().map(|&t| t as f32).collect();
        w.push(
            &tokens,
            &[(
                RESID,
                Tensor::from_vec(rows, (CTX, 1), &Device::Cpu).unwrap(),
            )],
        )
        .unwrap();
    }
    w.finish().unwrap();
    let mut seen: Vec<u32> = StoreReader::open(dir.path())
        .unwrap()
        .batches(RESID, 4, 0, 1)
        .unwrap()
        .flat_map(|b| b.unwrap().to_vec2::<f32>().unwrap())
        .map(|row| row[0] as u32)
        .collect();
    seen.sort();
    let want: Vec<u32> = (0..3).flat_map(|c| [token(c, 1), token(c, 3)]).collect();
    assert_eq!(seen, want);
}
