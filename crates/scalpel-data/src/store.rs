//! The on-disk activation store: what a harvest writes and what dictionary training reads.
//!
//! # Layout
//!
//! ```text
//! DIR/manifest.json                        what the store holds and which shards are complete
//! DIR/shards/shard-000000.safetensors      `contexts_per_shard` contexts each (the last may hold fewer)
//! DIR/shards/shard-000001.safetensors
//! ```
//!
//! A shard holds one tensor per hook, `[n_ctx_in_shard * context_size, d]` in the store's dtype
//! (row `r` is position `r % context_size` of the shard's context `r / context_size`), and
//! `tokens [n_ctx_in_shard, context_size]` u32, the token ids, so later tools can show the text
//! around any activation.
//!
//! # Crash safety
//!
//! A shard is written to `*.tmp`, fsynced and renamed before the manifest names it, and the
//! manifest itself is replaced atomically, so after a kill at any point the store on disk is
//! consistent: a shard is in the manifest only if complete. [`StoreWriter::create_or_resume`]
//! picks up where a killed harvest stopped, and shard bytes depend only on their contents
//! (safetensors sorts tensor names, we write no free-form metadata), so a resumed harvest ends
//! byte-identical to an uninterrupted one.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use candle_core::safetensors::{Load, SliceSafetensors};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};

/// Version of the manifest and shard layout; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;

const MANIFEST: &str = "manifest.json";
/// What a kill during a manifest rewrite leaves (see `write_atomic`).
const MANIFEST_TMP: &str = "manifest.json.tmp";
const SHARDS: &str = "shards";
/// Name of the token-id tensor in every shard (so no hook may have this name).
const TOKENS: &str = "tokens";

/// Element type activations are stored in; reads always return f32.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreDType {
    #[default]
    F32,
    Bf16,
    F16,
}

impl StoreDType {
    fn dtype(self) -> DType {
        match self {
            StoreDType::F32 => DType::F32,
            StoreDType::Bf16 => DType::BF16,
            StoreDType::F16 => DType::F16,
        }
    }
}

/// One hook point the store records, with its width.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HookMeta {
    pub name: String,
    pub d: usize,
}

/// Everything that defines a store's contents. A harvest resumes only into a store with an
/// identical `StoreMeta`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreMeta {
    /// Model spec as the user gave it (hub id, path...).
    pub model: String,
    /// Identifies the exact weights, e.g. a hash of config and checkpoint, supplied by the caller.
    pub model_fingerprint: String,
    /// Hook points recorded, in the order the caller lists them.
    pub hooks: Vec<HookMeta>,
    pub dtype: StoreDType,
    /// Tokens per context (`n_ctx` of the packing).
    pub context_size: usize,
    pub contexts_per_shard: usize,
    /// Number of tokens the harvest is to store (its plan; what is done is in the shard list).
    pub n_tokens: u64,
    /// Corpus spec as the user gave it.
    pub corpus: String,
    /// Hash of the corpus content, supplied by the caller.
    pub corpus_hash: String,
    /// Packing configuration, opaque to the store.
    pub packing: serde_json::Value,
    /// Readers skip the rows whose token is one of these (SAELens's `exclude_special_tokens`:
    /// BOS, EOS, padding... carry no features worth learning). Rows stay on disk, so the
    /// store's layout does not depend on the text.
    #[serde(default)]
    pub exclude_token_ids: Vec<u32>,
    /// Readers keep only these positions of each context (SAELens's `seqpos_slice`, Python
    /// slice semantics); `None` keeps all.
    #[serde(default)]
    pub seqpos_slice: Option<SeqPosSlice>,
}

/// A Python-style slice `start:end:step` over the positions of a context (negative indices
/// count from the end), as SAELens's `seqpos_slice`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SeqPosSlice {
    pub start: Option<i64>,
    pub end: Option<i64>,
    pub step: Option<i64>,
}

