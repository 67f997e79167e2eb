//! `make bench`, the cache check at load: hashing a model's cached files against
//! their names (what a node does while it loads), side by side with only reading
//! them, for one large file and for four shards at once.
//!
//! `HARNESS_BENCH_VERIFY_MIB` sets the model's size (default 2048 MiB). The files
//! are written first, so they are read back from the page cache as a just-fetched
//! or recently used model would be; a cold disk adds its own read time to both.

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use sha2::{Digest, Sha256};

fn write_blob(dir: &std::path::Path, bytes: usize, seed: u8) -> PathBuf {
    let chunk: Vec<u8> = (0..1usize << 20)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let mut hasher = Sha256::new();
    let tmp = dir.join(format!("tmp-{seed}"));
    {
        use std::io::Write;
        let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp).unwrap());
        for _ in 0..bytes >> 20 {
            file.write_all(&chunk).unwrap();
            hasher.update(&chunk);
        }
    }
    let name: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let blob = dir.join(name);
    std::fs::rename(&tmp, &blob).unwrap();
    blob
}

/// Reads every file once, in parallel threads: the baseline.
fn read_all(paths: &[PathBuf]) {
    std::thread::scope(|scope| {
        for path in paths {
            scope.spawn(move || {
                let mut file = std::fs::File::open(path).unwrap();
                let mut buf = vec![0u8; 8 << 20];
                while file.read(&mut buf).unwrap() > 0 {}
            });
        }
    });
}

fn main() {
    let mib: usize = std::env::var("HARNESS_BENCH_VERIFY_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let dir = tempfile::tempdir().unwrap();
    let one = vec![write_blob(dir.path(), mib << 20, 1)];
    let shards: Vec<_> = (0..4)
        .map(|i| write_blob(dir.path(), (mib / 4) << 20, 10 + i))
        .collect();
    println!("| files | MiB | read only (s) | read and hashed (s) | hashed / read | GB/s hashed |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (label, paths) in [("1 file", &one), ("4 shards", &shards)] {
        let (mut read, mut verify) = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            let t = Instant::now();
            read_all(paths);
            read = read.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let corrupt = harness::fetch::verify_files(paths);
            verify = verify.min(t.elapsed().as_secs_f64());
            assert!(corrupt.is_empty());
        }
        println!(
            "| {label} | {mib} | {read:.2} | {verify:.2} | {:.1} | {:.2} |",
            verify / read,
            (mib << 20) as f64 / verify / 1e9
        );
    }
}
