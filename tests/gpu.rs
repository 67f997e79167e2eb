//! Checks that need a CUDA GPU. They are ignored on machines without one and run by
//! `scripts/gpu-check` on the lent GPU machine (`--ignored`).

mod support;

use harness::device::{choose_serving_device, DeviceChoice, DevicePolicy};
use harness::engine::{gpu::GpuFacts, BatchConfig, Collate, Engine};
use harness::tasks::{Pooler, Pooling};
use support::models::{input, save_token_model, token_inputs, Affine};

/// CUDA kernels sum in another order than the CPU's: allow float32 rounding.
fn assert_near(got: &tch::Tensor, want: &tch::Tensor) {
    assert_eq!(got.size(), want.size());
    assert!(
        got.allclose(want, 1e-4, 1e-5, false),
        "got {got}\nwant {want}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check"]
fn the_gpu_is_usable_and_named() {
    let facts = GpuFacts::probe();
    println!("{}", facts.report());
    assert!(facts.gpu_usable(), "no usable CUDA GPU: {facts:?}");
    assert!(facts.cudart_linked);
    assert!(
        facts.devices.iter().all(|d| d.name != "unknown"),
        "the driver names every device: {facts:?}"
    );
    assert_eq!(
        choose_serving_device(DevicePolicy::Cuda, &facts, "gpu-check"),
        Ok(DeviceChoice::Cuda(0))
    );
}

#[tokio::test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check"]
async fn a_cuda_forward_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let model = Affine::new();
    let path = model.save(dir.path());
    let cpu = Engine::load(&path, DeviceChoice::Cpu, BatchConfig::default())
        .await
        .expect("load on the CPU");
    let gpu = Engine::load(&path, DeviceChoice::Cuda(0), BatchConfig::default())
        .await
        .expect("load on cuda:0");
    for batch in [1, 7, 64] {
        let x = input(batch, -1.0);
        gpu.warm_up(vec![x.shallow_clone()], 3).await.unwrap();
        let on_gpu = gpu.forward(vec![x.shallow_clone()]).await.unwrap();
        let on_cpu = cpu.forward(vec![x.shallow_clone()]).await.unwrap();
        assert_eq!(
            on_gpu[0].device(),
            tch::Device::Cpu,
            "outputs come back on the CPU"
        );
        assert_near(&on_gpu[0], &on_cpu[0]);
        assert_near(&on_gpu[0], &model.apply(&x)[0]);
    }
}

