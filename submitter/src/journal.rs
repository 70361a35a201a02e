//! What an interrupted submission leaves on this machine so that `warren submit --resume` can
//! finish it: the batch's identity and which tasks RabbitMQ confirmed. Tasks are identified by
//! their position in the task file (`seq`), so the same file gives the same tasks again.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::seqset::SeqSet;
use crate::spec::TaskSpec;
use warren_broker::protocol;

/// An unfinished submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    /// Batch id.
    pub batch: String,
    /// The batch's token (see docs/protocol.md).
    pub token: String,
    /// Task queue.
    pub queue: String,
    /// Tasks in the batch.
    pub total: u32,
    /// `seq` ranges (inclusive) that RabbitMQ confirmed.
    pub confirmed: Vec<[u32; 2]>,
    /// [`fingerprint`] of the batch's tasks, so that a resume with another file is refused.
    pub fingerprint: String,
}

/// SHA-256 over the tasks in order, built one task at a time: the same task lines give the same
/// fingerprint.
#[derive(Default)]
pub struct Fingerprint(sha2::Sha256);

impl Fingerprint {
    /// Adds the next task.
    pub fn add(&mut self, spec: &TaskSpec) {
        use sha2::Digest;
        // Serializing a plain struct of strings, numbers and JSON values cannot fail.
        self.0.update(serde_json::to_vec(spec).unwrap_or_default());
        self.0.update(b"\n");
    }

    /// The fingerprint, as hex.
    pub fn finish(self) -> String {
        use sha2::Digest;
        self.0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl Journal {
    /// The record of a new batch for `queue` of `total` tasks: a fresh id and token, nothing
    /// confirmed yet.
    pub fn new_batch(queue: &str, total: u32, fingerprint: String) -> Self {
        Self {
            batch: protocol::new_id(),
            token: protocol::new_token(),
            queue: queue.to_string(),
            total,
            confirmed: Vec::new(),
            fingerprint,
        }
    }

    /// How many tasks were confirmed.
    pub fn confirmed_count(&self) -> u64 {
        SeqSet::from_ranges(&self.confirmed).len()
    }

    /// Where the journal of `batch` is kept: `$WARREN_STATE_DIR`, else `$XDG_STATE_HOME/warren`,
    /// else `~/.local/state/warren`, else the temporary folder.
    pub fn path(batch: &str) -> PathBuf {
        let dir = std::env::var_os("WARREN_STATE_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("XDG_STATE_HOME").map(|d| PathBuf::from(d).join("warren")))
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/warren"))
            })
            .unwrap_or_else(|| std::env::temp_dir().join("warren"));
        // Batch ids come from the command line: keep them from naming other folders.
        let safe: String = batch
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        dir.join("batches").join(format!("{safe}.json"))
    }

    /// Writes the journal (it holds the batch's token) readable by its owner only: the file 0600
    /// in folders 0700. Returns where.
    pub fn save(&self) -> std::io::Result<PathBuf> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        let path = Self::path(&self.batch);
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        // A file left by an older version keeps its mode on open: set it.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(&text)?;
        Ok(path)
    }

    /// Reads the journal of `batch`, saying what to do when there is none.
    pub fn load(batch: &str) -> Result<Self, String> {
        let path = Self::path(batch);
        let text = std::fs::read(&path).map_err(|e| {
            format!(
                "no unfinished submission of batch {batch} is recorded on this machine ({}: {e}); \
                 --resume works where the interrupted `warren submit` ran",
                path.display()
            )
        })?;
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Deletes the journal once the batch is complete.
    pub fn remove(batch: &str) {
        let _ = std::fs::remove_file(Self::path(batch));
    }
}
