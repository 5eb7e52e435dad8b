//! Corpora: streams of documents read from plain text, JSONL and Parquet files, or from a
//! directory of them.
//!
//! Readers stream: at most one document (one JSONL line, one Parquet batch of
//! [`PARQUET_BATCH_ROWS`] rows) is held at a time, so a corpus may be far larger than memory.
//! A reader stops after its first error: what follows a truncated file or a bad line is not
//! trustworthy, and the caller decides whether to go on.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};

/// One document of a corpus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub text: String,
    /// Where it came from: the file of a `.txt` document, the `"source"` field of a JSONL line.
    pub source: Option<String>,
}

/// A stream of documents, as [`open`] returns it.
pub type Documents = Box<dyn Iterator<Item = Result<Document>> + Send>;

/// Rows per Parquet batch: small enough that a batch of long documents stays a few MB.
pub const PARQUET_BATCH_ROWS: usize = 256;

/// The file formats a corpus may hold, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// One document per file.
    Txt,
    /// One JSON object per line.
    Jsonl,
    /// One document per row of a string column.
    Parquet,
}

impl Format {
    fn of(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "txt" => Some(Format::Txt),
            "jsonl" => Some(Format::Jsonl),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }
}

/// Opens a corpus: a `.txt` file (one document), a `.jsonl` file (one JSON object per line, the
/// text under `text_field` and an optional `"source"`; blank lines skipped), a `.parquet` file
/// (the string column `text_field`; null rows skipped), or a directory, read as every such file
/// under it (recursively, hidden entries skipped) in sorted path order.
///
/// A single file is checked now (it exists, its format, its Parquet column); the files of a
/// directory are opened one by one as the stream reaches them.
pub fn open(spec: &Path, text_field: &str) -> Result<Documents> {
    let meta = std::fs::metadata(spec).map_err(|e| DataError::io(spec, e))?;
    let docs: Documents = if meta.is_dir() {
        let field = text_field.to_string();
        Box::new(corpus_files(spec)?.into_iter().flat_map(move |path| {
            match open_file(&path, &field) {
                Ok(docs) => docs,
                Err(e) => Box::new(std::iter::once(Err(e))) as Documents,
            }
        }))
    } else {
        open_file(spec, text_field)?
    };
    // Stop at the first error, and never poll the readers again after it.
    Ok(Box::new(
        docs.scan(false, |failed, doc| {
            if *failed {
                return None;
            }
            *failed = doc.is_err();
            Some(doc)
        })
        .fuse(),
    ))
}

/// A SHA-256 (hex) over the corpus files [`open`] would read: for each, in order, its path
/// relative to `spec` (its file name when `spec` is a file), its size and its bytes, streamed.
/// It names the corpus an activation store was made from; moving the corpus keeps it.
pub fn corpus_hash(spec: &Path) -> Result<String> {
    let meta = std::fs::metadata(spec).map_err(|e| DataError::io(spec, e))?;
    let (root, files) = if meta.is_dir() {
        (spec, corpus_files(spec)?)
    } else {
        format_of(spec)?;
        (
            spec.parent().unwrap_or(Path::new("")),
            vec![spec.to_path_buf()],
        )
    };
    let mut hasher = Sha256::new();
    hasher.update(b"scalpel-corpus-v1\0");
    for path in &files {
        let rel = path.strip_prefix(root).unwrap_or(path);
        // `/` between components whatever the platform, so the hash travels.
        let name: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        hasher.update(name.join("/").as_bytes());
        hasher.update([0u8]);
        let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let size = file.metadata().map_err(|e| DataError::io(path, e))?.len();
        hasher.update(size.to_le_bytes());
        let copied = std::io::copy(&mut (&mut file).take(size), &mut hasher)
            .map_err(|e| DataError::io(path, e))?;
        if copied != size {
            return Err(DataError::BadFile {
                path: path.clone(),
                msg: format!("changed while hashing ({copied} of {size} bytes read)"),
            });
        }
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn format_of(path: &Path) -> Result<Format> {
    Format::of(path).ok_or_else(|| {
        DataError::Input(format!(
            "{}: a corpus is a .txt, .jsonl or .parquet file, or a directory of them",
            path.display()
        ))
    })
}

/// Every corpus file under `dir`, recursively, sorted by path; hidden entries are skipped.
fn corpus_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| DataError::io(&d, e))? {
            let path = entry.map_err(|e| DataError::io(&d, e))?.path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            // `metadata` follows symlinks, so a linked folder is read like a real one.
            let meta = std::fs::metadata(&path).map_err(|e| DataError::io(&path, e))?;
            if meta.is_dir() {
                pending.push(path);
            } else if Format::of(&path).is_some() {
                files.push(path);
            }
        }
    }
    if files.is_empty() {
        return Err(DataError::BadFile {
            path: dir.to_path_buf(),
            msg: "no .txt, .jsonl or .parquet files under this directory".into(),
        });
    }
    files.sort();
    Ok(files)
}

fn open_file(path: &Path, text_field: &str) -> Result<Documents> {
    Ok(match format_of(path)? {
        Format::Txt => {
            let path = path.to_path_buf();
            Box::new(std::iter::once_with(move || read_txt(&path)))
        }
        Format::Jsonl => Box::new(JsonlDocs {
            lines: BufReader::new(File::open(path).map_err(|e| DataError::io(path, e))?).lines(),
            path: path.to_path_buf(),
            line_no: 0,
            field: text_field.to_string(),
        }),
        Format::Parquet => Box::new(ParquetDocs::open(path, text_field)?),
    })
}

