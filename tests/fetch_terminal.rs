//! `harness fetch` on a terminal draws progress bars (a file's name, bytes, rate),
//! with its log lines above them; off a terminal it writes the log lines alone,
//! with no control sequences. Either way stdout is the list of paths.

mod support;

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use support::hub::content;
use support::model_repo::ModelRepo;

const REPO: &str = "acme/bar-model";

/// 3 MiB on one connection at 2 MiB/s: the fetch lasts about 1.5 s, so the
/// bars (redrawn every 100 ms) are drawn many times.
const MODEL_BYTES: usize = 3 << 20;
const RATE: u64 = 2 << 20;

fn fetch_command(published: &ModelRepo, cache: &Path) -> Command {
    let mut cmd = published
        .hub
        .fetch_command(cache, REPO, &["model.pt", "config.json"]);
    cmd.env("HARNESS_DOWNLOAD_CONNECTIONS", "1")
        .env("HARNESS_LOG_FORMAT", "text")
        .env("TERM", "xterm-256color")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null());
    cmd
}

/// A pseudo-terminal of 40 rows and 120 columns: (master, slave).
fn pty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes the two descriptors it opens, which we then own.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// Runs `cmd` with stderr on a terminal: its status, stdout, and all that the
/// terminal received.
fn run_on_terminal(mut cmd: Command) -> (Output, String) {
    let (master, slave) = pty();
    cmd.stdout(Stdio::piped()).stderr(Stdio::from(slave));
    let child = cmd.spawn().expect("running harness fetch");
    // The child holds the only slave now: its exit ends the master's reads.
    drop(cmd);
    let reader = std::thread::spawn(move || {
        let mut master = std::fs::File::from(master);
        let mut seen = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match master.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                // EIO: every slave closed.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("reading the terminal: {e}"),
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let output = child.wait_with_output().expect("waiting for harness fetch");
    (output, reader.join().unwrap())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// stdout is exactly the two local paths.
fn assert_paths(stdout: &str, model: &[u8]) {
    let paths: Vec<&str> = stdout.lines().collect();
    assert_eq!(paths.len(), 2, "{stdout:?}");
    assert!(
        paths[0].ends_with("/model.pt") && paths[1].ends_with("/config.json"),
        "{stdout:?}"
    );
    assert_eq!(std::fs::read(paths[0]).unwrap(), model);
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_gets_progress_bars_and_a_pipe_gets_log_lines() {
    let model = content(MODEL_BYTES, 11);
    let published = ModelRepo::publish(
        REPO,
        &[("model.pt", &model, true), ("config.json", b"{}", false)],
    )
    .await;
    published.hub.set_connection_rate(Some(RATE));

    // On a terminal: bars, redrawn, with the log lines above them.
    let cache = tempfile::tempdir().unwrap();
    let cmd = fetch_command(&published, cache.path());
    let (out, screen) = blocking(move || run_on_terminal(cmd)).await;
    assert!(out.status.success(), "{screen}");
    assert_paths(&text(&out.stdout), &model);
    assert!(out.stderr.is_empty(), "stderr went to the terminal");
    // A bar: the file's name, its bytes of 3 MiB, a rate, drawn over itself.
    let bars: Vec<&str> = screen
        .split(['\r', '\n'])
        .filter(|line| line.contains("model.pt") && line.contains("3.00 MiB"))
        .filter(|line| line.contains("/s") && line.contains("ETA"))
        .collect();
    assert!(
        bars.len() >= 3,
        "the bar was drawn {} times:\n{screen}",
        bars.len()
    );
    assert!(screen.contains("\x1b["), "no control sequences:\n{screen}");
    assert!(screen.contains("total"), "no total bar or line:\n{screen}");
    // The log lines still print (above the bars), but not the periodic ones.
    assert!(
        screen.contains("downloaded and verified model.pt"),
        "{screen}"
    );
    assert!(!screen.contains("downloading model.pt:"), "{screen}");

    // From the cache: no bar at all.
    let cmd = fetch_command(&published, cache.path());
    let (out, screen) = blocking(move || run_on_terminal(cmd)).await;
    assert!(out.status.success(), "{screen}");
    assert_paths(&text(&out.stdout), &model);
    assert!(
        !screen.contains("ETA") && !screen.contains("total"),
        "{screen}"
    );

    // On a pipe: log lines only, no control sequence.
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = fetch_command(&published, cache.path());
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = blocking(move || cmd.output().unwrap()).await;
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_paths(&text(&out.stdout), &model);
    assert!(
        !stderr.contains('\x1b'),
        "control sequences on a pipe:\n{stderr:?}"
    );
    assert!(!stderr.contains("ETA"), "{stderr}");
    assert!(
        stderr.contains("downloading model.pt (3.0 MiB)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("downloaded and verified model.pt"),
        "{stderr}"
    );
}
