//! Which files make a model: the ones its task needs, the ones it uses when the
//! repo has them, and its safetensors weights, one file or an index and the
//! shards its `weight_map` names. A task declares its files once ([`FileSpec`], a
//! `const`); the fetch resolves them ([`FileSet`]) against the Hub, the cache or a
//! local folder.

use std::collections::HashSet;
use std::fmt;

/// A task's files, declared once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSpec {
    /// Files the model cannot do without: a repo lacking one is an error naming it.
    pub required: &'static [&'static str],
    /// Files used when the repo has them, and gone without when it does not.
    pub optional: &'static [&'static str],
    /// Safetensors weights, found through their index when there is one.
    pub weights: Option<Weights>,
}

impl FileSpec {
    /// Exactly `files`, every one required.
    pub const fn only(files: &'static [&'static str]) -> Self {
        FileSpec {
            required: files,
            optional: &[],
            weights: None,
        }
    }
}

/// Safetensors weights: the shards `index` names when the repo has `index`, else
/// the one file `single`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weights {
    pub single: &'static str,
    pub index: &'static str,
}

impl Weights {
    /// The names `transformers` writes: `model.safetensors`, or
    /// `model.safetensors.index.json` and `model-0000N-of-0000M.safetensors`.
    pub const SAFETENSORS: Weights = Weights {
        single: "model.safetensors",
        index: "model.safetensors.index.json",
    };
}

/// The files to fetch: a task's [`FileSpec`], or `HARNESS_MODEL_FILES` (exactly
/// those files, every one required).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSet {
    pub required: Vec<String>,
    pub optional: Vec<String>,
    pub weights: Option<Weights>,
}

impl FileSet {
    /// Exactly `files`, every one required.
    pub fn exact<S: Into<String>>(files: impl IntoIterator<Item = S>) -> Self {
        FileSet {
            required: files.into_iter().map(Into::into).collect(),
            ..FileSet::default()
        }
    }

    /// Nothing to fetch.
    pub fn is_empty(&self) -> bool {
        self.required.is_empty() && self.optional.is_empty() && self.weights.is_none()
    }

    /// The first pattern that is not one (`x[`), with why.
    pub fn invalid_pattern(&self) -> Option<(String, String)> {
        self.patterns().find_map(|p| {
            glob::Pattern::new(&as_glob(p))
                .err()
                .map(|e| (p.to_string(), e.msg.to_string()))
        })
    }

    /// The patterns among the required files (`*.safetensors`, `tokenizer*`),
    /// resolved against the repo's file list at the pinned commit.
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.required
            .iter()
            .map(String::as_str)
            .filter(|f| is_pattern(f))
    }

    /// The set with each pattern replaced by the files of `listing` it matches
    /// (in name order, each file once); the first pattern that matches nothing
    /// is the error. A listed name that is not a plain path inside the repo
    /// (`..`, absolute, control characters: a hostile or broken Hub) is never
    /// matched, so it can never become a path in the cache.
    pub fn expand(&self, listing: &[String]) -> Result<FileSet, String> {
        let mut listing: Vec<&String> = listing.iter().filter(|n| is_safe_file_name(n)).collect();
        listing.sort();
        let mut required: Vec<String> = Vec::new();
        for entry in &self.required {
            if !is_pattern(entry) {
                if !required.contains(entry) {
                    required.push(entry.clone());
                }
                continue;
            }
            let pattern = glob::Pattern::new(&as_glob(entry)).map_err(|_| entry.clone())?;
            let matched: Vec<&String> = listing
                .iter()
                .copied()
                .filter(|name| pattern.matches(name))
                .collect();
            if matched.is_empty() {
                return Err(entry.clone());
            }
            for name in matched {
                if !required.contains(name) {
                    required.push(name.clone());
                }
            }
        }
        Ok(FileSet {
            required,
            ..self.clone()
        })
    }

    /// Every name the set itself gives (not the shards an index will name).
    pub fn declared(&self) -> impl Iterator<Item = &str> {
        let weights = self.weights.iter().flat_map(|w| [w.index, w.single]);
        self.required
            .iter()
            .chain(&self.optional)
            .map(String::as_str)
            .chain(weights)
    }
}

