//! Helpers shared by the CLI tests: run the built binary, read its output, make a scratch folder.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the `scalpel` binary built for these tests.
pub fn scalpel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(args)
        .output()
        .expect("the scalpel binary runs")
}

/// Output bytes as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// An empty folder `<target tmp>/<prefix>-<name>-<pid>`.
pub fn scratch(prefix: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{prefix}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
