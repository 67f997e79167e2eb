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