fn read_txt(path: &Path) -> Result<Document> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| DataError::BadFile {
        path: path.to_path_buf(),
        msg: format!("not UTF-8: {e}"),
    })?;
    Ok(Document {
        text,
        source: Some(path.display().to_string()),
    })
}

/// The documents of a JSONL file, one line at a time.
struct JsonlDocs {
    lines: std::io::Lines<BufReader<File>>,
    path: PathBuf,
    /// 1-based number of the last line read.
    line_no: usize,
    field: String,
}

impl JsonlDocs {
    fn bad(&self, msg: String) -> DataError {
        DataError::BadFile {
            path: self.path.clone(),
            msg: format!("line {}: {msg}", self.line_no),
        }
    }

    fn parse(&self, line: &str) -> Result<Document> {
        let mut obj: Map<String, Value> =
            serde_json::from_str(line).map_err(|e| self.bad(format!("not a JSON object: {e}")))?;
        let text = match obj.remove(&self.field) {
            Some(Value::String(text)) => text,
            Some(other) => {
                return Err(self.bad(format!(
                    "field `{}` is {}, not a string",
                    self.field,
                    json_kind(&other)
                )))
            }
            None => {
                let fields: Vec<&str> = obj.keys().map(String::as_str).collect();
                return Err(self.bad(format!(
                    "no field `{}` (fields: {})",
                    self.field,
                    fields.join(", ")
                )));
            }
        };
        let source = match obj.remove("source") {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        Ok(Document { text, source })
    }
}

impl Iterator for JsonlDocs {
    type Item = Result<Document>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let line = self.lines.next()?;
            self.line_no += 1;
            let line = match line {
                Ok(line) => line,
                Err(e) => return Some(Err(self.bad(e.to_string()))),
            };
            if !line.trim().is_empty() {
                return Some(self.parse(&line));
            }
        }
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The documents of one string column of a Parquet file, read batch by batch.
struct ParquetDocs {
    path: PathBuf,
    reader: ParquetRecordBatchReader,
    /// The text column of the current batch, and the next row to read from it.
    column: Option<ArrayRef>,
    row: usize,
}

impl ParquetDocs {
    fn open(path: &Path, text_field: &str) -> Result<Self> {
        let bad = |msg: String| DataError::BadFile {
            path: path.to_path_buf(),
            msg,
        };
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
        let fields = builder.schema().fields();
        let Some(index) = fields.iter().position(|f| f.name() == text_field) else {
            let names: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
            return Err(bad(format!(
                "no column `{text_field}` (columns: {})",
                names.join(", ")
            )));
        };
        let data_type = fields[index].data_type();
        if !matches!(
            data_type,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        ) {
            return Err(bad(format!(
                "column `{text_field}` holds {data_type}, not strings"
            )));
        }
        // Top-level arrow fields are the Parquet schema's roots, in order: read only ours.
        let mask = ProjectionMask::roots(builder.parquet_schema(), [index]);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(PARQUET_BATCH_ROWS)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            column: None,
            row: 0,
        })
    }
}

/// Row `i` of a string column, `None` when null.
fn text_at(column: &dyn Array, i: usize) -> Option<&str> {
    if column.is_null(i) {
        return None;
    }
    if let Some(a) = column.as_string_opt::<i32>() {
        Some(a.value(i))
    } else if let Some(a) = column.as_string_opt::<i64>() {
        Some(a.value(i))
    } else {
        column.as_string_view_opt().map(|a| a.value(i))
    }
}

impl Iterator for ParquetDocs {
    type Item = Result<Document>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(column) = &self.column {
                while self.row < column.len() {
                    self.row += 1;
                    if let Some(text) = text_at(column.as_ref(), self.row - 1) {
                        return Some(Ok(Document {
                            text: text.to_string(),
                            source: None,
                        }));
                    }
                }
            }
            match self.reader.next()? {
                Ok(batch) => {
                    self.column = Some(batch.column(0).clone());
                    self.row = 0;
                }
                Err(e) => {
                    return Some(Err(DataError::BadFile {
                        path: self.path.clone(),
                        msg: e.to_string(),
                    }))
                }
            }
        }
    }
}

/// The local file or folder a corpus spec names:
/// - `demo` / `demo:heldout`: the built-in demo corpus (built on first use, see [`crate::demo`]);
/// - `hf-dataset:org/name[@revision][:prefix]`: the `.parquet`/`.jsonl` files of a Hugging Face
///   dataset repository (under `prefix`, e.g. `data/`), fetched into the Hugging Face cache
///   (`HF_HOME`; `HF_HUB_OFFLINE=1` reads the cache only);
/// - anything else: a path to a file or folder for [`open`].
pub fn resolve(spec: &str) -> Result<PathBuf> {
    match spec {
        "demo" => return Ok(crate::demo::ensure_demo_corpus()?.join("train.jsonl")),
        "demo:heldout" => return Ok(crate::demo::ensure_demo_corpus()?.join("heldout.jsonl")),
        _ => {}
    }
    let Some(rest) = spec.strip_prefix("hf-dataset:") else {
        return Ok(PathBuf::from(spec));
    };
    let (repo, prefix) = match rest.split_once(':') {
        Some((repo, prefix)) => (repo, prefix),
        None => (rest, ""),
    };
    let (id, revision) = scalpel_models::hub::parse_hub_id(repo).map_err(|why| {
        DataError::Input(format!(
            "`{spec}`: {why} (expected hf-dataset:org/name[@revision][:prefix])"
        ))
    })?;
    if prefix.contains("..") || prefix.starts_with('/') {
        return Err(DataError::Input(format!("`{spec}`: bad prefix `{prefix}`")));
    }
    Ok(scalpel_models::hub::dataset_snapshot(id, revision, prefix)?)
}
