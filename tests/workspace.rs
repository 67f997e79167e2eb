//! The client crate must build without libtorch.

#[test]
fn the_client_crate_does_not_depend_on_libtorch() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let out = std::process::Command::new(cargo)
        .args([
            "tree",
            "-p",
            "harness-client",
            "--edges",
            "normal,build",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(tree.starts_with("harness-client"), "{tree}");
    for forbidden in ["tch ", "torch-sys "] {
        assert!(
            !tree.lines().any(|l| l.starts_with(forbidden)),
            "harness-client depends on {forbidden}:\n{tree}"
        );
    }
}