impl SeqPosSlice {
    /// Parses `start:end[:step]` (each part may be empty), e.g. `1:`, `:-1`, `::2`.
    pub fn parse(s: &str) -> Result<SeqPosSlice> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || DataError::Input(format!("seqpos slice `{s}`: expected start:end[:step]"));
        if !(2..=3).contains(&parts.len()) {
            return Err(bad());
        }
        let num = |p: &str| -> Result<Option<i64>> {
            if p.trim().is_empty() {
                Ok(None)
            } else {
                p.trim().parse().map(Some).map_err(|_| bad())
            }
        };
        let slice = SeqPosSlice {
            start: num(parts[0])?,
            end: num(parts[1])?,
            step: match parts.get(2) {
                Some(p) => num(p)?,
                None => None,
            },
        };
        if matches!(slice.step, Some(k) if k <= 0) {
            return Err(DataError::Input(format!(
                "seqpos slice `{s}`: step must be positive"
            )));
        }
        Ok(slice)
    }

    /// Which of `n` positions the slice keeps.
    pub fn mask(&self, n: usize) -> Vec<bool> {
        let n = n as i64;
        let clamp = |i: i64| if i < 0 { (n + i).max(0) } else { i.min(n) };
        let start = self.start.map_or(0, clamp);
        let end = self.end.map_or(n, clamp);
        let step = self.step.unwrap_or(1).max(1);
        (0..n)
            .map(|i| i >= start && i < end && (i - start) % step == 0)
            .collect()
    }
}

/// A complete shard.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// File name inside `DIR/shards/`.
    pub file: String,
    pub n_contexts: usize,
    /// Lowercase hex sha256 of the whole file.
    pub sha256: String,
}

/// `DIR/manifest.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub meta: StoreMeta,
    pub shards: Vec<ShardEntry>,
}

impl Manifest {
    /// Contexts in all complete shards.
    pub fn n_contexts(&self) -> usize {
        self.shards.iter().map(|s| s.n_contexts).sum()
    }

    /// Width of `hook`, or an error listing the hooks the store has.
    pub fn hook_d(&self, hook: &str) -> Result<usize> {
        hook_d(&self.meta.hooks, hook)
    }
}

fn hook_d(hooks: &[HookMeta], hook: &str) -> Result<usize> {
    match hooks.iter().find(|h| h.name == hook) {
        Some(h) => Ok(h.d),
        None => {
            let names: Vec<&str> = hooks.iter().map(|h| h.name.as_str()).collect();
            Err(DataError::Input(format!(
                "hook {hook:?} is not in the store (it has {names:?})"
            )))
        }
    }
}

fn shard_file_name(index: usize) -> String {
    format!("shard-{index:06}.safetensors")
}

fn store_err(path: impl Into<PathBuf>, msg: impl Into<String>) -> DataError {
    DataError::Store {
        path: path.into(),
        msg: msg.into(),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Makes renames inside `dir` durable. Directories cannot be opened for fsync on Windows.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| DataError::io(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Writes `bytes` to `path` so that a kill leaves either the old file or the new one:
/// write `path.tmp`, fsync, rename, fsync the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| DataError::io(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| DataError::io(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let text = fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| DataError::BadFile {
        path: path.clone(),
        msg: format!("not a store manifest: {e}"),
    })?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(store_err(
            &path,
            format!(
                "store format version {} (this build reads version {FORMAT_VERSION})",
                manifest.format_version
            ),
        ));
    }
    for (i, s) in manifest.shards.iter().enumerate() {
        // Fixed names also keep a hand-edited manifest from pointing outside the store.
        if s.file != shard_file_name(i) {
            return Err(store_err(
                &path,
                format!(
                    "shard {i} is named {:?}, expected {:?}",
                    s.file,
                    shard_file_name(i)
                ),
            ));
        }
        if s.n_contexts == 0 || s.n_contexts > manifest.meta.contexts_per_shard {
            return Err(store_err(
                &path,
                format!(
                    "shard {} has {} contexts (contexts_per_shard is {})",
                    s.file, s.n_contexts, manifest.meta.contexts_per_shard
                ),
            ));
        }
    }
    Ok(manifest)
}

fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<()> {
    let mut json = serde_json::to_string_pretty(manifest)
        .map_err(|e| DataError::Input(format!("manifest cannot be serialised: {e}")))?;
    json.push('\n');
    write_atomic(&dir.join(MANIFEST), json.as_bytes())
}

fn check_meta(meta: &StoreMeta) -> Result<()> {
    let bad = |msg: String| Err(DataError::Input(format!("store meta: {msg}")));
    if meta.hooks.is_empty() {
        return bad("no hooks".into());
    }
    if meta.context_size == 0 || meta.contexts_per_shard == 0 {
        return bad("context_size and contexts_per_shard must be positive".into());
    }
    let mut seen = HashSet::new();
    for h in &meta.hooks {
        if h.name == TOKENS {
            return bad(format!(
                "a hook cannot be named {TOKENS:?} (shards use it for token ids)"
            ));
        }
        if !seen.insert(h.name.as_str()) {
            return bad(format!("hook {:?} listed twice", h.name));
        }
        if h.d == 0 {
            return bad(format!("hook {:?} has d = 0", h.name));
        }
    }
    Ok(())
}

