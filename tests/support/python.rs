//! The Python of the libtorch environment, where the project's model tools and
//! the reference implementations (torch, sentence-transformers, huggingface_hub)
//! run.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `cmd` and asserts it succeeded (saying `what` failed, with its stderr,
/// if not); its stdout, trimmed.
pub fn stdout_of(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The Python of the libtorch environment (`libtorch/install --python`).
pub fn torch_python() -> PathBuf {
    let install = Path::new(env!("CARGO_MANIFEST_DIR")).join("libtorch/install");
    PathBuf::from(stdout_of(
        Command::new(&install).arg("--python"),
        "libtorch/install --python",
    ))
}

/// Runs `script` with the torch Python, with `args`, and asserts it succeeded.
/// (`torch.jit.script` reads the source of what it compiles, so the script is
/// written to a file rather than passed with `-c`.)
pub fn run_python(script: &str, args: &[&Path]) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("script.py");
    std::fs::write(&file, script).unwrap();
    stdout_of(
        Command::new(torch_python())
            .arg(&file)
            .args(args)
            .env("PYTHONWARNINGS", "ignore"),
        "python",
    );
}

/// A folder `make` writes once per machine and script: kept under
/// `<target>/<name>/<hash of script>` (the temp folder's `harness-<name>` when
/// not run from cargo's target folder), written into a temporary folder beside it
/// and renamed into place, so test binaries (or benches) running at once never
/// see a half-written one. `marker` is a file `make` must write; it tells a made
/// folder from none.
pub fn made_once(name: &str, script: &str, marker: &str, make: impl FnOnce(&Path)) -> PathBuf {
    let cache = target_folder(name);
    let done = cache.join(format!("{:016x}", fnv1a(script.as_bytes())));
    if done.join(marker).is_file() {
        return done;
    }
    std::fs::create_dir_all(&cache).unwrap();
    let tmp = tempfile::Builder::new()
        .prefix("making-")
        .tempdir_in(&cache)
        .unwrap();
    make(tmp.path());
    assert!(
        tmp.path().join(marker).is_file(),
        "{marker} was not written"
    );
    // Another process may have renamed its folder into place meanwhile: then the
    // rename fails (the target is not empty) and ours goes.
    let tmp = tmp.keep();
    if std::fs::rename(&tmp, &done).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        assert!(
            done.join(marker).is_file(),
            "could not move {} into place",
            done.display()
        );
    }
    done
}

/// `<target>/<name>`, where `<target>` holds the running executable's profile
/// folder (`<target>/<profile>/deps/...`); the temp folder's `harness-<name>`
/// otherwise.
fn target_folder(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe
        .parent()
        .filter(|deps| deps.file_name().is_some_and(|n| n == "deps"))
        .and_then(Path::parent)
        .and_then(Path::parent);
    match target {
        Some(target) => target.join(name),
        None => std::env::temp_dir().join(format!("harness-{name}")),
    }
}

/// 64-bit FNV-1a.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |hash, &b| {
        (hash ^ b as u64).wrapping_mul(0x100000001b3)
    })
}
