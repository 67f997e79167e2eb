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
//! next matching request (or the next download of one file, or a later range of
//! one): statuses, `Retry-After`, stalls, truncated bodies, wrong bytes, ignored
//! `Range`. Every request is counted, with the TCP connection it came on.
//!
//! `Range: bytes=N-` and `bytes=N-M` are answered 206 with exactly those bytes. The
//! model API that `huggingface_hub` calls (`HfApi.model_info`, `list_repo_tree`,
//! so `snapshot_download`) is served too: `/api/models/{repo}[/revision/{rev}]`
//! and `/api/models/{repo}/tree/{rev}[/{path}]`. No `X-Xet-*` header is ever sent,
//! so Python's client downloads over plain HTTP. Bodies can be throttled per
//! body ([`TestHub::set_rate`]) and per TCP connection, across all the responses
//! on it, as a CDN does ([`TestHub::set_connection_rate`]).

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
    /// `GET` of the bytes of the file of this name (its path in the repo) whose
    /// `Range` starts after byte 0: a later part of a split download, or a resume.
    LaterRangeOf(&'static str),
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
    /// Send the body with its first byte changed (whatever range is served).
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
    /// The TCP connection it came on: counted from 0 per hub, in accept order
    /// (the hub's and the CDN's connections alike).
    pub conn: u64,
}

impl Served {
    /// The bytes its `Range: bytes=N-M` asked for, as `N..M + 1`.
    pub fn asked(&self) -> Option<std::ops::Range<u64>> {
        let (from, to) = self
            .range
            .as_deref()?
            .strip_prefix("bytes=")?
            .split_once('-')?;
        Some(from.parse().ok()?..to.parse::<u64>().ok()? + 1)
    }
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
    /// Bytes per second for every TCP connection, all its bodies together.
    conn_rate: Option<u64>,
    /// Connections accepted so far (the next one's id).
    conns: u64,
    /// Bodies being sent now, and the most there were at once since
    /// [`TestHub::clear_served`].
    bodies: usize,
    peak_bodies: usize,
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