fn through_json(meta: &StoreMeta) -> Result<StoreMeta> {
    serde_json::to_string(meta)
        .and_then(|text| serde_json::from_str(&text))
        .map_err(|e| DataError::Input(format!("store meta cannot be serialised: {e}")))
}

/// Names the first field where `found` (on disk) differs from `wanted`, with both values.
fn meta_difference(found: &StoreMeta, wanted: &StoreMeta) -> String {
    let (Ok(serde_json::Value::Object(f)), Ok(serde_json::Value::Object(w))) =
        (serde_json::to_value(found), serde_json::to_value(wanted))
    else {
        return "store meta differs".into();
    };
    for (key, w_val) in &w {
        let f_val = f.get(key).unwrap_or(&serde_json::Value::Null);
        if f_val != w_val {
            return format!("store has {key} = {f_val}, the harvest asks for {key} = {w_val}");
        }
    }
    "store meta differs".into()
}

/// Appends contexts to a store, one shard at a time.
///
/// Call [`StoreWriter::finish`] at the end; a writer dropped without it (a killed harvest)
/// loses only its buffered, incomplete shard and leaves a store that `create_or_resume` continues.
/// After an error from `push`'s shard write, drop the writer and resume.
pub struct StoreWriter {
    dir: PathBuf,
    manifest: Manifest,
    /// Token ids of buffered contexts, `[n_buffered * context_size]`.
    tokens: Vec<u32>,
    /// Per hook (manifest order), one `[context_size, d]` CPU tensor in the store dtype per context.
    acts: Vec<Vec<Tensor>>,
}

impl StoreWriter {
    /// Opens `dir` for writing: creates a fresh store if `dir` has no manifest, resumes one
    /// whose meta equals `meta`, and refuses one made with different meta (naming the field).
    ///
    /// On resume, leftover `*.tmp` files and shard files not in the manifest are deleted, and a
    /// trailing partial shard (written by `finish`) is dropped so every shard but the last stays
    /// full. [`StoreWriter::contexts_done`] says how many contexts the caller must skip.
    pub fn create_or_resume(dir: impl AsRef<Path>, meta: StoreMeta) -> Result<StoreWriter> {
        let dir = dir.as_ref().to_path_buf();
        check_meta(&meta)?;
        let shards_dir = dir.join(SHARDS);
        let manifest_path = dir.join(MANIFEST);
        let manifest = if manifest_path.exists() {
            let mut manifest = read_manifest(&dir)?;
            // Compare like with like: serde_json's default float parsing may miss the last bit,
            // so the caller's meta goes through the same write-and-read as the stored one.
            let wanted = through_json(&meta)?;
            if manifest.meta != wanted {
                return Err(store_err(
                    &manifest_path,
                    format!(
                        "cannot resume: {}",
                        meta_difference(&manifest.meta, &wanted)
                    ),
                ));
            }
            // Rewrites serialise the caller's exact values, so the check stays stable.
            manifest.meta = meta;
            fs::create_dir_all(&shards_dir).map_err(|e| DataError::io(&shards_dir, e))?;
            clean_leftovers(&dir, &manifest)?;
            if manifest
                .shards
                .last()
                .is_some_and(|s| s.n_contexts < manifest.meta.contexts_per_shard)
            {
                // Manifest first, then the file: a kill in between leaves an orphan that the
                // next resume deletes.
                let dropped = manifest.shards.pop().map(|s| s.file).unwrap_or_default();
                write_manifest(&dir, &manifest)?;
                let path = shards_dir.join(&dropped);
                fs::remove_file(&path).map_err(|e| DataError::io(&path, e))?;
            }
            tracing::info!(
                dir = %dir.display(),
                shards = manifest.shards.len(),
                contexts = manifest.n_contexts(),
                "resuming activation store"
            );
            manifest
        } else {
            if let Ok(entries) = fs::read_dir(&dir) {
                for entry in entries {
                    let name = entry.map_err(|e| DataError::io(&dir, e))?.file_name();
                    if name != SHARDS && name != MANIFEST_TMP {
                        return Err(store_err(
                            &dir,
                            format!(
                                "not empty and not an activation store (found {name:?}); \
                                 give a new or empty directory"
                            ),
                        ));
                    }
                }
            }
            fs::create_dir_all(&shards_dir).map_err(|e| DataError::io(&shards_dir, e))?;
            let manifest = Manifest {
                format_version: FORMAT_VERSION,
                meta,
                shards: Vec::new(),
            };
            clean_leftovers(&dir, &manifest)?;
            write_manifest(&dir, &manifest)?;
            manifest
        };
        let n_hooks = manifest.meta.hooks.len();
        Ok(StoreWriter {
            dir,
            manifest,
            tokens: Vec::new(),
            acts: vec![Vec::new(); n_hooks],
        })
    }

