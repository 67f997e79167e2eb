//! A real HTTP server that speaks the Hugging Face Hub's protocol, for tests.
//!
//! `HEAD`/`GET /{org}/{name}/resolve/{revision}/{file}` answer with `X-Repo-Commit`,
//! `ETag` (a git-style id) and `Content-Length` for small files, and with a 302 to an
//! absolute `/cdn/<sha256>` URL carrying `X-Linked-Etag` and `X-Linked-Size` for LFS
//! files, as the Hub does. A renamed repo answers with a relative 307. `Range`,
//! `If-None-Match` (304, without the size for small files), private repos (401
//! without the token) and the Hub's `X-Error-Code` on 404 are served (a file
//! missing at an existing commit: `EntryNotFound`, with that commit's
//! `X-Repo-Commit`, as the Hub answers). Faults are queued and each spoils the
//! next matching request (or the next download of one file): statuses,
//! `Retry-After`, stalls, truncated bodies, wrong bytes, ignored `Range`. Every
//! request is counted.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

type Body = BoxBody<Bytes, std::io::Error>;

/// Which requests a fault spoils.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On {
    /// `HEAD` or `GET` on `/resolve/` (metadata, and small files' bytes).
    Resolve,
    /// `GET` of a file's bytes (the CDN for LFS files, `resolve` for small ones).
    Download,
    /// `GET` of the bytes of the file of this name (its path in the repo) only.
    DownloadOf(&'static str),
}

/// One spoiled answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status (with `Retry-After` when given).
    Status { code: u16, retry_after: Option<u64> },
    /// Send this many bytes of the body, then nothing, forever.
    Stall { after: u64 },
    /// Send this many bytes, then break the connection.
    Truncate { after: u64 },
    /// Send the whole body with one byte changed.
    WrongBytes,
    /// Answer a `Range` request with the whole file (200).
    IgnoreRange,
}

/// One request the hub served.
#[derive(Debug, Clone)]
pub struct Served {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
    pub status: u16,
}

#[derive(Clone)]
struct FileEntry {
    /// The file's path in the repo.
    name: String,
    content: Arc<Vec<u8>>,
    lfs: bool,
    etag: String,
}

#[derive(Default)]
struct RepoState {
    branches: HashMap<String, String>,
    commits: HashMap<String, HashMap<String, FileEntry>>,
    token: Option<String>,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, RepoState>,
    renamed: HashMap<String, String>,
    faults: VecDeque<(On, Fault)>,
    served: Vec<Served>,
    /// Bytes per second for every body, when set.
    rate: Option<u64>,
    commits_made: u64,
}

