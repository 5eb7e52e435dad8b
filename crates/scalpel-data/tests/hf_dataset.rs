//! `hf-dataset:` corpus specs, resolved offline against a Hugging Face cache laid out the way
//! `huggingface_hub` and `hf-hub` write it (the online path needs the hub, unreachable in CI).
//! One test per binary: it sets process-wide environment variables.

use std::path::Path;

use scalpel_data::corpus;

#[test]
fn hf_dataset_specs_resolve_from_the_offline_cache() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/datasets--someone--tiny-text");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(snap.join("data")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/corpus");
    std::fs::copy(
        fixtures.join("docs.parquet"),
        snap.join("data/train-00000.parquet"),
    )
    .unwrap();
    std::fs::copy(fixtures.join("docs.jsonl"), snap.join("data/extra.jsonl")).unwrap();
    // SAFETY (edition 2021: set_var is safe): this binary holds only this test.
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");

    let dir = corpus::resolve("hf-dataset:someone/tiny-text:data").unwrap();
    assert_eq!(dir, snap.join("data"));
    let docs: Vec<_> = corpus::open(&dir, "text")
        .unwrap()
        .map(|d| d.unwrap())
        .collect();
    let from_parquet: Vec<_> = corpus::open(&snap.join("data/train-00000.parquet"), "text")
        .unwrap()
        .collect();
    let from_jsonl: Vec<_> = corpus::open(&snap.join("data/extra.jsonl"), "text")
        .unwrap()
        .collect();
    assert_eq!(docs.len(), from_parquet.len() + from_jsonl.len());
    assert!(!docs.is_empty());
    // A pinned commit finds the same snapshot; the whole repository is the default prefix.
    let by_commit = corpus::resolve(&format!("hf-dataset:someone/tiny-text@{commit}")).unwrap();
    assert_eq!(by_commit, snap.join(""));

    // Clear errors: a repository not in the cache, a malformed id, a missing prefix.
    let e = corpus::resolve("hf-dataset:someone/absent")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("HF_HUB_OFFLINE") && e.contains("someone/absent"),
        "{e}"
    );
    let e = corpus::resolve("hf-dataset:not-an-id")
        .unwrap_err()
        .to_string();
    assert!(e.contains("org/name"), "{e}");
    let e = corpus::resolve("hf-dataset:someone/tiny-text:nothing/here")
        .unwrap_err()
        .to_string();
    assert!(e.contains("nothing/here"), "{e}");
    // Other specs pass through as paths.
    assert_eq!(
        corpus::resolve("some/file.jsonl").unwrap(),
        Path::new("some/file.jsonl")
    );
}
