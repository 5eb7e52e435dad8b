//! The report folder of a toy-model command: one directory that collects metrics (as pretty JSON
//! and as CSV tables), markdown notes and plots. Every file is written atomically, so a reader
//! never sees half a table even when the command is interrupted.

use std::io::Write;
use std::path::{Path, PathBuf};

use scalpel_models::files::write_atomically;

use crate::error::{Result, ToyError};

/// A directory that receives the files of one report.
#[derive(Debug, Clone)]
pub struct Report {
    dir: PathBuf,
}

impl Report {
    /// Opens the report folder `dir`, creating it (and its parents) when missing.
    pub fn create(dir: &Path) -> Result<Report> {
        std::fs::create_dir_all(dir).map_err(|e| ToyError::File {
            path: dir.display().to_string(),
            msg: format!("cannot create the report folder: {e}"),
        })?;
        Ok(Report {
            dir: dir.to_path_buf(),
        })
    }

    /// The report folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of the file `name` inside the report folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes `value` as pretty-printed JSON to `name` and returns the file's path.
    pub fn write_json<T: serde::Serialize>(&self, name: &str, value: &T) -> Result<PathBuf> {
        let path = self.path(name);
        let mut text = serde_json::to_string_pretty(value).map_err(|e| ToyError::File {
            path: path.display().to_string(),
            msg: format!("cannot serialise to JSON: {e}"),
        })?;
        text.push('\n');
        save(&path, text.as_bytes())?;
        Ok(path)
    }

    /// Writes a numeric CSV table: a header row, then one line per row. Every row must have as
    /// many cells as the header. Numbers keep full precision (the shortest text that parses back
    /// to the same `f64`); NaN becomes an empty cell.
    pub fn write_csv(&self, name: &str, header: &[&str], rows: &[Vec<f64>]) -> Result<PathBuf> {
        let path = self.path(name);
        check_widths(&path, header.len(), rows.iter().map(Vec::len))?;
        let mut text = header_line(header);
        for row in rows {
            let cells: Vec<String> = row.iter().map(|v| number_cell(*v)).collect();
            text.push_str(&cells.join(","));
            text.push('\n');
        }
        save(&path, text.as_bytes())?;
        Ok(path)
    }

    /// Writes a CSV table of text cells; cells holding a comma, a double quote or a line break
    /// are quoted as RFC 4180 asks (quotes inside doubled).
    pub fn write_csv_text(
        &self,
        name: &str,
        header: &[&str],
        rows: &[Vec<String>],
    ) -> Result<PathBuf> {
        let path = self.path(name);
        check_widths(&path, header.len(), rows.iter().map(Vec::len))?;
        let mut text = header_line(header);
        for row in rows {
            let cells: Vec<String> = row.iter().map(|c| quote_cell(c)).collect();
            text.push_str(&cells.join(","));
            text.push('\n');
        }
        save(&path, text.as_bytes())?;
        Ok(path)
    }

    /// Writes `text` (plain text or markdown) to `name` and returns the file's path.
    pub fn write_text(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.path(name);
        save(&path, text.as_bytes())?;
        Ok(path)
    }
}

/// Writes `bytes` to `path` through a temporary file that is renamed into place.
pub(crate) fn save(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, |w: &mut dyn Write| w.write_all(bytes)).map_err(|(at, e)| {
        ToyError::File {
            path: path.display().to_string(),
            msg: format!("cannot write (via {}): {e}", at.display()),
        }
    })
}

/// Fails with [`ToyError::Config`] naming `path` when a row's width differs from the header's.
fn check_widths(path: &Path, width: usize, rows: impl Iterator<Item = usize>) -> Result<()> {
    for (i, n) in rows.enumerate() {
        if n != width {
            return Err(ToyError::Config(format!(
                "{}: row {i} has {n} cells but the header has {width}",
                path.display()
            )));
        }
    }
    Ok(())
}

fn header_line(header: &[&str]) -> String {
    let cells: Vec<String> = header.iter().map(|c| quote_cell(c)).collect();
    let mut line = cells.join(",");
    line.push('\n');
    line
}

