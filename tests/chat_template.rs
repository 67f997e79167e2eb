//! Chat templates against transformers: each fixture's template, read from its
//! folder's files as a node reads a fetched repo, renders every conversation of
//! the references as `apply_chat_template(add_generation_prompt=True)` did, and
//! the rendered text tokenizes (no special tokens added) to transformers' ids.

mod support;

use harness::tasks::generation::chat::ChatTemplate;
use harness::tasks::tokenizer::TextTokenizer;
use support::llm::{Arch, TinyLlm};

/// The fixtures' context (`max_position_embeddings`, `model_max_length`).
const CONTEXT: usize = 256;

/// The texts of the folder's tokenizer_config.json and chat_template.jinja (if
/// any), as `ChatTemplate::from_files` takes them.
fn files(llm: &TinyLlm) -> (String, Option<String>) {
    let config = String::from_utf8(llm.read("tokenizer_config.json")).unwrap();
    let template = std::fs::read_to_string(llm.dir.join("chat_template.jinja")).ok();
    (config, template)
}

fn template(llm: &TinyLlm) -> ChatTemplate {
    let (config, file) = files(llm);
    ChatTemplate::from_files(Some(&config), file.as_deref())
        .unwrap_or_else(|e| panic!("{:?}: {e}", llm.arch))
        .unwrap_or_else(|| panic!("{:?}: no chat template", llm.arch))
}

fn tokenizer(llm: &TinyLlm) -> TextTokenizer {
    TextTokenizer::from_file(&llm.dir.join("tokenizer.json"), CONTEXT).unwrap()
}

#[test]
fn every_chat_renders_and_tokenizes_as_transformers() {
    for arch in Arch::SUPPORTED {
        let llm = TinyLlm::get(arch);
        let template = template(&llm);
        let tokenizer = tokenizer(&llm);
        assert!(llm.chats.len() >= 2, "{arch:?}: {} chats", llm.chats.len());
        for chat in &llm.chats {
            let rendered = template.render(&chat.messages, true).unwrap();
            assert_eq!(rendered, chat.rendered, "{arch:?}: {:?}", chat.messages);
            let tokens = tokenizer.encode_plain(&rendered).unwrap();
            assert_eq!(tokens.ids, chat.ids, "{arch:?}: {rendered:?}");
            assert!(!tokens.truncated);
            assert_eq!(tokens.attention_mask, vec![1; chat.ids.len()]);
        }
    }
}

#[test]
fn the_special_tokens_come_from_the_template_not_the_tokenizer() {
    for arch in [Arch::Llama, Arch::Mistral] {
        let llm = TinyLlm::get(arch);
        let tokenizer = tokenizer(&llm);
        for chat in &llm.chats {
            // The template writes `<s>` (0), and `</s>` (1) after an answer...
            assert_eq!(chat.ids[0], 0, "{arch:?}");
            let answered = chat.messages.iter().any(|m| m.role == "assistant");
            assert_eq!(chat.ids.contains(&1), answered, "{arch:?}: {:?}", chat.ids);
            // ... and the tokenizer's default (its post-processor's `<s>`) would
            // add a second one.
            let doubled = tokenizer.encode_one(&chat.rendered).unwrap().ids;
            assert_eq!(doubled[..2], [0, 0], "{arch:?}");
            assert_eq!(doubled[1..], chat.ids[..], "{arch:?}");
        }
    }
}

#[test]
fn mistral_refuses_a_system_message_with_its_templates_words() {
    let llm = TinyLlm::get(Arch::Mistral);
    let refusal = llm
        .chat_refusal
        .as_ref()
        .expect("mistral's references hold the refusal");
    assert_eq!(
        template(&llm).render(&refusal.messages, true).unwrap_err(),
        refusal.error
    );
    assert_eq!(
        refusal.error,
        "Conversation roles must alternate user/assistant/user/assistant/..."
    );
    for arch in [Arch::Llama, Arch::Qwen2] {
        assert!(TinyLlm::get(arch).chat_refusal.is_none(), "{arch:?}");
    }
}

#[test]
fn templates_are_read_where_the_repos_keep_them() {
    for arch in Arch::ALL {
        let llm = TinyLlm::get(arch);
        let (config, file) = files(&llm);
        let config_json: serde_json::Value = serde_json::from_str(&config).unwrap();
        let in_config = config_json.get("chat_template").is_some();
        match arch {
            // The older repos' layout: the template inside tokenizer_config.json.
            Arch::Llama | Arch::Mistral => assert!(in_config && file.is_none(), "{arch:?}"),
            // transformers 5's: chat_template.jinja.
            Arch::Qwen2 => assert!(!in_config && file.is_some(), "{arch:?}"),
            Arch::Unsupported => {
                assert!(!in_config && file.is_none());
                let none = ChatTemplate::from_files(Some(&config), None).unwrap();
                assert!(none.is_none(), "a repo without a template has none");
                continue;
            }
        }
        // The file is read only when it is there; without it the template of
        // the config is the one.
        let template = template(&llm);
        let expected = if in_config {
            "the chat_template of tokenizer_config.json"
        } else {
            "chat_template.jinja"
        };
        assert_eq!(template.origin(), expected, "{arch:?}");
    }
}