/// Whether a `HARNESS_MODEL_FILES` entry is a pattern rather than a file name.
pub fn is_pattern(entry: &str) -> bool {
    entry.contains(['*', '?', '[']) || entry.ends_with('/')
}

/// A folder (`onnx/`) means every file under it, as `huggingface_hub` reads it.
fn as_glob(entry: &str) -> String {
    match entry.strip_suffix('/') {
        Some(folder) => format!("{folder}/*"),
        None => entry.to_string(),
    }
}

impl From<FileSpec> for FileSet {
    fn from(spec: FileSpec) -> Self {
        let owned = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
        FileSet {
            required: owned(spec.required),
            optional: owned(spec.optional),
            weights: spec.weights,
        }
    }
}

impl From<Vec<String>> for FileSet {
    fn from(files: Vec<String>) -> Self {
        FileSet::exact(files)
    }
}

impl FromIterator<String> for FileSet {
    fn from_iter<I: IntoIterator<Item = String>>(files: I) -> Self {
        FileSet::exact(files)
    }
}

/// `config.json,tokenizer.json (optional: chat_template.jinja) (weights: ...)`.
impl fmt::Display for FileSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.required.join(","))?;
        if !self.optional.is_empty() {
            write!(f, " (optional: {})", self.optional.join(","))?;
        }
        if let Some(w) = self.weights {
            write!(
                f,
                " (weights: {} and its shards, else {})",
                w.index, w.single
            )?;
        }
        Ok(())
    }
}

/// The shards a safetensors index names, as paths in the repo (beside the index),
/// each once, in the order the `weight_map` first names them; or why the index is
/// not one.
pub fn index_shards(index: &str, bytes: &[u8]) -> Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: WeightMap,
    }
    let parsed: Index = serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => format!("it is not an index: {e}"),
        _ => format!("it is not valid JSON: {e}"),
    })?;
    let shards = parsed.weight_map.0;
    if shards.is_empty() {
        return Err("its weight_map names no shard".to_string());
    }
    let folder = index.rsplit_once('/').map(|(folder, _)| folder);
    shards
        .into_iter()
        .map(|shard| {
            let path = match folder {
                Some(folder) => format!("{folder}/{shard}"),
                None => shard.clone(),
            };
            if is_safe_file_name(&shard) && is_safe_file_name(&path) {
                Ok(path)
            } else {
                Err(format!(
                    "its weight_map names {shard:?}, which is not a file path inside the repo"
                ))
            }
        })
        .collect()
}

/// A `weight_map`'s distinct values (shard files) in the order they first appear:
/// read entry by entry, since a map would sort them by tensor name.
struct WeightMap(Vec<String>);

