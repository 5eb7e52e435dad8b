//! Downloads and crash-safe file writes, shared by everything that fetches or writes artifacts:
//! a file is written under a temporary name beside its destination and renamed into place, so a
//! reader (or a process killed half-way) never sees half a file.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A file under a temporary name, deleted on drop unless renamed into place by
/// [`TempPath::persist`]. The name carries the process id and a counter, so neither concurrent
/// processes nor threads share one.
#[derive(Debug)]
pub struct TempPath(PathBuf);

impl TempPath {
    /// A temporary name in the directory of `dest`.
    pub fn beside(dest: &Path) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        TempPath(dest.with_file_name(format!(".{name}.{}-{n}.part", std::process::id())))
    }

    /// The temporary path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Renames the file to `dest` (atomic on one file system).
    pub fn persist(self, dest: &Path) -> io::Result<()> {
        std::fs::rename(&self.0, dest)?;
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes `path` through a temporary file beside it, fsync and a rename. On error the
/// destination is untouched and the temporary file is removed. Errors name the file.
pub fn write_atomically(
    path: &Path,
    body: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<(), (PathBuf, io::Error)> {
    let tmp = TempPath::beside(path);
    let at = |e| (tmp.path().to_path_buf(), e);
    let file = File::create(tmp.path()).map_err(at)?;
    let mut w = BufWriter::new(file);
    body(&mut w).map_err(at)?;
    let file = w.into_inner().map_err(|e| at(e.into_error()))?;
    file.sync_all().map_err(at)?;
    drop(file); // Windows cannot rename an open file.
    tmp.persist(path).map_err(|e| (path.to_path_buf(), e))
}

/// Streams `url` into the file `dest` (which the caller usually names with [`TempPath`]) and
/// returns the byte count. Honours the usual proxy variables; the error text names the URL.
pub fn download(url: &str, dest: &Path) -> Result<u64, String> {
    tracing::info!(url, "downloading (once)");
    let start = Instant::now();
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .try_proxy_from_env(true)
        .build();
    let response = agent.get(url).call().map_err(|e| format!("{url}: {e}"))?;
    let mut file = File::create(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    let n = io::copy(&mut response.into_reader(), &mut file).map_err(|e| format!("{url}: {e}"))?;
    file.sync_all()
        .map_err(|e| format!("{}: {e}", dest.display()))?;
    let secs = start.elapsed().as_secs_f64();
    tracing::info!(
        bytes = n,
        secs = format!("{secs:.1}"),
        mb_per_s = format!("{:.1}", n as f64 / 1e6 / secs.max(1e-3)),
        "download done"
    );
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_only_on_success() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_atomically(&p, |w| w.write_all(b"one")).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        let err = write_atomically(&p, |w| {
            w.write_all(b"two")?;
            Err(io::Error::other("boom"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn temp_paths_are_unique_and_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.bin");
        let (a, b) = (TempPath::beside(&dest), TempPath::beside(&dest));
        assert_ne!(a.path(), b.path());
        std::fs::write(a.path(), b"1").unwrap();
        drop(a);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        std::fs::write(b.path(), b"2").unwrap();
        b.persist(&dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"2");
    }
}
