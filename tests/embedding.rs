//! The embedding task on a real model: all-MiniLM-L6-v2 exported with
//! `tools/export_torchscript.py`, published on the test Hub, served by a
//! `harness serve` process, called by a client over the cluster, and compared
//! with sentence-transformers on the same texts.

use std::time::Duration;

use harness_client::{ClientError, ServingError, WireTensor};

mod support;

use support::minilm;
use support::model_repo::ModelRepo;
use support::node::ServeProcess;

const COOKIE: &str = "an-embedding-test-cookie";
const REPO: &str = "sentence-transformers/all-MiniLM-L6-v2";
const MAX_QUEUE: usize = 64;

/// `harness serve` of the embedding model `published`, ready.
fn serve(published: &ModelRepo) -> ServeProcess {
    let server = published
        .serve_settings(COOKIE)
        .env("HARNESS_TASK", "embedding")
        .env("HARNESS_MAX_QUEUE", MAX_QUEUE)
        .start();
    assert!(
        server
            .startup_log
            .contains("embedding model described by harness.json"),
        "{}",
        server.startup_log
    );
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embeddings_match_sentence_transformers_through_hub_node_and_client() {
    // Export the real model with our tool, and publish it on the test Hub.
    let export = tempfile::tempdir().unwrap();
    let out = export.path().join("all-MiniLM-L6-v2");
    let exported = minilm::export(&out);
    assert!(
        exported.status.success(),
        "export failed: {}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("harness.json")).unwrap()).unwrap();
    assert_eq!(manifest["pooling"], "mean");
    assert_eq!(manifest["normalize"], true);
    assert_eq!(manifest["max_seq_length"], 256);
    let published = minilm::publish(&out, REPO).await;

    let texts = minilm::varied_texts();
    assert!(texts.len() >= 50, "{} texts", texts.len());
    let (reference, max_seq_length) = minilm::reference(&texts);
    assert_eq!(max_seq_length, 256);

    let server = serve(&published);
    let client = server.connect(Duration::from_secs(60)).await;

    // All the texts in one call, and each text in a call of its own, at once (so
    // the batcher mixes lengths): both must give sentence-transformers' vectors.
    let together = client.embed(texts.clone(), None).await.expect("embeds");
    let alone = futures_util::future::join_all(
        texts
            .iter()
            .map(|text| client.embed(vec![text.clone()], None)),
    )
    .await;
    assert_eq!(together.len(), texts.len());
    for (i, text) in texts.iter().enumerate() {
        let want = &reference[i];
        let single = alone[i].as_ref().expect("embeds alone");
        for (how, got) in [("together", &together[i]), ("alone", &single[0])] {
            assert_eq!(got.vector.len(), 384);
            let similarity = minilm::cosine(&got.vector, &want.vector);
            assert!(
                similarity >= 0.9999,
                "{how}: text {i} {:?}: cosine {similarity}",
                text.chars().take(40).collect::<String>()
            );
            // Cosine ignores length: the normalization must match too.
            let (n_got, n_want) = (minilm::norm(&got.vector), minilm::norm(&want.vector));
            assert!(
                (n_got - n_want).abs() < 1e-4,
                "{how}: text {i}: norm {n_got} vs {n_want}"
            );
            assert_eq!(got.truncated, want.tokens > max_seq_length, "text {i}");
            assert_eq!(
                got.tokens as usize,
                want.tokens.min(max_seq_length),
                "text {i}"
            );
        }
    }
    let truncated = together.iter().filter(|e| e.truncated).count();
    assert!(truncated >= 4, "only {truncated} texts were past the limit");

    // Defined behaviour at the edges, and the node keeps serving.
    assert!(client.embed(Vec::new(), None).await.unwrap().is_empty());
    let too_many = vec!["a text".to_string(); MAX_QUEUE + 1];
    match client.embed(too_many, None).await {
        Err(ClientError::Serving(ServingError::BadInput { reason })) => {
            assert!(reason.contains("HARNESS_MAX_QUEUE"), "{reason}")
        }
        other => panic!("expected BadInput, got {other:?}"),
    }
    let tensors = vec![WireTensor::from_f32(&[1, 4], &[0.0; 4])];
    match client.run(tensors, None).await {
        Err(ClientError::Serving(ServingError::BadInput { reason })) => {
            assert!(reason.contains("send Embed"), "{reason}")
        }
        other => panic!("expected BadInput, got {other:?}"),
    }
    let again = client.embed(vec![texts[0].clone()], None).await.unwrap();
    assert!(minilm::cosine(&again[0].vector, &reference[0].vector) >= 0.9999);
}

#[test]
fn the_export_tool_refuses_what_it_cannot_export_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    // A folder that is not empty is never written into.
    std::fs::write(dir.path().join("keep.txt"), b"mine").unwrap();
    let out = minilm::export(dir.path());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not empty"), "{stderr}");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("keep.txt")]);
}
