//! The smallest application that calls a harness node: it embeds texts, as the
//! node of `make run` serves (all-MiniLM-L6-v2, `HARNESS_TASK=embedding`).
//! `tensor.rs` calls the tensor demo of `make run-tensor` instead.
//!
//! ```sh
//! HARNESS_NODES=127.0.0.1:9000 HARNESS_COOKIE=dev-cookie-change-me \
//!     cargo run -p harness-client --example client -- "Hello world" "Bonjour le monde"
//! ```

use std::time::Duration;

use harness_client::{ClientConfig, HarnessClient};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let nodes = std::env::var("HARNESS_NODES").unwrap_or_else(|_| "127.0.0.1:9000".to_string());
    let cookie =
        std::env::var("HARNESS_COOKIE").map_err(|_| "set HARNESS_COOKIE to the node's cookie")?;
    let mut config = ClientConfig::new(nodes.split(',').map(str::to_string).collect(), cookie);
    if let Ok(serving) = std::env::var("HARNESS_SERVING_NAME") {
        config.serving = serving;
    }
    let client = HarnessClient::connect(config).await?;

    let mut texts: Vec<String> = std::env::args().skip(1).collect();
    if texts.is_empty() {
        texts = vec!["Hello world".to_string(), "Bonjour le monde".to_string()];
    }
    let embeddings = client
        .embed(texts.clone(), Some(Duration::from_secs(30)))
        .await?;
    for (text, embedding) in texts.iter().zip(&embeddings) {
        let head: Vec<String> = embedding
            .vector
            .iter()
            .take(4)
            .map(|v| format!("{v:.4}"))
            .collect();
        println!(
            "{text:?}: {} dimensions, {} tokens{}, [{}, ...]",
            embedding.vector.len(),
            embedding.tokens,
            if embedding.truncated {
                " (truncated)"
            } else {
                ""
            },
            head.join(", ")
        );
    }
    Ok(())
}
