//! Tiny random causal language models (Llama, Mistral, Qwen2, and a GPT-2 to
//! refuse) as Hub repos, with transformers' greedy generations from them: written
//! by `llm_fixtures.py` once per machine and cached.
//!
//! The script's output is cached under the cargo target folder (or the temp
//! folder when the test executable is not in one), in a folder named after a
//! hash of the script's text, so changing the script makes new fixtures. Test
//! binaries that race to make it each write a folder of their own and rename it
//! into place; the first rename wins and the others use its folder.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::python::{made_once, run_python};

/// The script that writes the fixtures (`python llm_fixtures.py OUT_DIR`).
const SCRIPT: &str = include_str!("llm_fixtures.py");

/// A checkpoint of the fixtures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM`: 3 layers, grouped-query attention, `llama3` rope
    /// scaling, EOS ids `[1, 3]`; its config.json in the legacy layout of real
    /// Llama 3.1 repos (`rope_scaling`, `rope_theta`, `torch_dtype`).
    Llama,
    /// `MistralForCausalLM`: 2 layers, no sliding window, six safetensors shards
    /// with `model.safetensors.index.json`.
    Mistral,
    /// `Qwen2ForCausalLM`: 2 layers, bias on q/k/v, tied embeddings (no
    /// `lm_head.weight` in the file), rope_theta 1e6.
    Qwen2,
    /// `GPT2LMHeadModel`: an architecture the engine refuses; no references.
    Unsupported,
}

impl Arch {
    pub const ALL: [Arch; 4] = [Arch::Llama, Arch::Mistral, Arch::Qwen2, Arch::Unsupported];
    pub const SUPPORTED: [Arch; 3] = [Arch::Llama, Arch::Mistral, Arch::Qwen2];

    /// Its folder under the fixtures' root.
    pub fn folder(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Unsupported => "unsupported",
        }
    }

    /// The class in its config.json's `architectures`.
    pub fn class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Unsupported => "GPT2LMHeadModel",
        }
    }
}

/// transformers' greedy generation (f32, eager attention, the prompt alone, no
/// padding) for one prompt.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Reference {
    pub prompt: String,
    /// `tokenizer(prompt).input_ids`: `<s>` (0) first.
    pub prompt_ids: Vec<u32>,
    /// The new ids only; the last is an EOS id when generation stopped on one.
    pub greedy_ids: Vec<u32>,
    /// `tokenizer.decode(greedy_ids, skip_special_tokens=True)`: byte-level
    /// tokens that split a character decode to U+FFFD.
    pub greedy_text: String,
    pub max_new_tokens: u32,
    /// Whether generation stopped on an EOS id (the last of `greedy_ids`, which
    /// may also be the `max_new_tokens`-th).
    pub stopped_on_eos: bool,
    /// The smallest gap between the best and the second-best logit over the
    /// greedy steps (the script keeps it >= 1e-3).
    pub min_logit_gap: f64,
}

/// A conversation rendered with the checkpoint's chat template by transformers,
/// and the greedy generation (as [`Reference`]'s) that continues it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ChatReference {
    pub messages: Vec<harness_client::ChatMessage>,
    /// `apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`
    /// with the template of the checkpoint's folder.
    pub rendered: String,
    /// `tokenizer(rendered, add_special_tokens=False).input_ids`, what
    /// `apply_chat_template(..., tokenize=True)` gives: the template writes the
    /// special tokens (for llama and mistral `<s>` (0) first, and `</s>` (1)
    /// after an assistant's answer; none for qwen2's ChatML).
    pub ids: Vec<u32>,
    /// The new ids only; the last is an EOS id when generation stopped on one.
    pub greedy_ids: Vec<u32>,
    /// `tokenizer.decode(greedy_ids, skip_special_tokens=True)`.
    pub greedy_text: String,
    pub max_new_tokens: u32,
    /// Whether generation stopped on an EOS id.
    pub stopped_on_eos: bool,
    /// The smallest gap between the best and the second-best logit over the
    /// greedy steps (the script keeps it >= 1e-3).
    pub min_logit_gap: f64,
}

