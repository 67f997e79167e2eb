//! Checks cached files against their names: a blob in the Hub cache is named for
//! its content (`blobs/<sha256>` for LFS files, `blobs/<git blob sha1>` for small
//! ones), so a flipped bit on a disk or volume is found by hashing it again. Files
//! are hashed in parallel, one thread each, reading large chunks: the cost is a
//! read of the model at disk speed, which the serving runs while it loads.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha1::Sha1;
use sha2::{Digest, Sha256};

/// A cached file whose content is not what its name says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corrupt {
    /// The path the model sees (a snapshot entry).
    pub path: PathBuf,
    /// The blob it points at.
    pub blob: PathBuf,
    /// `sha256` or `git sha1`.
    pub check: &'static str,
    pub expected: String,
    pub got: String,
}

impl std::fmt::Display for Corrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed its {} check (blob {}: expected {}, got {})",
            self.path.display(),
            self.check,
            self.blob.display(),
            self.expected,
            self.got
        )
    }
}

/// How a blob's name says its content is hashed.
enum Check {
    Sha256,
    GitSha1,
}

/// Hashes every file whose blob is named by its hash; the ones that do not match.
/// Files outside the Hub cache (a local model folder) have no such name and are
/// not checked.
pub fn verify_files(paths: &[PathBuf]) -> Vec<Corrupt> {
    std::thread::scope(|scope| {
        let checks: Vec<_> = paths
            .iter()
            .filter_map(|path| {
                let blob = std::fs::canonicalize(path).ok()?;
                let name = blob.file_name()?.to_str()?.to_ascii_lowercase();
                let check = match name.len() {
                    64 if is_hex(&name) => Check::Sha256,
                    40 if is_hex(&name) => Check::GitSha1,
                    _ => return None,
                };
                Some(scope.spawn(move || {
                    let got = match hash(&blob, &check) {
                        Ok(got) => got,
                        Err(e) => format!("unreadable: {e}"),
                    };
                    (got != name).then(|| Corrupt {
                        path: path.clone(),
                        blob,
                        check: match check {
                            Check::Sha256 => "sha256",
                            Check::GitSha1 => "git sha1",
                        },
                        expected: name,
                        got,
                    })
                }))
            })
            .collect();
        checks
            .into_iter()
            .filter_map(|c| c.join().ok().flatten())
            .collect()
    })
}

/// Removes a corrupt blob, so that the cache no longer offers it: the next fetch
/// downloads it again (or, offline, names it as missing).
pub fn evict(corrupt: &Corrupt) -> std::io::Result<()> {
    match std::fs::remove_file(&corrupt.blob) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The git blob id of a file: sha1 of `blob <len>\0` and the content.
pub fn git_blob_sha1(path: &Path) -> std::io::Result<String> {
    hash(path, &Check::GitSha1)
}

fn hash(path: &Path, check: &Check) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut buf = vec![0u8; 8 << 20];
    match check {
        Check::Sha256 => {
            let mut hasher = Sha256::new();
            read_into(&mut file, &mut buf, |chunk| hasher.update(chunk))?;
            Ok(hex(&hasher.finalize()))
        }
        Check::GitSha1 => {
            let mut hasher = Sha1::new();
            hasher.update(format!("blob {len}\0").as_bytes());
            read_into(&mut file, &mut buf, |chunk| hasher.update(chunk))?;
            Ok(hex(&hasher.finalize()))
        }
    }
}

fn read_into(
    file: &mut std::fs::File,
    buf: &mut [u8],
    mut take: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    loop {
        let n = file.read(buf)?;
        if n == 0 {
            return Ok(());
        }
        take(&buf[..n]);
    }
}

fn is_hex(name: &str) -> bool {
    name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob named `name` in `dir/blobs`, with a snapshot-style link to it.
    fn blob(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
        std::fs::create_dir_all(dir.join("blobs")).unwrap();
        let blob = dir.join("blobs").join(name);
        std::fs::write(&blob, content).unwrap();
        let link = dir.join(format!("link-{}", &name[..8]));
        std::os::unix::fs::symlink(&blob, &link).unwrap();
        link
    }

    #[test]
    fn blobs_named_by_their_hash_are_checked_and_a_flipped_byte_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let weights = b"model weights".to_vec();
        let config = b"{\"hidden\": 4}\n".to_vec();
        let sha = hex(&Sha256::digest(&weights));
        // The git blob id `git hash-object` gives for the config.
        let mut git = Sha1::new();
        git.update(format!("blob {}\0", config.len()).as_bytes());
        git.update(&config);
        let git = hex(&git.finalize());
        let good = [
            blob(dir.path(), &sha, &weights),
            blob(dir.path(), &git, &config),
        ];
        assert!(verify_files(&good).is_empty());
        assert_eq!(git_blob_sha1(&good[1]).unwrap(), git);

        let mut flipped = weights.clone();
        flipped[3] ^= 1;
        std::fs::write(dir.path().join("blobs").join(&sha), &flipped).unwrap();
        let found = verify_files(&good);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].check, found[0].expected.as_str()),
            ("sha256", sha.as_str())
        );
        evict(&found[0]).unwrap();
        assert!(!dir.path().join("blobs").join(&sha).exists());
    }

    #[test]
    fn files_not_named_by_a_hash_are_not_checked() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("model.pt");
        std::fs::write(&local, b"anything").unwrap();
        assert!(verify_files(&[local]).is_empty());
    }

    #[test]
    fn the_git_blob_id_is_gits() {
        // `printf 'hello\n' | git hash-object --stdin`
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"hello\n").unwrap();
        assert_eq!(
            git_blob_sha1(&file).unwrap(),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
    }
}