impl<'de> serde::Deserialize<'de> for WeightMap {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = WeightMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object from tensor names to shard files")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<WeightMap, A::Error> {
                let mut seen = HashSet::new();
                let mut shards = Vec::new();
                while let Some((_tensor, shard)) =
                    map.next_entry::<serde::de::IgnoredAny, String>()?
                {
                    if seen.insert(shard.clone()) {
                        shards.push(shard);
                    }
                }
                Ok(WeightMap(shards))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// A relative path inside a repo: no absolute path, no `..`, nothing empty.
pub(crate) fn is_safe_file_name(file: &str) -> bool {
    !file.is_empty()
        && !file.starts_with('/')
        && !file.contains(|c: char| c.is_control() || c == '\\')
        && file
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_fnmatch_and_never_a_name_outside_the_repo() {
        let listing: Vec<String> = [
            "b.safetensors",
            "a.safetensors",
            "onnx/c.safetensors",
            "tokenizer.json",
            "../../../etc/x.safetensors",
            "/abs.safetensors",
            "config.json",
        ]
        .map(String::from)
        .to_vec();
        let set = FileSet::exact(["config.json", "*.safetensors", "a.safetensors"]);
        let expanded = set.expand(&listing).unwrap();
        assert_eq!(
            expanded.required,
            [
                "config.json",
                "a.safetensors",
                "b.safetensors",
                "onnx/c.safetensors"
            ]
        );
        assert_eq!(
            FileSet::exact(["*.gguf"]).expand(&listing),
            Err("*.gguf".to_string())
        );
        assert_eq!(FileSet::exact(["x["]).invalid_pattern().unwrap().0, "x[");
        assert!(FileSet::exact(["tok*"]).invalid_pattern().is_none());
        // A folder is every file under it.
        let onnx = FileSet::exact(["onnx/"]).expand(&listing).unwrap();
        assert_eq!(onnx.required, ["onnx/c.safetensors"]);
    }

    #[test]
    fn file_names_stay_inside_the_repo() {
        assert!(!is_safe_file_name("a\nb"));
        assert!(!is_safe_file_name("a\\..\\b"));
        assert!(is_safe_file_name("model.pt"));
        assert!(is_safe_file_name("onnx/model.onnx"));
        for bad in ["", "/etc/passwd", "../x", "a/../b", "a//b", "./a"] {
            assert!(!is_safe_file_name(bad), "{bad}");
        }
    }

    #[test]
    fn an_index_names_its_shards_once_in_the_order_it_first_names_them() {
        // Sorted by tensor name, lm_head (shard 3) would come first.
        let index = br#"{
            "metadata": {"total_size": 123},
            "weight_map": {
                "model.embed_tokens.weight": "model-00001-of-00003.safetensors",
                "model.layers.0.mlp.weight": "model-00001-of-00003.safetensors",
                "model.layers.1.mlp.weight": "model-00002-of-00003.safetensors",
                "lm_head.weight": "model-00003-of-00003.safetensors",
                "model.norm.weight": "model-00002-of-00003.safetensors"
            }
        }"#;
        assert_eq!(
            index_shards("model.safetensors.index.json", index).unwrap(),
            [
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors"
            ]
        );
        // An index in a folder names shards in that folder.
        assert_eq!(
            index_shards("llm/model.safetensors.index.json", index).unwrap()[0],
            "llm/model-00001-of-00003.safetensors"
        );
    }

    #[test]
    fn a_broken_index_says_what_is_wrong() {
        let cases: [(&[u8], &str); 5] = [
            (b"{not json", "not valid JSON"),
            (
                b"{\"metadata\": {}}",
                "it is not an index: missing field `weight_map`",
            ),
            (b"{\"weight_map\": {}}", "names no shard"),
            (b"{\"weight_map\": {\"a\": 3}}", "expected a string"),
            (
                b"{\"weight_map\": {\"a\": \"../x.safetensors\"}}",
                "not a file path",
            ),
        ];
        for (bytes, says) in cases {
            let err = index_shards("model.safetensors.index.json", bytes).unwrap_err();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn a_spec_becomes_a_set_and_a_list_is_exact() {
        const SPEC: FileSpec = FileSpec {
            required: &["config.json"],
            optional: &["chat_template.jinja"],
            weights: Some(Weights::SAFETENSORS),
        };
        let set = FileSet::from(SPEC);
        assert_eq!(
            set.declared().collect::<Vec<_>>(),
            [
                "config.json",
                "chat_template.jinja",
                "model.safetensors.index.json",
                "model.safetensors"
            ]
        );
        assert_eq!(
            FileSet::from(FileSpec::only(&["model.pt"])),
            FileSet::exact(["model.pt"])
        );
        assert!(FileSet::default().is_empty());
    }
}
