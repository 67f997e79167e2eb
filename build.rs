//! Links libtorch so that CUDA registers and no `LD_LIBRARY_PATH` is needed.
//!
//! Rust links with `--as-needed`, which drops `libtorch.so` (nothing references
//! it by symbol) and with it `libtorch_cuda.so`: CUDA would then never register.
//! `--no-as-needed -ltorch` keeps it, and an rpath to the libtorch lib folder lets
//! `cargo run`, `cargo test` and the release binary find it; a second, relative
//! rpath finds it in the Docker image's layout (`scripts/runtime-files`). On a
//! machine where neither is there (the lent GPU machine), `LD_LIBRARY_PATH` takes over.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LIBTORCH");

    // torch-sys (a direct dependency for this reason) exports its lib folder.
    let lib_dir = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not export DEP_TCH_LIBTORCH_LIB; is torch-sys a direct dependency at tch's version?");

    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    // First the image's layout (scripts/runtime-files: the binary in bin/, libtorch in
    // lib/harness/torch/lib), which works wherever that tree is put; then the
    // folder this build linked against, for cargo run and cargo test.
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../lib/harness/torch/lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    println!("cargo:rustc-link-arg=-L{lib_dir}");
    println!("cargo:rustc-link-arg=-ltorch");

    // The version `harness gpu-check` reports: read from the headers we compile against.
    let version = libtorch_version(Path::new(&lib_dir)).unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=HARNESS_LIBTORCH_VERSION={version}");
}

/// The libtorch version, e.g. `2.11.0+cu130`: from the wheel's `version.py` where
/// there is one (it names the CUDA build), else from the C++ version header.
fn libtorch_version(lib_dir: &Path) -> Option<String> {
    let root = lib_dir.parent()?;
    let py = root.join("version.py");
    println!("cargo:rerun-if-changed={}", py.display());
    if let Ok(text) = std::fs::read_to_string(&py) {
        let found = text.lines().find_map(|line| {
            let rest = line.trim().strip_prefix("__version__")?;
            Some(
                rest.trim_start_matches([' ', '='])
                    .trim()
                    .trim_matches(['\'', '"'])
                    .to_string(),
            )
        });
        if found.is_some() {
            return found;
        }
    }
    let header = std::fs::read_to_string(root.join("include/torch/headeronly/version.h")).ok()?;
    let part = |name: &str| {
        header.lines().find_map(|line| {
            line.trim()
                .strip_prefix(&format!("#define TORCH_VERSION_{name} "))
                .map(|v| v.trim().to_string())
        })
    };
    Some(format!(
        "{}.{}.{}",
        part("MAJOR")?,
        part("MINOR")?,
        part("PATCH")?
    ))
}