    /// Contexts durably stored (in complete shards); a resumed harvest skips this many.
    pub fn contexts_done(&self) -> usize {
        self.manifest.n_contexts()
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Buffers one context and writes a shard when `contexts_per_shard` are buffered.
    ///
    /// # Shapes
    /// - `tokens`: `[context_size]`
    /// - `acts`: one `(hook name, [context_size, d])` per hook of the store, in any order, any
    ///   float dtype and device (converted to the store dtype on the CPU).
    pub fn push<S: AsRef<str>>(&mut self, tokens: &[u32], acts: &[(S, Tensor)]) -> Result<()> {
        let meta = &self.manifest.meta;
        if tokens.len() != meta.context_size {
            return Err(DataError::Input(format!(
                "store push: {} tokens, expected context_size = {}",
                tokens.len(),
                meta.context_size
            )));
        }
        // Validate everything before buffering anything, so an error leaves the writer unchanged.
        let mut by_hook: Vec<Option<&Tensor>> = vec![None; meta.hooks.len()];
        for (name, t) in acts {
            let name = name.as_ref();
            let Some(i) = meta.hooks.iter().position(|h| h.name == name) else {
                return Err(DataError::Input(format!(
                    "store push: hook {name:?} is not one of the store's hooks"
                )));
            };
            if by_hook[i].replace(t).is_some() {
                return Err(DataError::Input(format!(
                    "store push: hook {name:?} given twice"
                )));
            }
            let want = [meta.context_size, meta.hooks[i].d];
            if t.dims() != want {
                return Err(DataError::Input(format!(
                    "store push: hook {name:?} activation has shape {:?}, expected {want:?}",
                    t.dims()
                )));
            }
        }
        let mut converted = Vec::with_capacity(by_hook.len());
        for (h, t) in meta.hooks.iter().zip(&by_hook) {
            let Some(t) = t else {
                return Err(DataError::Input(format!(
                    "store push: no activation for hook {:?}",
                    h.name
                )));
            };
            // Convert on the CPU so the stored bytes do not depend on the device.
            converted.push(t.to_device(&Device::Cpu)?.to_dtype(meta.dtype.dtype())?);
        }
        self.tokens.extend_from_slice(tokens);
        for (buf, t) in self.acts.iter_mut().zip(converted) {
            buf.push(t);
        }
        if self.tokens.len() == meta.contexts_per_shard * meta.context_size {
            self.write_shard()?;
        }
        Ok(())
    }

    /// Writes the buffered contexts as a final, possibly partial, shard.
    pub fn finish(mut self) -> Result<Manifest> {
        if !self.tokens.is_empty() {
            self.write_shard()?;
        }
        Ok(self.manifest.clone())
    }

    /// Shard to `.tmp`, fsync, rename, then the manifest: never a listed but incomplete shard.
    fn write_shard(&mut self) -> Result<()> {
        let meta = &self.manifest.meta;
        let n_contexts = self.tokens.len() / meta.context_size;
        let mut tensors = std::collections::HashMap::new();
        let tokens = std::mem::take(&mut self.tokens);
        tensors.insert(
            TOKENS.to_string(),
            Tensor::from_vec(tokens, (n_contexts, meta.context_size), &Device::Cpu)?,
        );
        for (h, buf) in meta.hooks.iter().zip(&mut self.acts) {
            // [n_contexts * context_size, d]
            let t = Tensor::cat(&std::mem::take(buf), 0)?;
            tensors.insert(h.name.clone(), t);
        }
        let index = self.manifest.shards.len();
        let file = shard_file_name(index);
        let path = self.dir.join(SHARDS).join(&file);
        let tmp = self.dir.join(SHARDS).join(format!("{file}.tmp"));
        candle_core::safetensors::save(&tensors, &tmp)
            .map_err(|e| store_err(&tmp, e.to_string()))?;
        drop(tensors);
        let bytes = fs::read(&tmp).map_err(|e| DataError::io(&tmp, e))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| DataError::io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| DataError::io(&path, e))?;
        sync_dir(&self.dir.join(SHARDS))?;
        self.manifest.shards.push(ShardEntry {
            file,
            n_contexts,
            sha256: sha256_hex(&bytes),
        });
        write_manifest(&self.dir, &self.manifest)?;
        tracing::debug!(
            shard = index,
            n_contexts,
            bytes = bytes.len(),
            "wrote shard"
        );
        Ok(())
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        if !self.tokens.is_empty() {
            tracing::warn!(
                dir = %self.dir.display(),
                contexts = self.tokens.len() / self.manifest.meta.context_size,
                "activation store writer dropped with unwritten contexts; resume to redo them"
            );
        }
    }
}