/// The running hub. Dropping it stops the server.
pub struct TestHub {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestHub {
    pub async fn start() -> Self {
        let hub = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the test hub");
        // The CDN is another origin, as the Hub's is: the token must not follow there.
        let cdn = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the test CDN");
        let addr = hub.local_addr().unwrap();
        let cdn_addr = cdn.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            tokio::join!(
                serve(hub, shared.clone(), cdn_addr),
                serve(cdn, shared, cdn_addr)
            );
        });
        TestHub { addr, state, task }
    }

    /// A `harness fetch` of `files` of `repo` from this hub into the cache `cache`
    /// (no `files`: `HARNESS_MODEL_FILES` unset, the task's own set), with no
    /// token or offline setting inherited from the test's environment.
    pub fn fetch_command(
        &self,
        cache: &std::path::Path,
        repo: &str,
        files: &[&str],
    ) -> std::process::Command {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_harness"));
        cmd.arg("fetch")
            .env("HF_ENDPOINT", self.url())
            .env("HARNESS_MODEL_REPO", repo)
            .env("HARNESS_CACHE_DIR", cache)
            .env_remove("HF_TOKEN")
            .env_remove("HARNESS_OFFLINE");
        if files.is_empty() {
            cmd.env_remove("HARNESS_MODEL_FILES");
        } else {
            cmd.env("HARNESS_MODEL_FILES", files.join(","));
        }
        cmd
    }

    /// The `HF_ENDPOINT` to use.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Makes a new commit on `branch` of `repo` holding exactly `files`
    /// (name, content, whether it is an LFS file); returns its id.
    pub fn commit(&self, repo: &str, branch: &str, files: &[(&str, &[u8], bool)]) -> String {
        let mut state = self.state.lock().unwrap();
        state.commits_made += 1;
        let commit = hex(&Sha256::digest(format!(
            "{repo}@{branch}#{}",
            state.commits_made
        )))[..40]
            .to_string();
        let entries = files
            .iter()
            .map(|(name, content, lfs)| {
                // LFS files' etag is their sha256; small files' is their git blob
                // id (sha1 of `blob <len>\0` and the content), as on the Hub.
                let etag = if *lfs {
                    hex(&Sha256::digest(content))
                } else {
                    git_blob_id(content)
                };
                (
                    name.to_string(),
                    FileEntry {
                        name: name.to_string(),
                        content: Arc::new(content.to_vec()),
                        lfs: *lfs,
                        etag,
                    },
                )
            })
            .collect();
        let repo_state = state.repos.entry(repo.to_string()).or_default();
        repo_state.commits.insert(commit.clone(), entries);
        repo_state
            .branches
            .insert(branch.to_string(), commit.clone());
        commit
    }

    /// Makes `repo` private: only `Authorization: Bearer <token>` may read it.
    pub fn require_token(&self, repo: &str, token: &str) {
        self.state
            .lock()
            .unwrap()
            .repos
            .entry(repo.to_string())
            .or_default()
            .token = Some(token.to_string());
    }

    /// Requests for `old` are redirected (relative 307) to `new`.
    pub fn rename(&self, old: &str, new: &str) {
        self.state
            .lock()
            .unwrap()
            .renamed
            .insert(old.to_string(), new.to_string());
    }

    /// Spoils the next request matching `on`. Faults apply in the order queued.
    pub fn fault(&self, on: On, fault: Fault) {
        self.state.lock().unwrap().faults.push_back((on, fault));
    }

    /// Throttles every body to `bytes_per_sec` (None: as fast as possible).
    pub fn set_rate(&self, bytes_per_sec: Option<u64>) {
        self.state.lock().unwrap().rate = bytes_per_sec;
    }

    /// Every request served so far.
    pub fn served(&self) -> Vec<Served> {
        self.state.lock().unwrap().served.clone()
    }

    /// How many requests with this method went to a path containing `needle`.
    pub fn count(&self, method: &str, needle: &str) -> usize {
        self.served()
            .iter()
            .filter(|s| s.method == method && s.path.contains(needle))
            .count()
    }

    pub fn clear_served(&self) {
        self.state.lock().unwrap().served.clear();
    }
}

