//! The text-generation fixtures themselves: every checkpoint is a complete Hub
//! repo, and its references are varied enough to test an engine with.

mod support;

use std::collections::HashSet;

use support::llm::{Arch, TinyLlm};

#[test]
fn every_checkpoint_is_a_hub_repo_with_varied_references() {
    for arch in Arch::ALL {
        let llm = TinyLlm::get(arch);
        let files = llm.files();
        let names: Vec<&str> = files.iter().map(|(n, _, _)| n.as_str()).collect();
        for needed in [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(
                names.contains(&needed),
                "{arch:?}: no {needed} in {names:?}"
            );
        }
        assert!(!names.contains(&"reference.json"));
        for (name, bytes, lfs) in &files {
            assert_eq!(*lfs, name.ends_with(".safetensors"), "{name}");
            assert!(!bytes.is_empty(), "{arch:?}: {name} is empty");
        }
        let config = llm.json("config.json");
        assert_eq!(config["architectures"][0], arch.class(), "{config}");

        let shards: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| n.ends_with(".safetensors"))
            .collect();
        if arch == Arch::Mistral {
            assert!(names.contains(&"model.safetensors.index.json"), "{names:?}");
            assert!(shards.len() > 1, "{shards:?}");
            let index = llm.json("model.safetensors.index.json");
            let named: HashSet<&str> = index["weight_map"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(named, shards.iter().copied().collect(), "{index}");
        } else {
            assert_eq!(shards, ["model.safetensors"], "{arch:?}");
        }

        if arch == Arch::Unsupported {
            assert!(llm.references.is_empty());
            continue;
        }
        let generation = llm.json("generation_config.json");
        match arch {
            Arch::Llama => assert_eq!(llm.eos_ids, [1, 3]),
            _ => assert_eq!(llm.eos_ids, [1]),
        }
        assert_eq!(
            generation["eos_token_id"],
            if arch == Arch::Llama {
                serde_json::json!([1, 3])
            } else {
                serde_json::json!(1)
            }
        );
        assert_eq!(generation["do_sample"], false);
        if arch == Arch::Qwen2 {
            assert_eq!(config["tie_word_embeddings"], true);
        }

        let refs = &llm.references;
        assert!(refs.len() >= 10, "{arch:?}: {} references", refs.len());
        let lengths: Vec<usize> = refs.iter().map(|r| r.prompt_ids.len()).collect();
        assert!(lengths.iter().min().unwrap() <= &3, "{lengths:?}");
        assert!(lengths.iter().max().unwrap() >= &70, "{lengths:?}");
        assert!(refs.iter().any(|r| !r.prompt.is_ascii()));
        let paths: HashSet<&[u32]> = refs.iter().map(|r| r.greedy_ids.as_slice()).collect();
        assert_eq!(paths.len(), refs.len(), "{arch:?}: greedy paths repeat");
        let tokens: HashSet<u32> = refs.iter().flat_map(|r| r.greedy_ids.clone()).collect();
        assert!(tokens.len() > 50, "{arch:?}: only {} tokens", tokens.len());
        for r in refs {
            assert_eq!(r.prompt_ids[0], 0, "{arch:?}: no <s> first in {r:?}");
            assert!(!r.greedy_ids.is_empty());
            assert!(r.greedy_ids.len() <= r.max_new_tokens as usize);
            let stopped = llm.eos_ids.contains(r.greedy_ids.last().unwrap());
            assert_eq!(stopped, r.stopped_on_eos, "{r:?}");
            if !stopped {
                assert_eq!(r.greedy_ids.len(), r.max_new_tokens as usize, "{r:?}");
            }
            assert!(r.min_logit_gap >= 1e-3, "{r:?}");
        }
        // Generation stops on each EOS id somewhere, and runs to the end elsewhere.
        let stops: HashSet<u32> = refs
            .iter()
            .filter(|r| r.stopped_on_eos)
            .map(|r| *r.greedy_ids.last().unwrap())
            .collect();
        assert_eq!(stops, llm.eos_ids.iter().copied().collect(), "{arch:?}");
        assert!(refs.iter().any(|r| !r.stopped_on_eos));
    }
}

/// The Rust `tokenizers` the engine uses reads every tokenizer.json, encodes
/// each prompt to its `prompt_ids` and decodes each greedy path to its text, as
/// transformers did.
#[test]
fn rust_tokenizers_agree_with_the_references() {
    for arch in Arch::SUPPORTED {
        let llm = TinyLlm::get(arch);
        let tokenizer = tokenizers::Tokenizer::from_file(llm.dir.join("tokenizer.json")).unwrap();
        for r in &llm.references {
            let encoding = tokenizer.encode(r.prompt.as_str(), true).unwrap();
            assert_eq!(encoding.get_ids(), r.prompt_ids, "{arch:?}: {:?}", r.prompt);
            let text = tokenizer.decode(&r.greedy_ids, true).unwrap();
            assert_eq!(text, r.greedy_text, "{arch:?}: {:?}", r.greedy_ids);
        }
    }
}