/// Deletes what a killed writer may leave: `*.tmp` files and shard files the manifest does not
/// list (renamed into place just before the kill, never recorded).
fn clean_leftovers(dir: &Path, manifest: &Manifest) -> Result<()> {
    let stale_manifest = dir.join(MANIFEST_TMP);
    if stale_manifest.exists() {
        fs::remove_file(&stale_manifest).map_err(|e| DataError::io(&stale_manifest, e))?;
    }
    let shards_dir = dir.join(SHARDS);
    let listed: HashSet<&str> = manifest.shards.iter().map(|s| s.file.as_str()).collect();
    for entry in fs::read_dir(&shards_dir).map_err(|e| DataError::io(&shards_dir, e))? {
        let path = entry.map_err(|e| DataError::io(&shards_dir, e))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let ours = name.starts_with("shard-")
            && (name.ends_with(".safetensors.tmp") || name.ends_with(".safetensors"));
        if ours && !listed.contains(name) {
            tracing::info!(file = %path.display(), "deleting leftover of an interrupted harvest");
            fs::remove_file(&path).map_err(|e| DataError::io(&path, e))?;
        }
    }
    Ok(())
}

/// Where an activation row came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowPos {
    /// Index of the context in the whole store (harvest order).
    pub context: usize,
    /// Token position inside the context.
    pub position: usize,
}

/// Reads a store: checks, random-order batches for training, and per-shard access for tools.
pub struct StoreReader {
    dir: PathBuf,
    manifest: Manifest,
    /// First context of each shard in the whole store.
    first_context: Vec<usize>,
}

