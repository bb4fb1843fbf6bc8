//! Reading intent files from disk: each path is a YAML file or a directory
//! whose `*.yaml` / `*.yml` files (recursively, in name order) together form
//! one intent.

use std::path::{Path, PathBuf};

use crate::allocate::Allocations;
use crate::intent::parse::{Parsed, parse_files};
use crate::intent::source::SourceFile;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not valid UTF-8: line {line}, byte {byte} ({found}); intent files are UTF-8 text")]
    NotUtf8 { path: PathBuf, line: usize, byte: usize, found: String },
    #[error("{path} holds no .yaml or .yml files")]
    Empty { path: PathBuf },
    #[error("{path} is not an allocations file: {source}")]
    Allocations { path: PathBuf, source: serde_json::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let meta = std::fs::metadata(path).map_err(|source| LoadError::Read { path: path.into(), source })?;
    if !meta.is_dir() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|source| LoadError::Read { path: path.into(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for e in entries {
        if e.is_dir() {
            collect(&e, out)?;
        } else if matches!(e.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")) {
            out.push(e);
        }
    }
    Ok(())
}

/// Reads the files behind `paths` (files or directories).
pub fn read_sources(paths: &[PathBuf]) -> Result<Vec<SourceFile>, LoadError> {
    let mut files = Vec::new();
    for p in paths {
        let before = files.len();
        collect(p, &mut files)?;
        if files.len() == before {
            return Err(LoadError::Empty { path: p.clone() });
        }
    }
    files
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).map_err(|source| LoadError::Read { path: path.clone(), source })?;
            let text = String::from_utf8(bytes).map_err(|e| not_utf8(&path, e.as_bytes(), e.utf8_error()))?;
            Ok(SourceFile::new(path.display().to_string(), text))
        })
        .collect()
}

/// Where a file stops being UTF-8: its line, the byte in that line (from
/// 1) and the offending bytes.
fn not_utf8(path: &Path, bytes: &[u8], e: std::str::Utf8Error) -> LoadError {
    let at = e.valid_up_to();
    let before = &bytes[..at];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let byte = at - before.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1) + 1;
    let bad = &bytes[at..(at + e.error_len().unwrap_or(bytes.len() - at)).min(bytes.len())];
    let found = bad.iter().map(|b| format!("0x{b:02X}")).collect::<Vec<_>>().join(" ");
    LoadError::NotUtf8 { path: path.to_path_buf(), line, byte, found }
}

/// Reads and parses one intent from files and directories.
pub fn load(paths: &[PathBuf]) -> Result<Parsed, LoadError> {
    Ok(parse_files(read_sources(paths)?))
}

/// Reads an allocations file; a missing file means nothing is allocated yet.
pub fn read_allocations(path: &Path) -> Result<Allocations, LoadError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|source| LoadError::Allocations { path: path.into(), source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Allocations::default()),
        Err(source) => Err(LoadError::Read { path: path.into(), source }),
    }
}

/// Writes an allocations file atomically (a temporary file, then a rename),
/// so an interrupted run leaves the old file whole.
pub fn write_allocations(path: &Path, alloc: &Allocations) -> Result<(), LoadError> {
    let err = |source| LoadError::Write { path: path.into(), source };
    let json = serde_json::to_string_pretty(alloc).map_err(|e| err(std::io::Error::other(e)))? + "\n";
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_utf8_says_where() {
        let path = std::env::temp_dir().join(format!("musubi-latin1-{}.yaml", std::process::id()));
        std::fs::write(&path, b"kind: Tenant\nname: t\ndescription: caf\xe9\n").expect("write");
        let e = read_sources(std::slice::from_ref(&path)).expect_err("not UTF-8");
        let _ = std::fs::remove_file(&path);
        let text = e.to_string();
        assert!(text.ends_with("is not valid UTF-8: line 3, byte 17 (0xE9); intent files are UTF-8 text"), "{text}");
    }
}
