//! Where each object and field of an intent came from: the source files and a
//! map from (object, field path) to a byte range in one of them.
//!
//! The intent model itself carries no positions, so two intents compare equal
//! whatever their layout; positions live here, beside it, for diagnostics.

use std::collections::HashMap;
use std::ops::Range;

use super::Kind;
use super::tree::Node;

/// A YAML file (or an in-memory document) that an intent was read from.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
    line_starts: Vec<usize>,
}

impl SourceFile {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        let text = text.into();
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self { name: name.into(), text, line_starts }
    }

    /// Byte offset of a 1-based line and a 0-based column counted in characters
    /// (the parser's markers count characters, the renderer wants bytes).
    pub fn offset(&self, line: usize, col_chars: usize) -> usize {
        let Some(&start) = self.line_starts.get(line.saturating_sub(1)) else {
            return self.text.len();
        };
        self.text[start..].char_indices().nth(col_chars).map_or(self.text.len(), |(i, _)| start + i)
    }

    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts[line - 1];
        let col = self.text[start..offset.min(self.text.len())].chars().count() + 1;
        (line, col)
    }
}

/// A range of bytes in one source file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    pub file: usize,
    pub range: Range<usize>,
}

/// Names one object of an intent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: Kind,
    pub name: String,
}

impl ObjectRef {
    pub fn new(kind: Kind, name: impl Into<String>) -> Self {
        Self { kind, name: name.into() }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kind == Kind::Settings {
            return f.write_str("settings");
        }
        write!(f, "{} `{}`", self.kind.word(), crate::words::quoted(&self.name))
    }
}

/// Positions of every object and field of an intent.
#[derive(Debug, Clone, Default)]
pub struct SourceMap {
    pub files: Vec<SourceFile>,
    /// Each object's document tree: field positions are looked up in it only
    /// when a diagnostic needs one.
    objects: HashMap<ObjectRef, (usize, Node)>,
    /// Fields (and their enclosing fields) that could not be read; checks
    /// that depend on them stay quiet so one mistake gives one error.
    unreadable: std::collections::HashSet<(ObjectRef, String)>,
}

impl SourceMap {
    pub fn add_file(&mut self, file: SourceFile) -> usize {
        self.files.push(file);
        self.files.len() - 1
    }

    pub fn set_object(&mut self, object: ObjectRef, file: usize, node: Node) {
        self.objects.entry(object).or_insert((file, node));
    }

    pub fn mark_unreadable(&mut self, object: &ObjectRef, field: &str) {
        let mut path = field;
        loop {
            self.unreadable.insert((object.clone(), path.to_string()));
            match path.rfind(['.', '[']) {
                Some(i) => path = &path[..i],
                None => return,
            }
        }
    }

    /// Did reading this field (or anything inside it) fail?
    pub fn is_unreadable(&self, object: &ObjectRef, field: &str) -> bool {
        // The common case (everything read) without building the key.
        !self.unreadable.is_empty() && self.unreadable.contains(&(object.clone(), field.to_string()))
    }

    /// Every object the sources declare (in no particular order).
    pub fn declared(&self) -> impl Iterator<Item = &ObjectRef> {
        self.objects.keys()
    }

    pub fn object(&self, object: &ObjectRef) -> Option<Loc> {
        self.objects.get(object).map(|(file, node)| Loc { file: *file, range: node.range.clone() })
    }

    /// The field's own position, else the nearest enclosing field's, else the
    /// object's: a diagnostic always points as close as the source allows.
    pub fn field(&self, object: &ObjectRef, field: &str) -> Option<Loc> {
        self.objects.get(object).map(|(file, node)| Loc { file: *file, range: node.at_path(field).range.clone() })
    }

    /// `file:line:column` of a location.
    pub fn describe(&self, loc: &Loc) -> String {
        let file = &self.files[loc.file];
        let (line, col) = file.line_col(loc.range.start);
        format!("{}:{line}:{col}", file.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_count_characters_not_bytes() {
        let f = SourceFile::new("x.yaml", "a: 1\ndescription: 住民記録 x\n");
        // `x` is the 18th character of line 2 (0-based col 17) but byte 23.
        let off = f.offset(2, 18);
        assert_eq!(&f.text[off..off + 1], "x");
        assert_eq!(f.line_col(off), (2, 19));
    }
}