async fn serve(listener: TcpListener, state: Arc<Mutex<State>>, cdn: SocketAddr) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, cdn, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The git blob id of `content`, as `git hash-object` gives it.
pub fn git_blob_id(content: &[u8]) -> String {
    use sha1::Digest as _;
    let mut hasher = sha1::Sha1::new();
    hasher.update(format!("blob {}\0", content.len()).as_bytes());
    hasher.update(content);
    hex(&hasher.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `len` bytes of deterministic, incompressible-looking content.
pub fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

async fn handle(
    state: &Arc<Mutex<State>>,
    addr: SocketAddr,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let range = header("range");
    let authorization = header("authorization");
    let if_none_match = header("if-none-match");

    let response = route(
        state,
        addr,
        &method,
        &path,
        range.as_deref(),
        authorization.as_deref(),
        if_none_match.as_deref(),
    )
    .await;
    state.lock().unwrap().served.push(Served {
        method: method.to_string(),
        path,
        range,
        authorization,
        status: response.status().as_u16(),
    });
    response
}

fn take_fault(state: &Arc<Mutex<State>>, on: On) -> Option<Fault> {
    take_fault_where(state, |o| o == on)
}

/// The first queued fault whose target `matches`, taken off the queue.
fn take_fault_where(state: &Arc<Mutex<State>>, matches: impl Fn(On) -> bool) -> Option<Fault> {
    let mut state = state.lock().unwrap();
    let i = state.faults.iter().position(|(o, _)| matches(*o))?;
    state.faults.remove(i).map(|(_, f)| f)
}

#[allow(clippy::too_many_arguments)]
async fn route(
    state: &Arc<Mutex<State>>,
    addr: SocketAddr,
    method: &Method,
    path: &str,
    range: Option<&str>,
    authorization: Option<&str>,
    if_none_match: Option<&str>,
) -> Response<Body> {
    if let Some(sha) = path.strip_prefix("/cdn/") {
        let entry = {
            let state = state.lock().unwrap();
            state
                .repos
                .values()
                .flat_map(|r| r.commits.values())
                .flat_map(|files| files.values())
                .find(|e| e.etag == sha)
                .cloned()
        };
        return match entry {
            Some(entry) => serve_bytes(
                state,
                method,
                &entry,
                range,
                Response::builder().header("etag", format!("\"{}\"", entry.etag)),
            ),
            None => status(404, &[("x-error-code", "EntryNotFound")]),
        };
    }

    let Some((repo, rest)) = split_resolve(path) else {
        return status(404, &[]);
    };
    if let Some(Fault::Status { code, retry_after }) = take_fault(state, On::Resolve) {
        return fault_status(code, retry_after);
    }
    let (revision, file) = match rest.split_once('/') {
        Some((rev, file)) => (rev.replace("%2F", "/"), file.to_string()),
        None => return status(404, &[]),
    };

    let (commit, entry) = {
        let state = state.lock().unwrap();
        if let Some(new) = state.renamed.get(&repo) {
            let location = format!("/{new}/resolve/{rest}");
            return status(307, &[("location", location.as_str())]);
        }
        let Some(repo_state) = state.repos.get(&repo) else {
            // As the Hub: without a token, a missing repo is 401 (it could be
            // private), told apart from a gated one only by its error code.
            let code = if authorization.is_some() { 404 } else { 401 };
            return status(code, &[("x-error-code", "RepoNotFound")]);
        };
        if let Some(token) = &repo_state.token {
            if authorization != Some(format!("Bearer {token}").as_str()) {
                return status(401, &[("x-error-code", "GatedRepo")]);
            }
        }
        let commit = repo_state
            .branches
            .get(&revision)
            .cloned()
            .unwrap_or(revision.clone());
        let Some(files) = repo_state.commits.get(&commit) else {
            return status(404, &[("x-error-code", "RevisionNotFound")]);
        };
        let Some(entry) = files.get(&file).cloned() else {
            return status(
                404,
                &[
                    ("x-error-code", "EntryNotFound"),
                    ("x-repo-commit", commit.as_str()),
                ],
            );
        };
        (commit, entry)
    };

    let quoted = format!("\"{}\"", entry.etag);
    if if_none_match == Some(quoted.as_str()) {
        let mut builder = Response::builder()
            .status(304)
            .header("x-repo-commit", &commit)
            .header("etag", &quoted);
        if entry.lfs {
            builder = builder
                .header("x-linked-etag", &quoted)
                .header("x-linked-size", entry.content.len());
        }
        return builder.body(empty()).unwrap();
    }
    if entry.lfs {
        // As the Hub: a redirect to the CDN, with the metadata on the redirect.
        let location = format!("http://{addr}/cdn/{}", entry.etag);
        return Response::builder()
            .status(302)
            .header("location", location)
            .header("x-repo-commit", &commit)
            .header("x-linked-etag", &quoted)
            .header("x-linked-size", entry.content.len())
            .header("etag", "\"a-git-id-not-the-sha\"")
            .body(empty())
            .unwrap();
    }
    let builder = Response::builder()
        .header("x-repo-commit", &commit)
        .header("etag", &quoted);
    serve_bytes(state, method, &entry, range, builder)
}

/// `/org/name/resolve/rest` → (`org/name`, `rest`).
fn split_resolve(path: &str) -> Option<(String, String)> {
    let trimmed = path.strip_prefix('/')?;
    let (repo, rest) = trimmed.split_once("/resolve/")?;
    repo.contains('/')
        .then(|| (repo.to_string(), rest.to_string()))
}

fn serve_bytes(
    state: &Arc<Mutex<State>>,
    method: &Method,
    entry: &FileEntry,
    range: Option<&str>,
    builder: hyper::http::response::Builder,
) -> Response<Body> {
    let total = entry.content.len() as u64;
    let fault = if method == Method::GET {
        take_fault_where(state, |on| {
            on == On::Download || matches!(on, On::DownloadOf(name) if name == entry.name)
        })
    } else {
        None
    };
    if let Some(Fault::Status { code, retry_after }) = fault {
        return fault_status(code, retry_after);
    }
    let range = if fault == Some(Fault::IgnoreRange) {
        None
    } else {
        range.and_then(parse_range)
    };
    let (start, builder) = match range {
        Some(start) if start >= total => {
            return status(
                416,
                &[("content-range", format!("bytes */{total}").as_str())],
            );
        }
        Some(start) => (
            start,
            builder.status(206).header(
                "content-range",
                format!("bytes {start}-{}/{total}", total - 1),
            ),
        ),
        None => (0, builder.status(200)),
    };
    let builder = builder
        .header("content-length", total - start)
        .header("accept-ranges", "bytes");
    if method == Method::HEAD {
        return builder.body(empty()).unwrap();
    }
    let rate = state.lock().unwrap().rate;
    builder
        .body(stream_body(entry.content.clone(), start, fault, rate))
        .unwrap()
}

/// `bytes=N-` or `bytes=N-M` → N (we always send to the end, as the Hub's CDN may).
fn parse_range(value: &str) -> Option<u64> {
    value
        .strip_prefix("bytes=")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// The body from `start`, in 64 KiB frames, at `rate`, spoiled by `fault`.
fn stream_body(content: Arc<Vec<u8>>, start: u64, fault: Option<Fault>, rate: Option<u64>) -> Body {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    tokio::spawn(async move {
        // Small frames when throttled, so the rate holds from the first byte.
        let chunk_size = rate.map_or(64 * 1024, |r| (r as usize / 20).clamp(1, 64 * 1024));
        let mut sent: u64 = 0;
        let mut pos = start as usize;
        let wrong_at = (content.len() as u64 / 2) as usize;
        let began = tokio::time::Instant::now();
        while pos < content.len() {
            let mut end = (pos + chunk_size).min(content.len());
            match fault {
                Some(Fault::Stall { after }) | Some(Fault::Truncate { after })
                    if sent + (end - pos) as u64 > after =>
                {
                    end = pos + (after - sent) as usize;
                }
                _ => {}
            }
            if end > pos {
                let mut chunk = content[pos..end].to_vec();
                if fault == Some(Fault::WrongBytes) && (pos..end).contains(&wrong_at) {
                    chunk[wrong_at - pos] ^= 0xff;
                }
                if tx.send(Ok(Frame::data(Bytes::from(chunk)))).await.is_err() {
                    return;
                }
                sent += (end - pos) as u64;
                pos = end;
            }
            match fault {
                Some(Fault::Stall { after }) if sent >= after => {
                    // Hold the connection open, silent, until the client gives up.
                    tx.closed().await;
                    return;
                }
                Some(Fault::Truncate { after }) if sent >= after => {
                    // Let what was sent reach the client before the connection breaks.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let _ = tx
                        .send(Err(std::io::Error::other("truncated by the test hub")))
                        .await;
                    return;
                }
                _ => {}
            }
            if let Some(rate) = rate {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                tokio::time::sleep_until(began + due).await;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    StreamBody::new(stream).boxed()
}

fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

fn fault_status(code: u16, retry_after: Option<u64>) -> Response<Body> {
    match retry_after {
        Some(seconds) => status(code, &[("retry-after", seconds.to_string().as_str())]),
        None => status(code, &[]),
    }
}

fn status(code: u16, headers: &[(&str, &str)]) -> Response<Body> {
    let mut builder = Response::builder().status(StatusCode::from_u16(code).unwrap());
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder
        .body(
            Full::new(Bytes::from(format!("test hub: {code}")))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}