/// `{}` prints the shortest decimal that reads back to the same `f64` (infinities as `inf`).
fn number_cell(v: f64) -> String {
    if v.is_nan() {
        String::new()
    } else {
        format!("{v}")
    }
}

fn quote_cell(cell: &str) -> String {
    if cell.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_nested_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/c");
        let report = Report::create(&dir).unwrap();
        assert!(dir.is_dir());
        assert_eq!(report.dir(), dir.as_path());
        assert_eq!(report.path("x.json"), dir.join("x.json"));
        // Opening an existing folder again is fine.
        Report::create(&dir).unwrap();
    }

    #[test]
    fn json_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let report = Report::create(tmp.path()).unwrap();
        let value = serde_json::json!({
            "step": 1200,
            "loss": 0.123456789012345_f64,
            "names": ["a", "b"],
        });
        let path = report.write_json("metrics.json", &value).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains('\n'), "pretty JSON spans lines");
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, value);

        let list = vec![(1usize, 0.5f64), (2, -1.25)];
        let path = report.write_json("list.json", &list).unwrap();
        let back: Vec<(usize, f64)> =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(back, list);
    }

    #[test]
    fn csv_round_trips_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        let report = Report::create(tmp.path()).unwrap();
        let rows = vec![
            vec![0.1, 1.0 / 3.0, -2.5e-300],
            vec![1e21, f64::MIN_POSITIVE, std::f64::consts::PI],
            vec![f64::NAN, 0.0, -0.0],
        ];
        let path = report
            .write_csv("m.csv", &["step", "loss", "acc"], &rows)
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("step,loss,acc"));
        let mut n = 0;
        for (line, row) in lines.zip(&rows) {
            let cells: Vec<&str> = line.split(',').collect();
            assert_eq!(cells.len(), row.len());
            for (cell, want) in cells.iter().zip(row) {
                if want.is_nan() {
                    assert_eq!(*cell, "");
                } else {
                    let got = cell.parse::<f64>().unwrap();
                    assert_eq!(got.to_bits(), want.to_bits(), "cell {cell}");
                }
            }
            n += 1;
        }
        assert_eq!(n, rows.len());
    }

    #[test]
    fn wrong_row_width_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let report = Report::create(tmp.path()).unwrap();
        let err = report
            .write_csv("bad.csv", &["a", "b"], &[vec![1.0, 2.0], vec![3.0]])
            .unwrap_err();
        assert!(matches!(err, ToyError::Config(_)));
        assert!(err.to_string().contains("bad.csv"), "{err}");
        assert!(!report.path("bad.csv").exists());

        let err = report
            .write_csv_text("bad_text.csv", &["a"], &[vec!["x".into(), "y".into()]])
            .unwrap_err();
        assert!(err.to_string().contains("bad_text.csv"), "{err}");
    }

    #[test]
    fn text_csv_quotes_special_cells() {
        let tmp = tempfile::tempdir().unwrap();
        let report = Report::create(tmp.path()).unwrap();
        let rows = vec![
            vec!["plain".to_string(), "a,b".to_string()],
            vec!["say \"hi\"".to_string(), "two\nlines".to_string()],
        ];
        let path = report
            .write_csv_text("t.csv", &["name", "note, long"], &rows)
            .unwrap();
        let text = std::fs::read_to_string(path).unwrap();
        assert_eq!(
            text,
            "name,\"note, long\"\nplain,\"a,b\"\n\"say \"\"hi\"\"\",\"two\nlines\"\n"
        );
    }

    #[test]
    fn writes_text() {
        let tmp = tempfile::tempdir().unwrap();
        let report = Report::create(tmp.path()).unwrap();
        let path = report.write_text("README.md", "# Report\n\nok\n").unwrap();
        assert_eq!(std::fs::read_to_string(path).unwrap(), "# Report\n\nok\n");
        // Overwriting replaces the whole file.
        let path = report.write_text("README.md", "short").unwrap();
        assert_eq!(std::fs::read_to_string(path).unwrap(), "short");
    }
}