impl StoreReader {
    pub fn open(dir: impl AsRef<Path>) -> Result<StoreReader> {
        let dir = dir.as_ref().to_path_buf();
        let manifest = read_manifest(&dir)?;
        let first_context = manifest
            .shards
            .iter()
            .scan(0, |acc, s| {
                let first = *acc;
                *acc += s.n_contexts;
                Some(first)
            })
            .collect();
        Ok(StoreReader {
            dir,
            manifest,
            first_context,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn n_shards(&self) -> usize {
        self.manifest.shards.len()
    }

    /// Activation rows per hook (stored tokens).
    pub fn n_rows(&self) -> usize {
        self.manifest.n_contexts() * self.manifest.meta.context_size
    }

    /// Checks every shard's sha256; the error names the first bad shard.
    pub fn verify(&self) -> Result<()> {
        for i in 0..self.n_shards() {
            self.read_shard_bytes(i)?;
        }
        Ok(())
    }

    /// Refuses a store harvested from another model.
    pub fn check_model(&self, fingerprint: &str) -> Result<()> {
        let meta = &self.manifest.meta;
        if meta.model_fingerprint != fingerprint {
            return Err(store_err(
                self.dir.join(MANIFEST),
                format!(
                    "store was made by model {:?} with fingerprint {}, not by this model \
                     (fingerprint {fingerprint})",
                    meta.model, meta.model_fingerprint
                ),
            ));
        }
        Ok(())
    }

    /// Loads shard `index`, checking its sha256.
    pub fn shard(&self, index: usize) -> Result<Shard> {
        let bytes = self.read_shard_bytes(index)?;
        Ok(Shard {
            path: self.shard_path(index)?,
            bytes,
            first_context: self.first_context[index],
            n_contexts: self.manifest.shards[index].n_contexts,
            context_size: self.manifest.meta.context_size,
            hooks: self.manifest.meta.hooks.clone(),
        })
    }

    /// Token ids of shard `index`, `[n_contexts, context_size]` u32.
    pub fn tokens(&self, index: usize) -> Result<Tensor> {
        self.shard(index)?.tokens()
    }

    /// One epoch of `[batch_size, d]` f32 CPU batches of `hook`, every stored row exactly once
    /// (the last batch may be smaller).
    ///
    /// Shards are visited in a seeded random order; rows of up to `shuffle_buffer_shards`
    /// shards are pooled and drawn uniformly with a seeded RNG, so memory stays within
    /// `shuffle_buffer_shards + n_loaders` shards of one hook. Each shard's sha256 is checked on
    /// load.
    ///
    /// sha256 dominates loading (~1.5 GB/s a core), so shards load on up to 4 threads, leaving
    /// a core to draw batches.
    pub fn batches(
        &self,
        hook: &str,
        batch_size: usize,
        seed: u64,
        shuffle_buffer_shards: usize,
    ) -> Result<Batches> {
        // Hashing is most of a shard's loading cost; one loader per core keeps the drawing
        // thread fed (it only copies rows out).
        let n_loaders = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 4);
        self.batches_with_loaders(hook, batch_size, seed, shuffle_buffer_shards, n_loaders)
    }

    /// [`StoreReader::batches`] with `n_loaders` loader threads; the batches do not depend on it.
    pub fn batches_with_loaders(
        &self,
        hook: &str,
        batch_size: usize,
        seed: u64,
        shuffle_buffer_shards: usize,
        n_loaders: usize,
    ) -> Result<Batches> {
        let d = self.manifest.hook_d(hook)?;
        if batch_size == 0 || shuffle_buffer_shards == 0 || n_loaders == 0 {
            return Err(DataError::Input(
                "batch_size, shuffle_buffer_shards and n_loaders must be positive".into(),
            ));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..self.n_shards()).collect();
        order.shuffle(&mut rng);
        let meta = &self.manifest.meta;
        let files: Vec<ShardFile> = order
            .iter()
            .map(|&i| ShardFile {
                path: self.dir.join(SHARDS).join(&self.manifest.shards[i].file),
                sha256: self.manifest.shards[i].sha256.clone(),
                rows: self.manifest.shards[i].n_contexts * meta.context_size,
                context_size: meta.context_size,
                exclude: meta.exclude_token_ids.clone(),
                positions: meta.seqpos_slice.map(|s| s.mask(meta.context_size)),
            })
            .collect();
        let pending_rows = files.iter().map(|f| f.rows).collect();
        // Each thread holds at most one decoded shard (the channel has no buffer): memory stays
        // within `shuffle_buffer_shards + n_loaders` shards of one hook.
        let mut per_loader: Vec<Vec<ShardFile>> = (0..n_loaders).map(|_| Vec::new()).collect();
        for (k, f) in files.into_iter().enumerate() {
            per_loader[k % n_loaders].push(f);
        }
        let mut lanes = Vec::with_capacity(n_loaders);
        for files in per_loader {
            let (tx, rx) = sync_channel(0);
            let hook = hook.to_string();
            std::thread::Builder::new()
                .name("store-loader".into())
                .spawn(move || load_shards(files, hook, d, tx))
                .map_err(|e| DataError::io(&self.dir, e))?;
            lanes.push(rx);
        }
        let capacity_rows = shuffle_buffer_shards * meta.contexts_per_shard * meta.context_size;
        Ok(Batches {
            lanes,
            received: 0,
            pending_rows,
            d,
            batch_size,
            capacity_rows,
            pool: Vec::new(),
            rng,
            failed: false,
        })
    }

    fn shard_path(&self, index: usize) -> Result<PathBuf> {
        match self.manifest.shards.get(index) {
            Some(s) => Ok(self.dir.join(SHARDS).join(&s.file)),
            None => Err(DataError::Input(format!(
                "shard {index} does not exist (the store has {})",
                self.n_shards()
            ))),
        }
    }

    fn read_shard_bytes(&self, index: usize) -> Result<Vec<u8>> {
        let path = self.shard_path(index)?;
        let mut bytes = Vec::new();
        read_verified(&path, &self.manifest.shards[index].sha256, &mut bytes)?;
        Ok(bytes)
    }
}

/// Reads `path` into `buf` (reusing its allocation) and checks its sha256.
fn read_verified(path: &Path, sha256: &str, buf: &mut Vec<u8>) -> Result<()> {
    buf.clear();
    File::open(path)
        .and_then(|mut f| f.read_to_end(buf))
        .map_err(|e| DataError::io(path, e))?;
    let found = sha256_hex(buf);
    if found != sha256 {
        return Err(store_err(
            path,
            format!("shard is corrupt: sha256 {found}, manifest says {sha256}"),
        ));
    }
    Ok(())
}

/// The token ids of a shard file, flattened, checked to be u32 of shape `want`.
fn shard_tokens(path: &Path, bytes: &[u8], want: [usize; 2]) -> Result<Vec<u32>> {
    let st = parse_shard(path, bytes)?;
    let t = st
        .load(TOKENS, &Device::Cpu)
        .map_err(|e| store_err(path, format!("tensor {TOKENS:?}: {e}")))?;
    if t.dims() != want || t.dtype() != DType::U32 {
        return Err(store_err(
            path,
            format!(
                "tensor {TOKENS:?} is {:?} {:?}, expected u32 {want:?}",
                t.dtype(),
                t.dims()
            ),
        ));
    }
    Ok(t.flatten_all()?.to_vec1::<u32>()?)
}

/// Maps `path` read-only and checks its sha256: no copy through a read buffer.
fn map_verified(path: &Path, sha256: &str) -> Result<memmap2::Mmap> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    // SAFETY: shards are written once (temp file + rename) and never modified in place; a
    // concurrent writer would be caught by the checksum below.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| DataError::io(path, e))?;
    let found = sha256_hex(&map);
    if found != sha256 {
        return Err(store_err(
            path,
            format!("shard is corrupt: sha256 {found}, manifest says {sha256}"),
        ));
    }
    Ok(map)
}

fn parse_shard<'a>(path: &Path, bytes: &'a [u8]) -> Result<SliceSafetensors<'a>> {
    SliceSafetensors::new(bytes)
        .map_err(|e| store_err(path, format!("not a safetensors file: {e}")))
}

