//! `scalpel harvest` end to end on the default model: a run killed with SIGKILL at a random
//! moment and started again ends with a store identical to an uninterrupted run; stores from
//! another model or with other settings are refused; the stored rows are the model's activations.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const ARGS: &[&str] = &[
    "harvest",
    "--data",
    "demo",
    "--hooks",
    "resid_post.2,blocks.1.hook_mlp_out",
    "--tokens",
    "1536",
    "--context-size",
    "32",
    "--contexts-per-shard",
    "4",
    "--batch",
    "2",
];

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("harvest-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn harvest(out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(ARGS)
        .args(extra)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn manifest(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

fn shard_count(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("shards"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_killed_harvest_resumes_to_an_identical_store() {
    let root = scratch("resume");
    let (a, b) = (root.join("a"), root.join("b"));
    let o = harvest(&a, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let full = manifest(&a);
    assert_eq!(full["shards"].as_array().unwrap().len(), 12); // 48 contexts / 4

    // Kill the second run after a pseudo-random number of shards (by time of day), then resume.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize;
    let want_shards = 1 + nanos % 9;
    let mut child = Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(ARGS)
        .arg("--out")
        .arg(&b)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while shard_count(&b) < want_shards && Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let partial = manifest(&b)["shards"].as_array().map_or(0, |s| s.len());
    assert!(partial < 12, "the run finished before it could be killed");
    let o = harvest(&b, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        manifest(&b),
        full,
        "resumed after {partial} shards: store differs"
    );
    // No temporary files are left.
    let leftovers: Vec<_> = std::fs::read_dir(b.join("shards"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".safetensors"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn other_settings_and_broken_shards_are_refused_clearly() {
    let root = scratch("refuse");
    let a = root.join("a");
    assert!(harvest(&a, &[]).status.success());
    // Same directory, another hook: refused, naming what differs.
    let o = Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args([
            "harvest",
            "--data",
            "demo",
            "--hooks",
            "resid_post.3",
            "--tokens",
            "1536",
            "--context-size",
            "32",
            "--contexts-per-shard",
            "4",
        ])
        .arg("--out")
        .arg(&a)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("hooks") && !err.contains("panicked"), "{err}");
    // An unknown hook name gets suggestions.
    let o = harvest(&root.join("x"), &["--hooks", "resid_psot.2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("blocks.2.hook_resid_post"),
        "{err}"
    );
}