/// The embedding task's path on the device: token batches padded, run, pooled and
/// normalized on CUDA, against the CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check"]
async fn cuda_token_batches_pool_like_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let path = save_token_model(dir.path());
    let collate = Collate::Tokens {
        pad_values: vec![0, 0],
    };
    let pooler = std::sync::Arc::new(Pooler {
        mask_input: 1,
        pooling: Pooling::Mean,
        normalize: true,
    });
    let config = BatchConfig {
        max_batch_delay: std::time::Duration::from_millis(20),
        ..BatchConfig::default()
    };
    let cpu = Engine::load_with(
        &path,
        DeviceChoice::Cpu,
        config,
        collate.clone(),
        Some(pooler.clone()),
    )
    .await
    .expect("load on the CPU");
    let gpu = Engine::load_with(&path, DeviceChoice::Cuda(0), config, collate, Some(pooler))
        .await
        .expect("load on cuda:0");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let texts: Vec<Vec<i64>> = (1..=24)
        .map(|n| (0..n).map(|i| (i * 5 + n) % 49 + 1).collect())
        .collect();
    let run = |engine: Engine, ids: Vec<i64>| async move {
        engine
            .run(token_inputs(&ids), deadline)
            .await
            .expect("pooled")
    };
    let on_gpu: Vec<_> = texts
        .iter()
        .map(|ids| tokio::spawn(run(gpu.clone(), ids.clone())))
        .collect();
    for (ids, answer) in texts.iter().zip(on_gpu) {
        let got = answer.await.unwrap();
        let want = run(cpu.clone(), ids.clone()).await;
        assert_eq!(
            got[0].device(),
            tch::Device::Cpu,
            "vectors come back on the CPU"
        );
        assert_near(&got[0], &want[0]);
    }
    println!(
        "cuda token batches: {} texts in {} forwards",
        texts.len(),
        gpu.stats()
            .forwards
            .load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// The generation task on CUDA: each tiny checkpoint's greedy tokens equal the
/// CPU's (f32 exactly, streamed too; bf16 within what its rounding allows), and tokens/s of a
/// random ~1B-parameter Llama at 1, 8 and 32 requests at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check"]
async fn generation_on_cuda_matches_the_cpu_and_scales() {
    use futures_util::future::join_all;
    use std::time::{Duration, Instant};
    use support::llm::{greedy, Arch, TinyLlm};
    use support::serving::{generate, generate_request, node_config, start_ready, stream_whole};

    let ready = Duration::from_secs(300);
    for arch in Arch::SUPPORTED {
        let model = TinyLlm::get(arch);
        let dir = format!("--model-dir={}", model.dir.display());
        let mut answers = Vec::new();
        for (device, dtype) in [("cpu", "f32"), ("cuda", "f32"), ("cuda", "bf16")] {
            let serving = format!("gen_{}_{device}_{dtype}", arch.folder());
            let config = node_config(&[
                "--task=generation",
                &dir,
                &format!("--device={device}"),
                &format!("--dtype={dtype}"),
                &format!("--serving-name={serving}"),
            ]);
            let (node, actor) = start_ready(config, ready).await;
            let tokens: Vec<Vec<u32>> = join_all(
                model
                    .references
                    .iter()
                    .map(|r| generate(&actor, &r.prompt, greedy(16), 60_000)),
            )
            .await
            .into_iter()
            .map(|g| g.expect("a generation").token_ids)
            .collect();
            if (device, dtype) == ("cuda", "f32") {
                // Streamed on CUDA: the same tokens and text as whole answers.
                for (r, whole) in model.references.iter().zip(&tokens) {
                    let request = generate_request(r.prompt.as_str(), greedy(16), 60_000);
                    let (ids, text, _) = stream_whole(&actor, request).await.expect("a stream");
                    assert_eq!(&ids, whole, "{arch:?}: streamed on CUDA");
                    let answer = generate(&actor, &r.prompt, greedy(16), 60_000)
                        .await
                        .unwrap();
                    assert_eq!(text, answer.text, "{arch:?}: streamed text on CUDA");
                }
            }
            answers.push(tokens);
            node.shutdown(Duration::from_secs(5)).await;
        }
        let (cpu, cuda_f32, cuda_bf16) = (&answers[0], &answers[1], &answers[2]);
        assert_eq!(
            cuda_f32, cpu,
            "{arch:?}: f32 on CUDA gives the CPU's tokens"
        );
        let same = cpu.iter().zip(cuda_bf16).filter(|(a, b)| a == b).count();
        println!(
            "{arch:?}: bf16 on CUDA equals the CPU's f32 for the first 16 tokens of {same} of {} prompts",
            cpu.len()
        );
        let first_same = cpu
            .iter()
            .zip(cuda_bf16)
            .filter(|(a, b)| a.first() == b.first())
            .count();
        assert!(
            first_same * 10 >= cpu.len() * 8,
            "{arch:?}: bf16's first token differs from f32's for most prompts ({first_same} of {})",
            cpu.len()
        );
    }

    // A random Llama of TinyLlama-1.1B's shape, written here in bf16.
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyLlm::get(Arch::Llama);
    std::fs::copy(
        tiny.dir.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::copy(
        tiny.dir.join("tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let (hidden, layers, heads, kv_heads, inter, vocab) =
        (2048i64, 22i64, 32i64, 4i64, 5632i64, 32000i64);
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "torch_dtype": "bfloat16", "bos_token_id": 0,
        "eos_token_id": 1, "tie_word_embeddings": false
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let head_dim = hidden / heads;
    let mut tensors: Vec<(String, tch::Tensor)> = Vec::new();
    let random = |shape: &[i64]| {
        (tch::Tensor::randn(shape, (tch::Kind::Float, tch::Device::Cuda(0))) * 0.02)
            .to_kind(tch::Kind::BFloat16)
            .to_device(tch::Device::Cpu)
    };
    let ones = |n: i64| tch::Tensor::ones([n], (tch::Kind::BFloat16, tch::Device::Cpu));
    tensors.push(("model.embed_tokens.weight".into(), random(&[vocab, hidden])));
    tensors.push(("lm_head.weight".into(), random(&[vocab, hidden])));
    tensors.push(("model.norm.weight".into(), ones(hidden)));
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        tensors.push((format!("{p}.input_layernorm.weight"), ones(hidden)));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), ones(hidden)));
        tensors.push((
            format!("{p}.self_attn.q_proj.weight"),
            random(&[heads * head_dim, hidden]),
        ));
        tensors.push((
            format!("{p}.self_attn.k_proj.weight"),
            random(&[kv_heads * head_dim, hidden]),
        ));
        tensors.push((
            format!("{p}.self_attn.v_proj.weight"),
            random(&[kv_heads * head_dim, hidden]),
        ));
        tensors.push((
            format!("{p}.self_attn.o_proj.weight"),
            random(&[hidden, heads * head_dim]),
        ));
        tensors.push((
            format!("{p}.mlp.gate_proj.weight"),
            random(&[inter, hidden]),
        ));
        tensors.push((format!("{p}.mlp.up_proj.weight"), random(&[inter, hidden])));
        tensors.push((
            format!("{p}.mlp.down_proj.weight"),
            random(&[hidden, inter]),
        ));
    }
    tch::Tensor::write_safetensors(&tensors, dir.path().join("model.safetensors")).unwrap();
    drop(tensors);

    let loading = Instant::now();
    let config = node_config(&[
        "--task=generation".to_string(),
        format!("--model-dir={}", dir.path().display()),
        "--device=cuda".to_string(),
        "--max-sequences=32".to_string(),
        "--max-context=1024".to_string(),
        "--serving-name=gen_1b".to_string(),
    ]);
    let (node, actor) = start_ready(config, ready).await;
    println!(
        "1.1B bf16: ready in {:.1} s",
        loading.elapsed().as_secs_f64()
    );
    let prompt = "the quick brown fox jumps over the lazy dog ".repeat(8);
    for concurrent in [1usize, 8, 32] {
        let started = Instant::now();
        let answers =
            join_all((0..concurrent).map(|_| generate(&actor, &prompt, greedy(128), 120_000)))
                .await;
        let took = started.elapsed().as_secs_f64();
        let tokens: u32 = answers
            .iter()
            .map(|a| a.as_ref().expect("a generation").generated_tokens)
            .sum();
        let ttft: Vec<f64> = answers
            .iter()
            .map(|a| a.as_ref().unwrap().time_to_first_token_ms)
            .collect();
        println!(
            "1.1B bf16 on CUDA, {concurrent:>2} at once: {:>8.1} tokens/s ({tokens} tokens in {took:.2} s), first token {:.1} ms at worst",
            tokens as f64 / took,
            ttft.iter().cloned().fold(0.0, f64::max)
        );
    }
    node.shutdown(Duration::from_secs(5)).await;
}