/// A conversation the checkpoint's chat template refuses, and the message of
/// the `raise_exception` transformers raised for it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ChatRefusal {
    pub messages: Vec<harness_client::ChatMessage>,
    /// `str(e)` of the `jinja2.exceptions.TemplateError`: the template's own text.
    pub error: String,
}

/// One checkpoint of the fixtures: a Hub repo's files in `dir`, and its
/// references (none for [`Arch::Unsupported`]).
#[derive(Debug, Clone)]
pub struct TinyLlm {
    pub arch: Arch,
    pub dir: PathBuf,
    /// The ids generation stops on (generation_config.json's `eos_token_id`).
    pub eos_ids: Vec<u32>,
    pub references: Vec<Reference>,
    /// Conversations through the folder's chat template: llama's
    /// (Llama-2-chat's, in tokenizer_config.json) and qwen2's (ChatML, in
    /// chat_template.jinja) a system, user, assistant, user one and a single
    /// non-ASCII user message; mistral's (Mistral-7B-Instruct-v0.2's, in
    /// tokenizer_config.json) the same without the system message. None for
    /// [`Arch::Unsupported`], which has no template.
    pub chats: Vec<ChatReference>,
    /// For mistral: the system, user, assistant, user conversation its template
    /// refuses, and transformers' error.
    pub chat_refusal: Option<ChatRefusal>,
}

/// The file of the script's own, next to the checkpoint's files, that
/// [`TinyLlm::files`] leaves out.
pub const REFERENCE_FILE: &str = "reference.json";

impl TinyLlm {
    /// The checkpoint `arch`, made now if this machine has not made it yet.
    pub fn get(arch: Arch) -> TinyLlm {
        let dir = root().join(arch.folder());
        assert!(dir.is_dir(), "no fixture folder {}", dir.display());
        #[derive(serde::Deserialize)]
        struct File {
            eos_token_ids: Vec<u32>,
            references: Vec<Reference>,
            #[serde(default)]
            chats: Vec<ChatReference>,
            #[serde(default)]
            chat_refusal: Option<ChatRefusal>,
        }
        let file = match std::fs::read(dir.join(REFERENCE_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap(),
            Err(_) => File {
                eos_token_ids: vec![1],
                references: Vec::new(),
                chats: Vec::new(),
                chat_refusal: None,
            },
        };
        TinyLlm {
            arch,
            dir,
            eos_ids: file.eos_token_ids,
            references: file.references,
            chats: file.chats,
            chat_refusal: file.chat_refusal,
        }
    }

    /// Every file of the checkpoint as the Hub holds it: its name relative to
    /// the folder (`/`-separated), its bytes, and whether the Hub stores it with
    /// LFS (`*.safetensors`); sorted by name, without [`REFERENCE_FILE`]. What
    /// [`super::model_repo::ModelRepo::publish`] takes, through [`as_published`].
    pub fn files(&self) -> Vec<(String, Vec<u8>, bool)> {
        let mut files = Vec::new();
        collect(&self.dir, &self.dir, &mut files);
        files.retain(|(name, _, _)| name != REFERENCE_FILE);
        files.sort_by(|a, b| a.0.cmp(&b.0));
        files
    }

    /// The bytes of the file `name` of the folder.
    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(name))
            .unwrap_or_else(|e| panic!("reading {name} of {}: {e}", self.dir.display()))
    }

    /// The folder's `name` (config.json, generation_config.json, ...) parsed.
    pub fn json(&self, name: &str) -> serde_json::Value {
        serde_json::from_slice(&self.read(name)).unwrap()
    }
}

/// [`TinyLlm::files`] borrowed the way [`super::model_repo::ModelRepo::publish`]
/// takes them.
pub fn as_published(files: &[(String, Vec<u8>, bool)]) -> Vec<(&str, &[u8], bool)> {
    files
        .iter()
        .map(|(name, bytes, lfs)| (name.as_str(), bytes.as_slice(), *lfs))
        .collect()
}

