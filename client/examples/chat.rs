//! A chat in the terminal with a node serving a chat model
//! (`HARNESS_TASK=generation`, a model whose repo has a chat template): each
//! line you type is a user message; the answer is printed as it is made
//! ([`HarnessClient::generate_stream`] with [`ChatMessage`]s), then kept in the
//! conversation for the next turn. An empty line or end of input quits.
//!
//! ```sh
//! HARNESS_NODES=127.0.0.1:9000 HARNESS_COOKIE=dev-cookie-change-me \
//!     cargo run -p harness-client --example chat -- "You are a helpful assistant."
//! ```
//!
//! The arguments, if any, are the system message. `MAX_NEW_TOKENS` (default 256)
//! bounds each answer. Ctrl-C while an answer is printed ends the program, and
//! with it the generation: the node cancels the generations of a client that
//! went away.

use std::io::{BufRead, Write};
use std::time::Duration;

use futures_util::StreamExt;
use harness_client::{ChatMessage, ClientConfig, GenerateOptions, HarnessClient};

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
        Err(_) => 256,
    };
    let client = HarnessClient::connect(config).await?;

    let mut chat = Vec::new();
    let system: Vec<String> = std::env::args().skip(1).collect();
    if !system.is_empty() {
        chat.push(ChatMessage::system(system.join(" ")));
    }
    let mut lines = std::io::stdin().lock().lines();
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        let Some(line) = lines.next().transpose()? else {
            break;
        };
        if line.trim().is_empty() {
            break;
        }
        chat.push(ChatMessage::user(line));
        let options = GenerateOptions {
            max_new_tokens: Some(max_new_tokens),
            ..GenerateOptions::default()
        };
        let mut stream = client
            .generate_stream(chat.clone(), options, Some(Duration::from_secs(300)))
            .await?;
        let mut answer = String::new();
        while let Some(delta) = stream.next().await {
            let delta = delta?;
            print!("{}", delta.text);
            std::io::stdout().flush()?;
            answer.push_str(&delta.text);
        }
        println!();
        if let Some(end) = stream.end() {
            eprintln!(
                "[{}: {} prompt tokens, {} generated]",
                end.finish_reason, end.prompt_tokens, end.generated_tokens
            );
        }
        chat.push(ChatMessage::assistant(answer));
    }
    Ok(())
}
