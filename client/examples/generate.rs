//! Generates text from a prompt, as a node serving a causal language model does
//! (`HARNESS_TASK=generation`): prints the text as it is made
//! ([`HarnessClient::generate_stream`]), then why it ended.
//!
//! ```sh
//! HARNESS_NODES=127.0.0.1:9000 HARNESS_COOKIE=dev-cookie-change-me \
//!     cargo run -p harness-client --example generate -- "The capital of France is"
//! ```
//!
//! `MAX_NEW_TOKENS` (default 32) bounds the answer; the generation is greedy, so
//! the same prompt gives the same text.

use std::io::Write;
use std::time::Duration;

use futures_util::StreamExt;
use harness_client::{ClientConfig, GenerateOptions, HarnessClient};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let nodes = std::env::var("HARNESS_NODES").unwrap_or_else(|_| "127.0.0.1:9000".to_string());
    let cookie =
        std::env::var("HARNESS_COOKIE").map_err(|_| "set HARNESS_COOKIE to the node's cookie")?;
    let mut config = ClientConfig::new(nodes.split(',').map(str::to_string).collect(), cookie);
    if let Ok(serving) = std::env::var("HARNESS_SERVING_NAME") {
        config.serving = serving;
    }
    let max_new_tokens = match std::env::var("MAX_NEW_TOKENS") {
        Ok(n) => n
            .parse()
            .map_err(|_| format!("MAX_NEW_TOKENS={n:?} is not a count of tokens"))?,
        Err(_) => 32,
    };
    let client = HarnessClient::connect(config).await?;

    let args: Vec<String> = std::env::args().skip(1).collect();
    let prompt = if args.is_empty() {
        "The capital of France is".to_string()
    } else {
        args.join(" ")
    };
    let options = GenerateOptions {
        max_new_tokens: Some(max_new_tokens),
        do_sample: Some(false),
        ..GenerateOptions::default()
    };
    let mut stream = client
        .generate_stream(prompt.clone(), options, Some(Duration::from_secs(120)))
        .await?;
    print!("{prompt}");
    std::io::stdout().flush()?;
    while let Some(delta) = stream.next().await {
        print!("{}", delta?.text);
        std::io::stdout().flush()?;
    }
    println!();
    let end = stream.end().ok_or("the stream ended without its end")?;
    println!(
        "finish: {} ({} prompt tokens, {} generated, first token after {:.0} ms)",
        end.finish_reason.as_str(),
        end.prompt_tokens,
        end.generated_tokens,
        end.time_to_first_token_ms
    );
    Ok(())
}