fn collect(root: &Path, dir: &Path, into: &mut Vec<(String, Vec<u8>, bool)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(root, &path, into);
            continue;
        }
        let name = path
            .strip_prefix(root)
            .unwrap()
            .components()
            .map(|c| c.as_os_str().to_str().unwrap())
            .collect::<Vec<_>>()
            .join("/");
        let lfs = name.ends_with(".safetensors");
        into.push((name, std::fs::read(&path).unwrap(), lfs));
    }
}

/// How long a node in this process has to become ready with a tiny model.
pub const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(120);

/// A node in this process serving `arch` from the test Hub with `extra` settings
/// (`--task=generation` given), under the serving name `serving`.
pub async fn serve(
    arch: Arch,
    serving: &str,
    extra: &[&str],
) -> (
    super::model_repo::ModelRepo,
    harness::node::Node,
    ractor::ActorRef<harness_client::ServingMessage>,
) {
    serve_files(arch, TinyLlm::get(arch).files(), serving, extra).await
}

/// As [`serve`], with the checkpoint's end-of-sequence id set to one past its
/// vocabulary: its generations never stop on their own before their
/// `max_new_tokens` or the context (for streams that must still run when the
/// test acts on them).
pub async fn serve_endless(
    arch: Arch,
    serving: &str,
    extra: &[&str],
) -> (
    super::model_repo::ModelRepo,
    harness::node::Node,
    ractor::ActorRef<harness_client::ServingMessage>,
) {
    serve_files(arch, endless(TinyLlm::get(arch).files()), serving, extra).await
}

/// `files` with the end-of-sequence id set past the vocabulary (see
/// [`serve_endless`]).
pub fn endless(mut files: Vec<(String, Vec<u8>, bool)>) -> Vec<(String, Vec<u8>, bool)> {
    for (name, bytes, _) in &mut files {
        if name == "config.json" || name == "generation_config.json" {
            let mut json: serde_json::Value = serde_json::from_slice(bytes).unwrap();
            json["eos_token_id"] = serde_json::json!(1_000_000);
            *bytes = serde_json::to_vec_pretty(&json).unwrap();
        }
    }
    files
}

/// The checkpoint `arch` as [`endless`] makes it, in a folder of its own (for a
/// `harness serve` process with `HARNESS_MODEL_DIR`).
pub fn endless_dir(arch: Arch) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes, _) in endless(TinyLlm::get(arch).files()) {
        let path = dir.path().join(&name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    dir
}

pub async fn serve_files(
    arch: Arch,
    files: Vec<(String, Vec<u8>, bool)>,
    serving: &str,
    extra: &[&str],
) -> (
    super::model_repo::ModelRepo,
    harness::node::Node,
    ractor::ActorRef<harness_client::ServingMessage>,
) {
    let repo = super::model_repo::ModelRepo::publish(
        &format!("tiny/{}", arch.folder()),
        &as_published(&files),
    )
    .await;
    let mut args = vec!["--task=generation"];
    args.extend_from_slice(extra);
    let config = repo.node_config(serving, &args);
    let (node, actor) = super::serving::start_ready(config, READY_WITHIN).await;
    (repo, node, actor)
}

/// Greedy generation of at most `max_new_tokens`, as the references were made.
pub fn greedy(max_new_tokens: u32) -> harness_client::GenerateOptions {
    harness_client::GenerateOptions {
        max_new_tokens: Some(max_new_tokens),
        do_sample: Some(false),
        ..harness_client::GenerateOptions::default()
    }
}

/// The fixtures' root folder (holding `manifest.json` and one folder per
/// [`Arch`]), made by the script the first time on this machine; or
/// `HARNESS_LLM_FIXTURES`, a copy made elsewhere (the GPU machine has no
/// `transformers`: `scripts/gpu-check` carries the fixtures there).
pub fn root() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        if let Some(made) = std::env::var_os("HARNESS_LLM_FIXTURES") {
            return PathBuf::from(made);
        }
        made_once("llm-fixtures", SCRIPT, "manifest.json", |out| {
            run_python(SCRIPT, &[out])
        })
    })
    .clone()
}