    /// Throttles every TCP connection, as a CDN does: all the bodies sent on one
    /// connection (kept alive across requests) share `bytes_per_sec`, and each
    /// connection has its own (so 8 connections get 8 times the bandwidth of 1).
    /// An idle connection saves up at most ~50 ms of credit. Applies to bodies
    /// already under way too. None: as fast as possible.
    pub fn set_connection_rate(&self, bytes_per_sec: Option<u64>) {
        self.state.lock().unwrap().conn_rate = bytes_per_sec;
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

    /// The `GET`s of a file's bytes whose path contains `file_sha_or_name`, in
    /// order: `/cdn/<sha256>` for LFS files, `/resolve/` (not its redirects) for
    /// small ones.
    pub fn download_gets(&self, file_sha_or_name: &str) -> Vec<Served> {
        self.served()
            .into_iter()
            .filter(|s| {
                s.method == "GET"
                    && s.path.contains(file_sha_or_name)
                    && (s.path.starts_with("/cdn/")
                        || (s.path.contains("/resolve/") && !(300..400).contains(&s.status)))
            })
            .collect()
    }

    pub fn clear_served(&self) {
        let mut state = self.state.lock().unwrap();
        state.served.clear();
        state.peak_bodies = state.bodies;
    }

    /// The most file bodies the hub was sending at once since
    /// [`TestHub::clear_served`]: the client's real concurrency, whatever
    /// connections its pool opened. A body counts from its response until its
    /// last byte is handed to the connection, so it has stopped counting
    /// before the client can read that byte and ask for the next.
    pub fn peak_bodies(&self) -> usize {
        self.state.lock().unwrap().peak_bodies
    }
}

/// One accepted TCP connection: its id and its pacer.
#[derive(Clone)]
struct Conn {
    id: u64,
    /// When the connection may next send a body byte, at the connection rate.
    next_free: Arc<Mutex<tokio::time::Instant>>,
}

/// How much credit an idle connection saves up.
const BURST: Duration = Duration::from_millis(50);

impl Conn {
    /// Waits until `bytes` more body bytes may go on this connection at `rate`.
    async fn pace(&self, bytes: usize, rate: u64) {
        let start = {
            let mut next_free = self.next_free.lock().unwrap();
            let now = tokio::time::Instant::now();
            let start = (*next_free).max(now.checked_sub(BURST).unwrap_or(now));
            *next_free = start + Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

async fn serve(listener: TcpListener, state: Arc<Mutex<State>>, cdn: SocketAddr) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        let conn = {
            let mut state = state.lock().unwrap();
            state.conns += 1;
            Conn {
                id: state.conns - 1,
                next_free: Arc::new(Mutex::new(tokio::time::Instant::now())),
            }
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                let conn = conn.clone();
                async move { Ok::<_, Infallible>(handle(&state, cdn, &conn, req).await) }
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

/// What `route` needs of a request.
struct Req<'a> {
    method: &'a Method,
    path: &'a str,
    query: &'a str,
    range: Option<&'a str>,
    authorization: Option<&'a str>,
    if_none_match: Option<&'a str>,
}

async fn handle(
    state: &Arc<Mutex<State>>,
    addr: SocketAddr,
    conn: &Conn,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
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
        conn,
        &Req {
            method: &method,
            path: &path,
            query: &query,
            range: range.as_deref(),
            authorization: authorization.as_deref(),
            if_none_match: if_none_match.as_deref(),
        },
    )
    .await;
    state.lock().unwrap().served.push(Served {
        method: method.to_string(),
        path,
        range,
        authorization,
        status: response.status().as_u16(),
        conn: conn.id,
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

/// A repo's files at one commit, as a request with `authorization` may see them.
struct Found {
    commit: String,
    files: HashMap<String, FileEntry>,
    private: bool,
}

/// `revision` of `repo` (a branch or a commit), or the Hub's answer when it
/// cannot be read: a 307 to `moved(new name)` for a renamed repo, 401/404 with
/// the Hub's `X-Error-Code` otherwise.
fn look_up(
    state: &Arc<Mutex<State>>,
    repo: &str,
    revision: &str,
    authorization: Option<&str>,
    moved: impl FnOnce(&str) -> String,
) -> Result<Found, Box<Response<Body>>> {
    let state = state.lock().unwrap();
    if let Some(new) = state.renamed.get(repo) {
        let location = moved(new);
        return Err(Box::new(status(307, &[("location", location.as_str())])));
    }
    let Some(repo_state) = state.repos.get(repo) else {
        // As the Hub: without a token, a missing repo is 401 (it could be
        // private), told apart from a gated one only by its error code.
        let code = if authorization.is_some() { 404 } else { 401 };
        return Err(Box::new(status(code, &[("x-error-code", "RepoNotFound")])));
    };
    if let Some(token) = &repo_state.token {
        if authorization != Some(format!("Bearer {token}").as_str()) {
            return Err(Box::new(status(401, &[("x-error-code", "GatedRepo")])));
        }
    }
    let commit = repo_state
        .branches
        .get(revision)
        .cloned()
        .unwrap_or(revision.to_string());
    let Some(files) = repo_state.commits.get(&commit) else {
        return Err(Box::new(status(
            404,
            &[("x-error-code", "RevisionNotFound")],
        )));
    };
    Ok(Found {
        commit,
        files: files.clone(),
        private: repo_state.token.is_some(),
    })
}

async fn route(
    state: &Arc<Mutex<State>>,
    addr: SocketAddr,
    conn: &Conn,
    req: &Req<'_>,
) -> Response<Body> {
    let path = req.path;
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
                conn,
                req,
                &entry,
                Response::builder().header("etag", format!("\"{}\"", entry.etag)),
            ),
            None => status(404, &[("x-error-code", "EntryNotFound")]),
        };
    }
    if let Some(rest) = path.strip_prefix("/api/models/") {
        return model_api(state, req, rest);
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

    let found = match look_up(state, &repo, &revision, req.authorization, |new| {
        format!("/{new}/resolve/{rest}")
    }) {
        Ok(found) => found,
        Err(answer) => return *answer,
    };
    let commit = found.commit;
    let Some(entry) = found.files.get(&file).cloned() else {
        return status(
            404,
            &[
                ("x-error-code", "EntryNotFound"),
                ("x-repo-commit", commit.as_str()),
            ],
        );
    };

    let quoted = format!("\"{}\"", entry.etag);
    if req.if_none_match == Some(quoted.as_str()) {
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
    serve_bytes(state, conn, req, &entry, builder)
}

/// `/org/name/resolve/rest` → (`org/name`, `rest`).
fn split_resolve(path: &str) -> Option<(String, String)> {
    let trimmed = path.strip_prefix('/')?;
    let (repo, rest) = trimmed.split_once("/resolve/")?;
    repo.contains('/')
        .then(|| (repo.to_string(), rest.to_string()))
}

/// `/api/models/{rest}`: `org/name` (the `main` branch), `org/name/revision/{rev}`
/// (as `HfApi.model_info`), `org/name/tree/{rev}[/{path}]` (as `list_repo_tree`).
fn model_api(state: &Arc<Mutex<State>>, req: &Req<'_>, rest: &str) -> Response<Body> {
    let segments: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    let (repo, revision, tree) = match segments.as_slice() {
        [org, name] => (format!("{org}/{name}"), "main".to_string(), None),
        [org, name, "revision", rev] => (format!("{org}/{name}"), percent_decode(rev), None),
        [org, name, "tree", rev, path @ ..] => (
            format!("{org}/{name}"),
            percent_decode(rev),
            Some(percent_decode(&path.join("/"))),
        ),
        _ => return status(404, &[]),
    };
    if let Some(Fault::Status { code, retry_after }) = take_fault(state, On::Resolve) {
        return fault_status(code, retry_after);
    }
    let org = segments[0];
    let found = match look_up(state, &repo, &revision, req.authorization, |new| {
        let tail = segments[2..].join("/");
        if tail.is_empty() {
            format!("/api/models/{new}")
        } else {
            format!("/api/models/{new}/{tail}")
        }
    }) {
        Ok(found) => found,
        Err(answer) => return *answer,
    };
    let mut files: Vec<&FileEntry> = found.files.values().collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let query = |key: &str| {
        req.query.split('&').any(|pair| {
            pair.split_once('=')
                .is_some_and(|(k, v)| k == key && (v.eq_ignore_ascii_case("true") || v == "1"))
        })
    };

    let json = match tree {
        None => {
            // The Hub's model info; `?blobs=true` (`files_metadata=True`) adds
            // each file's size, blob id and LFS details.
            let blobs = query("blobs");
            let siblings: Vec<serde_json::Value> = files
                .iter()
                .map(|f| {
                    let mut sibling = serde_json::json!({ "rfilename": f.name });
                    if blobs {
                        sibling["size"] = f.content.len().into();
                        sibling["blobId"] = blob_id(f).into();
                        if f.lfs {
                            sibling["lfs"] = serde_json::json!({
                                "sha256": f.etag,
                                "size": f.content.len(),
                                "pointerSize": lfs_pointer(f).len(),
                            });
                        }
                    }
                    sibling
                })
                .collect();
            let used: usize = files.iter().map(|f| f.content.len()).sum();
            serde_json::json!({
                "_id": &hex(&Sha256::digest(repo.as_bytes()))[..24],
                "id": repo,
                "modelId": repo,
                "author": org,
                "sha": found.commit,
                "lastModified": "2024-01-01T00:00:00.000Z",
                "createdAt": "2024-01-01T00:00:00.000Z",
                "private": found.private,
                "gated": false,
                "disabled": false,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "spaces": [],
                "usedStorage": used,
            })
        }
        Some(dir) => {
            // The Hub's tree listing: the folder's files and folders (all below
            // it with `?recursive=true`), folders first at each level.
            let recursive = query("recursive");
            let prefix = if dir.is_empty() {
                String::new()
            } else {
                format!("{dir}/")
            };
            let mut folders = std::collections::BTreeSet::new();
            let mut listed = Vec::new();
            for f in &files {
                let Some(below) = f.name.strip_prefix(&prefix) else {
                    continue;
                };
                let parts: Vec<&str> = below.split('/').collect();
                let depth = if recursive { parts.len() - 1 } else { 1 };
                for i in 1..=depth.min(parts.len() - 1) {
                    folders.insert(format!("{prefix}{}", parts[..i].join("/")));
                }
                if recursive || parts.len() == 1 {
                    let mut entry = serde_json::json!({
                        "type": "file",
                        "oid": blob_id(f),
                        "size": f.content.len(),
                        "path": f.name,
                    });
                    if f.lfs {
                        entry["lfs"] = serde_json::json!({
                            "oid": f.etag,
                            "size": f.content.len(),
                            "pointerSize": lfs_pointer(f).len(),
                        });
                    }
                    listed.push(entry);
                }
            }
            if listed.is_empty() && folders.is_empty() && !dir.is_empty() {
                return status(
                    404,
                    &[
                        ("x-error-code", "EntryNotFound"),
                        ("x-repo-commit", found.commit.as_str()),
                    ],
                );
            }
            let folders = folders.into_iter().map(|path| {
                serde_json::json!({
                    "type": "directory",
                    "oid": git_blob_id(format!("tree {path}").as_bytes()),
                    "size": 0,
                    "path": path,
                })
            });
            serde_json::Value::Array(folders.chain(listed).collect())
        }
    };
    Response::builder()
        .status(200)
        .header("content-type", "application/json; charset=utf-8")
        .header("x-repo-commit", &found.commit)
        .body(
            Full::new(Bytes::from(json.to_string()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

/// The git-lfs pointer file the repo's git tree holds for an LFS file.
fn lfs_pointer(entry: &FileEntry) -> String {
    format!(
        "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize {}\n",
        entry.etag,
        entry.content.len()
    )
}

/// The file's git blob id: of its pointer file for an LFS file, as on the Hub.
fn blob_id(entry: &FileEntry) -> String {
    if entry.lfs {
        git_blob_id(lfs_pointer(entry).as_bytes())
    } else {
        entry.etag.clone()
    }
}

/// `%XX` escapes decoded (a revision such as `refs%2Fpr%2F1`, a path).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex_at = |j: usize| {
            bytes
                .get(j)
                .and_then(|b| (*b as char).to_digit(16))
                .map(|d| d as u8)
        };
        match (bytes[i], hex_at(i + 1), hex_at(i + 2)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push(hi << 4 | lo);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve_bytes(
    state: &Arc<Mutex<State>>,
    conn: &Conn,
    req: &Req<'_>,
    entry: &FileEntry,
    builder: hyper::http::response::Builder,
) -> Response<Body> {
    let total = entry.content.len() as u64;
    let asked = req.range.and_then(parse_range);
    let later = asked.is_some_and(|(start, _)| start > 0);
    let fault = if req.method == Method::GET {
        take_fault_where(state, |on| match on {
            On::Download => true,
            On::DownloadOf(name) => name == entry.name,
            On::LaterRangeOf(name) => later && name == entry.name,
            On::Resolve => false,
        })
    } else {
        None
    };
    if let Some(Fault::Status { code, retry_after }) = fault {
        return fault_status(code, retry_after);
    }
    let asked = if fault == Some(Fault::IgnoreRange) {
        None
    } else {
        asked
    };
    // [start, end) of the file.
    let (start, end, builder) = match asked {
        Some((start, _)) if start >= total => {
            return status(
                416,
                &[("content-range", format!("bytes */{total}").as_str())],
            );
        }
        // `bytes=N-M` with M < N is not a range: ignored, as HTTP says.
        Some((start, Some(last))) if last < start => (0, total, builder.status(200)),
        Some((start, last)) => {
            let end = last.map_or(total, |last| last.min(total - 1) + 1);
            (
                start,
                end,
                builder.status(206).header(
                    "content-range",
                    format!("bytes {start}-{}/{total}", end - 1),
                ),
            )
        }
        None => (0, total, builder.status(200)),
    };
    let builder = builder
        .header("content-length", end - start)
        .header("accept-ranges", "bytes");
    if req.method == Method::HEAD {
        return builder.body(empty()).unwrap();
    }
    let rate = state.lock().unwrap().rate;
    builder
        .body(stream_body(
            entry.content.clone(),
            start..end,
            fault,
            rate,
            Pacing {
                state: state.clone(),
                conn: conn.clone(),
            },
        ))
        .unwrap()
}

/// `bytes=N-` → (N, None); `bytes=N-M` → (N, Some(M)), M inclusive.
fn parse_range(value: &str) -> Option<(u64, Option<u64>)> {
    let (start, last) = value.strip_prefix("bytes=")?.trim().split_once('-')?;
    let start = start.trim().parse().ok()?;
    let last = match last.trim() {
        "" => None,
        last => Some(last.parse().ok()?),
    };
    Some((start, last))
}

/// One body being sent, counted in [`State::bodies`] until dropped.
struct Sending(Arc<Mutex<State>>);

impl Sending {
    fn begin(state: &Arc<Mutex<State>>) -> Self {
        let mut s = state.lock().unwrap();
        s.bodies += 1;
        s.peak_bodies = s.peak_bodies.max(s.bodies);
        Sending(state.clone())
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.0.lock().unwrap().bodies -= 1;
    }
}

/// The connection a body goes on, paced at the hub's connection rate.
struct Pacing {
    state: Arc<Mutex<State>>,
    conn: Conn,
}

/// The bytes `range` of `content`, in 64 KiB frames (smaller when throttled), at
/// `rate` and the connection's rate, spoiled by `fault`.
fn stream_body(
    content: Arc<Vec<u8>>,
    range: std::ops::Range<u64>,
    fault: Option<Fault>,
    rate: Option<u64>,
    pacing: Pacing,
) -> Body {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    let sending = Sending::begin(&pacing.state);
    tokio::spawn(async move {
        let _sending = sending;
        let mut sent: u64 = 0;
        let mut pos = range.start as usize;
        let stop = range.end as usize;
        let began = tokio::time::Instant::now();
        while pos < stop {
            let conn_rate = pacing.state.lock().unwrap().conn_rate;
            // Small frames when throttled, so the rate holds from the first byte.
            let chunk_size = [rate, conn_rate]
                .into_iter()
                .flatten()
                .min()
                .map_or(64 * 1024, |r| (r as usize / 20).clamp(1, 64 * 1024));
            let mut end = (pos + chunk_size).min(stop);
            match fault {
                Some(Fault::Stall { after }) | Some(Fault::Truncate { after })
                    if sent + (end - pos) as u64 > after =>
                {
                    end = pos + (after - sent) as usize;
                }
                _ => {}
            }
            if end > pos {
                if let Some(conn_rate) = conn_rate {
                    pacing.conn.pace(end - pos, conn_rate).await;
                }
                let mut chunk = content[pos..end].to_vec();
                if fault == Some(Fault::WrongBytes) && sent == 0 {
                    chunk[0] ^= 0xff;
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
