//! Every committed fuzz seed (`fuzz/seeds/<target>/*`) through the same property checks the fuzz
//! targets run (`fuzz/src/lib.rs`, included here), on stable Rust: an input that once crashed a
//! parser is kept as a seed, so the crash stays fixed without nightly or a fuzzing run.

#[path = "../fuzz/src/lib.rs"]
mod checks;

use std::collections::BTreeSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The names of the entries of `dir` (file stems when `strip` is given), sorted.
fn names(dir: &Path, strip: Option<&str>) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| {
            let name = entry.unwrap().file_name().into_string().unwrap();
            match strip {
                Some(suffix) => name.strip_suffix(suffix).unwrap_or(&name).to_owned(),
                None => name,
            }
        })
        .collect()
}

#[test]
fn every_target_has_its_check_and_its_seeds() {
    let checked: BTreeSet<String> = checks::TARGETS
        .iter()
        .map(|(name, _)| (*name).to_owned())
        .collect();
    assert_eq!(
        names(&fuzz_dir().join("fuzz_targets"), Some(".rs")),
        checked
    );
    assert_eq!(names(&fuzz_dir().join("seeds"), None), checked);
    for name in &checked {
        let count = names(&fuzz_dir().join("seeds").join(name), None).len();
        assert!(count > 0, "target {name} has no seed");
    }
}

#[test]
fn every_seed_passes_its_targets_checks() {
    let mut failures = Vec::new();
    let mut seeds = 0;
    for (target, check) in checks::TARGETS {
        let dir = fuzz_dir().join("seeds").join(target);
        for name in names(&dir, None) {
            let bytes = std::fs::read(dir.join(&name)).unwrap();
            seeds += 1;
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(&bytes))) {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                failures.push(format!("{target}/{name}: {message}"));
            }
        }
    }
    assert!(seeds > 0, "no seeds found");
    assert!(
        failures.is_empty(),
        "{} of {seeds} seeds fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
