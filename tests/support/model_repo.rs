//! A model published on a test hub, and what a node needs to fetch it: the one
//! way the tests put a model on the Hub for a node.

use super::hub::TestHub;
use super::models::Affine;
use super::node::ServeSettings;

/// A model repo on a test hub of its own (its `main` holding the files
/// published), and a cache folder for the nodes that fetch it.
pub struct ModelRepo {
    pub hub: TestHub,
    /// `org/name`.
    pub repo: String,
    /// The commit `main` points at.
    pub commit: String,
    pub cache: tempfile::TempDir,
    files: Vec<(String, Vec<u8>)>,
    /// `--warmup-inputs` for the nodes, when the model needs one.
    warmup_inputs: Option<String>,
}

impl ModelRepo {
    /// Starts a test hub and publishes `files` (name, bytes, whether the Hub
    /// stores it with LFS) as the `main` of `repo`.
    pub async fn publish(repo: &str, files: &[(&str, &[u8], bool)]) -> ModelRepo {
        let hub = TestHub::start().await;
        let commit = hub.commit(repo, "main", files);
        ModelRepo {
            hub,
            repo: repo.to_string(),
            commit,
            cache: tempfile::tempdir().unwrap(),
            files: files
                .iter()
                .map(|(name, bytes, _)| (name.to_string(), bytes.to_vec()))
                .collect(),
            warmup_inputs: None,
        }
    }

    /// The affine model, traced now, published as `model.pt` (LFS) of `repo`, for
    /// nodes warming up with `f32[4]`; the repo and the model (for the answers it
    /// must give).
    pub async fn affine(repo: &str) -> (ModelRepo, Affine) {
        let dir = tempfile::tempdir().unwrap();
        let model = Affine::new();
        let bytes = std::fs::read(model.save(dir.path())).unwrap();
        let mut published = Self::publish(repo, &[("model.pt", &bytes, true)]).await;
        published.warmup_inputs = Some("f32[4]".to_string());
        (published, model)
    }

    /// The bytes of the file `name` as published.
    pub fn bytes(&self, name: &str) -> &[u8] {
        let (_, bytes) = self
            .files
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} was not published"));
        bytes
    }

    /// The settings of a node in this process that fetches the model into
    /// [`ModelRepo::cache`] and serves it as `serving`, with `extra` arguments
    /// ([`super::serving::node_config`]).
    pub fn node_config(&self, serving: &str, extra: &[&str]) -> harness::config::Config {
        let mut args = vec![
            format!("--hf-endpoint={}", self.hub.url()),
            format!("--model-repo={}", self.repo),
            format!("--cache-dir={}", self.cache.path().display()),
            format!("--serving-name={serving}"),
        ];
        if let Some(warmup) = &self.warmup_inputs {
            args.push(format!("--warmup-inputs={warmup}"));
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        super::serving::node_config(&args)
    }

    /// The settings of a `harness serve` process that fetches the model into
    /// [`ModelRepo::cache`], with `cookie`.
    pub fn serve_settings(&self, cookie: &str) -> ServeSettings {
        let settings =
            ServeSettings::from_hub(cookie, &self.hub.url(), &self.repo, self.cache.path());
        match &self.warmup_inputs {
            Some(warmup) => settings.env("HARNESS_WARMUP_INPUTS", warmup),
            None => settings,
        }
    }
}