/// Appends the rows of `hook` in shard file `bytes` to `out` as f32, checking the shape.
fn append_rows(
    path: &Path,
    bytes: &[u8],
    hook: &str,
    shape: [usize; 2],
    out: &mut Vec<f32>,
) -> Result<()> {
    let st = parse_shard(path, bytes)?;
    let view = st
        .get(hook)
        .map_err(|e| store_err(path, format!("hook {hook:?}: {e}")))?;
    if view.shape() != shape {
        return Err(store_err(
            path,
            format!(
                "hook {hook:?} has shape {:?}, expected {shape:?}",
                view.shape()
            ),
        ));
    }
    let dtype = DType::try_from(view.dtype())
        .map_err(|e| store_err(path, format!("hook {hook:?}: {e}")))?;
    if dtype == DType::F32 && cfg!(target_endian = "little") {
        // Fast path: one memcpy from the file bytes (safetensors is little-endian, and so is
        // this machine); the bytes need not be aligned.
        let src = view.data();
        let n = src.len() / 4;
        let start = out.len();
        out.reserve(n);
        // SAFETY: `reserve` made room for `n` more f32s; every byte of them is written by the
        // copy before `set_len`, and any bit pattern is a valid f32.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                out.as_mut_ptr().add(start).cast::<u8>(),
                n * 4,
            );
            out.set_len(start + n);
        }
    } else {
        let t = view.load(&Device::Cpu)?.to_dtype(DType::F32)?;
        out.extend(t.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(())
}

/// A loaded, checksum-verified shard.
pub struct Shard {
    path: PathBuf,
    bytes: Vec<u8>,
    first_context: usize,
    n_contexts: usize,
    context_size: usize,
    hooks: Vec<HookMeta>,
}

impl Shard {
    pub fn n_contexts(&self) -> usize {
        self.n_contexts
    }

    /// Where row `row` of this shard's activation tensors came from.
    pub fn locate(&self, row: usize) -> RowPos {
        RowPos {
            context: self.first_context + row / self.context_size,
            position: row % self.context_size,
        }
    }

    /// Token ids, `[n_contexts, context_size]` u32.
    pub fn tokens(&self) -> Result<Tensor> {
        let want = [self.n_contexts, self.context_size];
        let ids = shard_tokens(&self.path, &self.bytes, want)?;
        Ok(Tensor::from_vec(ids, (want[0], want[1]), &Device::Cpu)?)
    }

    /// Activations of `hook`, `[n_contexts * context_size, d]` f32.
    pub fn activations(&self, hook: &str) -> Result<Tensor> {
        let shape = [
            self.n_contexts * self.context_size,
            hook_d(&self.hooks, hook)?,
        ];
        let mut rows = Vec::with_capacity(shape[0] * shape[1]);
        append_rows(&self.path, &self.bytes, hook, shape, &mut rows)?;
        Ok(Tensor::from_vec(rows, &shape, &Device::Cpu)?)
    }
}

/// Iterator of shuffled batches; see [`StoreReader::batches`]. Stops after the first error.
///
/// Loader threads read, check and decode the next shards while batches are drawn.
pub struct Batches {
    /// Decoded shards, `[rows, d]` row-major: shard `k` of the visiting order comes from
    /// `lanes[k % lanes.len()]`, so the order stays the seeded one.
    lanes: Vec<Receiver<Result<Vec<f32>>>>,
    /// Shards received so far.
    received: usize,
    /// Rows of each shard not yet received, in visiting order.
    pending_rows: std::collections::VecDeque<usize>,
    d: usize,
    batch_size: usize,
    /// Rows the pool may hold before the next shard is taken (`shuffle_buffer_shards` full shards).
    capacity_rows: usize,
    /// The pool: every received row not yet yielded, `[rows, d]` row-major. A drawn row's slot
    /// takes the last row (a swap-remove), so memory stays at `capacity_rows` plus one shard.
    /// (Indexing rows inside their shards instead would keep a shard alive until its last row is
    /// drawn: with uniform draws that is about ln(rows per shard) pool lifetimes, ~9× the
    /// buffer.)
    pool: Vec<f32>,
    rng: StdRng,
    failed: bool,
}

/// One shard as the loader thread needs it: owned, so the thread can outlive the borrow.
struct ShardFile {
    path: PathBuf,
    sha256: String,
    rows: usize,
    context_size: usize,
    /// Rows holding these tokens are dropped.
    exclude: Vec<u32>,
    /// Positions kept within each context (all when `None`).
    positions: Option<Vec<bool>>,
}

/// Loads `files` in order into `tx` until done, an error (sent, then stop) or a dropped receiver.
fn load_shards(files: Vec<ShardFile>, hook: String, d: usize, tx: SyncSender<Result<Vec<f32>>>) {
    for f in files {
        let rows = map_verified(&f.path, &f.sha256).and_then(|bytes| {
            let mut rows = Vec::with_capacity(f.rows * d);
            append_rows(&f.path, &bytes, &hook, [f.rows, d], &mut rows)?;
            if !f.exclude.is_empty() || f.positions.is_some() {
                let tokens =
                    shard_tokens(&f.path, &bytes, [f.rows / f.context_size, f.context_size])?;
                let mut kept = 0;
                for (r, t) in tokens.iter().enumerate() {
                    let position_kept = f
                        .positions
                        .as_ref()
                        .is_none_or(|keep| keep[r % f.context_size]);
                    if position_kept && !f.exclude.contains(t) {
                        rows.copy_within(r * d..(r + 1) * d, kept * d);
                        kept += 1;
                    }
                }
                rows.truncate(kept * d);
            }
            Ok(rows)
        });
        let failed = rows.is_err();
        if tx.send(rows).is_err() || failed {
            return;
        }
    }
}

impl Batches {
    /// Takes shards while they fit in the pool (or the pool cannot fill a batch).
    fn refill(&mut self) -> Result<()> {
        while let Some(&rows) = self.pending_rows.front() {
            let pool_rows = self.pool.len() / self.d;
            if pool_rows + rows > self.capacity_rows && pool_rows >= self.batch_size {
                break;
            }
            let lane = &self.lanes[self.received % self.lanes.len()];
            let shard = lane.recv().map_err(|_| {
                DataError::Input("activation store: shard loader thread stopped".into())
            })??;
            self.pool.extend_from_slice(&shard);
            self.pending_rows.pop_front();
            self.received += 1;
        }
        Ok(())
    }
}

impl Iterator for Batches {
    type Item = Result<Tensor>;

    fn next(&mut self) -> Option<Result<Tensor>> {
        if self.failed {
            return None;
        }
        if let Err(e) = self.refill() {
            self.failed = true;
            return Some(Err(e));
        }
        let d = self.d;
        let n = self.batch_size.min(self.pool.len() / d);
        if n == 0 {
            return None;
        }
        let mut out = Vec::with_capacity(n * d);
        for _ in 0..n {
            // Draw a uniform row of the pool; the last row fills its slot (swap-remove).
            let rows = self.pool.len() / d;
            let i = self.rng.gen_range(0..rows);
            out.extend_from_slice(&self.pool[i * d..(i + 1) * d]);
            let last = rows - 1;
            if i != last {
                self.pool.copy_within(last * d..rows * d, i * d);
            }
            self.pool.truncate(last * d);
        }
        // [n, d]
        Some(Tensor::from_vec(out, (n, d), &Device::Cpu).map_err(DataError::from))
    }
}
