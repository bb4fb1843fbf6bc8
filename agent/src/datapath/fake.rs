//! An in-memory datapath for tests and the fleet simulator. It refuses every
//! illegal operation (deleting what does not exist, using an interface
//! before creating it, two domains on one table) and counts writes. With a
//! file, its state survives the agent like a kernel's would.

use std::path::PathBuf;

use super::{Datapath, DatapathError, Op, Owned, step};

#[derive(Debug, Default)]
pub struct Fake {
    owned: Owned,
    writes: u64,
    file: Option<PathBuf>,
}

impl Fake {
    pub fn new() -> Self {
        Fake::default()
    }

    /// A fake whose state lives in `file` (read now, written after every apply).
    pub fn persistent(file: PathBuf) -> Result<Self, DatapathError> {
        let owned = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| DatapathError::Invalid(format!("{}: {e}", file.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Owned::default(),
            Err(e) => return Err(DatapathError::io(file.display().to_string(), e)),
        };
        Ok(Fake { owned, writes: 0, file: Some(file) })
    }

    pub fn owned(&self) -> &Owned {
        &self.owned
    }
}

impl Datapath for Fake {
    fn observe(&mut self) -> Result<Owned, DatapathError> {
        Ok(self.owned.clone())
    }

    /// Planned against what it holds, without the copy an observation is.
    fn diff(&mut self, desired: &Owned) -> Result<Vec<Op>, DatapathError> {
        Ok(super::plan(&self.owned, desired))
    }

    fn apply(&mut self, ops: &[Op]) -> Result<(), DatapathError> {
        let mut result = Ok(());
        for op in ops {
            result = step(&mut self.owned, op);
            if result.is_err() {
                break;
            }
            self.writes += 1;
        }
        if let Some(file) = &self.file
            && !ops.is_empty()
        {
            let json = serde_json::to_vec(&self.owned).map_err(|e| DatapathError::Internal(e.to_string()))?;
            let tmp = file.with_extension("tmp");
            std::fs::write(&tmp, json)
                .and_then(|()| std::fs::rename(&tmp, file))
                .map_err(|e| DatapathError::io(file.display().to_string(), e))?;
        }
        result
    }

    fn blocks(&self) -> bool {
        // In memory, or one small file when persistent: not worth a thread.
        false
    }

    fn writes(&self) -> u64 {
        self.writes
    }
}
