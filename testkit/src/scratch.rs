//! A scratch directory for the files a test makes: SQLite databases (with their `-wal` and
//! `-shm` siblings), agents files, a spawned server's output.

use std::path::{Path, PathBuf};

/// A directory of its own under the temp dir. Dropping it removes it and everything in it, also
/// when the test panics, so a test run leaves nothing behind; `tempfile` names it uniquely, so
/// tests running side by side never share one. Keep it alive for as long as anything (a pool, a
/// spawned server) may still use its files.
pub struct Scratch(tempfile::TempDir);

impl Scratch {
    pub fn new() -> Self {
        Self(
            tempfile::Builder::new()
                .prefix("callbridge-test-")
                .tempdir()
                .expect("the temp dir is writable"),
        )
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Writes `text` to `name` (which may name subdirectories) inside the directory.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("the scratch directory is writable");
        }
        std::fs::write(&path, text).expect("the scratch directory is writable");
        path
    }

    /// The `DATABASE_URL` of a SQLite database inside the directory, created on first use.
    pub fn sqlite_url(&self) -> String {
        format!(
            "sqlite://{}?mode=rwc",
            self.0.path().join("callbridge.db").display()
        )
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_and_everything_in_it_are_gone_once_dropped() {
        let scratch = Scratch::new();
        let dir = scratch.path().to_path_buf();
        let file = scratch.write("nested/file.txt", "text");
        assert!(file.starts_with(&dir) && file.exists());
        drop(scratch);
        assert!(!dir.exists(), "{} was left behind", dir.display());
    }

    #[test]
    fn a_panicking_test_leaves_nothing_behind_either() {
        let mut dir = None;
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let scratch = Scratch::new();
            scratch.write("callbridge.db-wal", "");
            dir = Some(scratch.path().to_path_buf());
            // Unwinds as a failed assertion would, without printing a panic message.
            std::panic::resume_unwind(Box::new("the test failed"));
        }));
        assert!(panicked.is_err());
        let dir = dir.unwrap();
        assert!(!dir.exists(), "{} was left behind", dir.display());
    }
}
